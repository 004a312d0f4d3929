"""Elastic placement policies without vLLM or the scheduler.

* The interface: a policy registered by name is built through
  ``make_elastic_policy`` / ``from_settings`` and driven only through
  ``ElasticPolicy`` (``place``, ``consolidates``, ``consolidate``).
* ``ThresholdElasticPolicy``: the settings it reads, prefill DoP,
  fewest/stripe storage (scale-down), decode and scale-up, consolidation.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_esp.core.esp.config import ESPConfig
from vllm_esp.core.esp.cost_model import (
    DecodeCoeffs,
    ESPCostModel,
    MigrationCoeffs,
    PrefillCoeffs,
)
from vllm_esp.core.esp.placement import (
    Consolidation,
    ElasticPolicy,
    InstanceLoad,
    PrefillTime,
    RequestPlacementView,
    StepPlacement,
    StoragePlacement,
    ThresholdElasticPolicy,
)
from vllm_esp.core.esp.registry import ELASTIC_POLICIES, make_elastic_policy
from vllm_esp.core.settings import SettingsError

#: A cluster cost model for the factory (the threshold policy ignores it).
ESP_COST = ESPCostModel(
    prefill={1: PrefillCoeffs(0.01, 1e-4, 1e-8)},
    decode=DecodeCoeffs(0.01, 1e-4, 1e-7),
    migration=MigrationCoeffs(0.0, 1024.0, 1e9),
)

TARGET_S = 1 / 16


def linear_time(per_token_s: float = 1 / 1024) -> Any:
    calls: list[tuple[int, int]] = []

    def prefill_time(num_new: int, num_computed: int) -> float:
        calls.append((num_new, num_computed))
        return per_token_s * num_new

    prefill_time.calls = calls  # type: ignore[attr-defined]
    return prefill_time


def loads(
    *free: int, num_blocks: int = 100, decodes: list[int] | None = None
) -> list[InstanceLoad]:
    decodes = decodes or [0] * len(free)
    return [InstanceLoad(i, f, num_blocks, d) for i, (f, d) in enumerate(zip(free, decodes))]


def view(
    prompt: int = 100,
    computed: int = 0,
    new: int = 100,
    held: tuple[int, ...] = (0, 0, 0, 0),
    last: int | None = None,
    bs: int = 16,
    rid: str = "r",
) -> RequestPlacementView:
    return RequestPlacementView(rid, prompt, computed, new, tuple(held), last, bs)


def policy(num_instances: int = 4, **kwargs: Any) -> ThresholdElasticPolicy:
    kwargs.setdefault("prefill_time", linear_time())
    kwargs.setdefault("prefill_target_s", TARGET_S)
    return ThresholdElasticPolicy(num_instances, **kwargs)


# ------------------------------------------------------------------ interface
class PinnedPolicy(ElasticPolicy):
    """A toy policy: everything on one instance, read from the settings."""

    name = "pinned"

    def __init__(self, instance: int) -> None:
        self.instance = instance

    @classmethod
    def from_settings(
        cls,
        settings: ESPConfig,
        *,
        num_instances: int,
        prefill_time: PrefillTime,
        esp_cost: ESPCostModel,
    ) -> PinnedPolicy:
        return cls(min(settings.decode_scale_up_batch, num_instances - 1))

    def place(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> StepPlacement:
        reason = "prefill" if request.is_prefill else "decode"
        return StepPlacement((self.instance,), StoragePlacement((self.instance,)), reason)


class GatherPolicy(PinnedPolicy):
    """A toy policy that also consolidates: one block per step onto its instance."""

    name = "gather"

    def consolidate(
        self, request: RequestPlacementView, loads: list[InstanceLoad]
    ) -> Consolidation | None:
        for src, num_held in enumerate(request.blocks_per_instance):
            if src != self.instance and num_held > 0:
                return Consolidation(src, self.instance, 1)
        return None


def drive(
    elastic: ElasticPolicy, request: RequestPlacementView, free: list[int]
) -> tuple[StepPlacement, Consolidation | None]:
    """What the scheduler does with a policy, knowing only the interface."""
    current = loads(*free)
    placed = elastic.place(request, current)
    moved = elastic.consolidate(request, current) if elastic.consolidates else None
    return placed, moved


def test_a_registered_policy_is_built_by_name_and_driven_through_the_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with monkeypatch.context() as patch:
        patch.setitem(ELASTIC_POLICIES, PinnedPolicy.name, PinnedPolicy)
        patch.setitem(ELASTIC_POLICIES, GatherPolicy.name, GatherPolicy)
        # Registering the name is what makes it a valid setting.
        pinned_settings = ESPConfig(num_instances=3, placement="pinned", decode_scale_up_batch=1)
        pinned = make_elastic_policy(
            pinned_settings, num_instances=3, prefill_time=linear_time(), esp_cost=ESP_COST
        )
        gather = make_elastic_policy(
            ESPConfig(num_instances=3, placement="gather"),
            num_instances=3,
            prefill_time=linear_time(),
            esp_cost=ESP_COST,
        )
    assert type(pinned) is PinnedPolicy and pinned.instance == 1  # read from the settings
    assert type(gather) is GatherPolicy and gather.instance == 2  # capped by num_instances
    # Not overriding consolidate means never consolidating; overriding it means
    # being asked, with no flag to set.
    assert not pinned.consolidates and gather.consolidates
    decode = view(prompt=10, computed=40, new=1, held=(1, 0, 2), last=2)
    placed, moved = drive(pinned, decode, [5, 5, 5])
    assert placed == StepPlacement((1,), StoragePlacement((1,)), "decode") and moved is None
    placed, moved = drive(gather, decode, [5, 5, 5])
    assert placed.compute == (2,) and moved == Consolidation(0, 2, 1)
    # The registry is back as it was.
    assert "pinned" not in ELASTIC_POLICIES and "gather" not in ELASTIC_POLICIES
    with pytest.raises(SettingsError, match="placement"):
        ESPConfig(placement="pinned")


def test_an_elastic_policy_must_say_how_it_is_built() -> None:
    class NoFactory(ElasticPolicy):
        def place(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> StepPlacement:
            raise AssertionError("unused")

    with pytest.raises(TypeError, match="from_settings"):
        NoFactory()  # type: ignore[abstract]


def test_threshold_from_settings_reads_its_settings() -> None:
    fake = linear_time()  # 64 tokens per 62.5 ms target
    settings = ESPConfig(
        num_instances=4,
        placement="threshold",
        prefill_target_ms=62.5,
        max_prefill_instances=3,
        decode_scale_up_batch=5,
        migrate_blocks_per_step=2,
        prefill_storage="stripe",
    )
    p = make_elastic_policy(settings, num_instances=4, prefill_time=fake, esp_cost=ESP_COST)
    assert isinstance(p, ThresholdElasticPolicy)
    assert (p.num_instances, p.prefill_target_s, p.max_prefill_instances) == (4, 0.0625, 3)
    assert (p.decode_scale_up_batch, p.migrate_blocks_per_step) == (5, 2)
    assert p.prefill_storage == "stripe" and p.consolidates
    # The cost model it was given is the one it asks: first for a decode
    # step (the auto hostage bound, 4 of them), then for the chunks.
    assert p.max_decode_stall_s == 4 * fake(1, 0)
    assert [p.prefill_dop(t, 0) for t in (64, 65, 5000)] == [1, 2, 3]
    assert fake.calls == [(1, 0), (1, 0), (64, 0), (65, 0), (5000, 0)]
    placed = p.place(view(prompt=150, new=150), loads(5, 40, 30, 40))
    assert placed.storage == StoragePlacement((1, 2, 3), stripe=True)
    assert p.consolidate(
        view(prompt=10, computed=300, new=1, held=(9, 10, 0, 0), last=1), loads(10, 50, 10, 10)
    ) == (0, 1, 2)


def test_threshold_from_default_settings() -> None:
    p = ThresholdElasticPolicy.from_settings(
        ESPConfig(num_instances=2), num_instances=2, prefill_time=linear_time(), esp_cost=ESP_COST
    )
    assert (p.prefill_target_s, p.max_prefill_instances) == (0.25, 2)
    assert (p.decode_scale_up_batch, p.migrate_blocks_per_step) == (64, 4)
    assert p.prefill_storage == "fewest" and p.consolidates
    off = ThresholdElasticPolicy.from_settings(
        ESPConfig(migrate_blocks_per_step=0),
        num_instances=1,
        prefill_time=linear_time(),
        esp_cost=ESP_COST,
    )
    assert not off.consolidates


def test_registry_and_constructor_checks() -> None:
    assert ELASTIC_POLICIES["threshold"] is ThresholdElasticPolicy
    with pytest.raises(ValueError, match="num_instances"):
        policy(0)
    with pytest.raises(ValueError, match="prefill_storage 'x'"):
        policy(prefill_storage="x")
    assert policy(4, max_prefill_instances=9).max_prefill_instances == 4
    assert policy(4, max_prefill_instances=None).max_prefill_instances == 4


# ------------------------------------------------------------------ threshold
def test_prefill_dop_grows_with_estimated_time_and_is_capped():
    fake = linear_time()  # 64 tokens = one target (binary-exact floats)
    p = policy(4, prefill_time=fake)
    assert [p.prefill_dop(t, 0) for t in (1, 63, 64, 65, 128, 129, 192, 193, 5000)] == [
        1,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
    ]
    assert fake.calls[-1] == (5000, 0)
    p.prefill_dop(10, 77)
    assert fake.calls[-1] == (10, 77)  # the context length reaches the cost model
    capped = policy(4, max_prefill_instances=2)
    assert capped.prefill_dop(5000, 0) == 2
    # Never more instances than tokens, even when the estimate is huge.
    slow = policy(4, prefill_time=lambda n, c: 10.0)
    assert [slow.prefill_dop(t, 0) for t in (1, 2, 3, 9)] == [1, 2, 3, 4]
    assert policy(1, prefill_time=lambda n, c: 10.0).prefill_dop(100, 0) == 1


def test_prefill_compute_uses_the_most_free_instances():
    p = policy(4)
    placed = p.place(view(prompt=150, new=150), loads(5, 40, 30, 40))
    assert placed.reason == "prefill"
    assert placed.compute == (1, 2, 3)  # DoP 3: the three most free, ascending
    one = p.place(view(prompt=50, new=50), loads(5, 40, 30, 40))
    assert one.compute == (1,)


def test_fewest_storage_holds_the_prompt_on_the_fewest_instances():
    p = policy(4)
    # 16-token blocks; 100 prompt tokens + 1 output token = 7 blocks.
    placed = p.place(view(prompt=100, new=100), loads(5, 8, 3, 2))
    assert placed.storage == StoragePlacement((1,), stripe=False)
    # 20 blocks: the most free first until the prompt fits.
    placed = p.place(view(prompt=319, new=300), loads(5, 8, 3, 9))
    assert placed.storage.instances == (3, 1, 0)
    assert not placed.storage.stripe
    # A later chunk starts on the instance of the request's last block and
    # counts the blocks it already holds (20 - 12 = 8 more).
    placed = p.place(
        view(prompt=319, computed=192, new=127, held=(0, 0, 12, 0), last=2), loads(5, 8, 3, 9)
    )
    assert placed.storage.instances == (2, 3)
    # The last-block instance alone is enough: it is the only one.
    placed = p.place(
        view(prompt=319, computed=192, new=127, held=(0, 0, 12, 0), last=2), loads(5, 8, 30, 9)
    )
    assert placed.storage.instances == (2,)
    # Storage is independent of compute: scale-down (compute on 3, store on 1).
    placed = p.place(view(prompt=150, new=150), loads(40, 40, 40, 5))
    assert placed.compute == (0, 1, 2) and placed.storage.instances == (0,)


def test_stripe_storage_deals_blocks_over_the_compute_instances():
    p = policy(4, prefill_storage="stripe")
    placed = p.place(view(prompt=150, new=150), loads(5, 40, 30, 40))
    assert placed.compute == (1, 2, 3)
    assert placed.storage == StoragePlacement((1, 2, 3), stripe=True)


def test_decode_stays_home_until_full_or_busy():
    p = policy(3, decode_scale_up_batch=2)
    dec = view(prompt=10, computed=40, new=1, held=(0, 3, 0), last=1)
    home = p.place(dec, loads(10, 10, 10, decodes=[0, 2, 0]))
    assert home.reason == "decode"
    assert home.compute == (1,) and home.storage == StoragePlacement((1,))
    # Home full: scale up to the least loaded other instance.
    full = p.place(dec, loads(10, 0, 20, decodes=[0, 1, 3]))
    assert full.reason == "scale-up"
    assert full.compute == (0,) and full.storage.instances == (0,)
    # Home masters more decodes than the threshold.
    busy = p.place(dec, loads(10, 10, 20, decodes=[1, 3, 1]))
    assert busy.reason == "scale-up" and busy.compute == (2,)  # tie on decodes: most free
    # Other instances full too: stays home when home has room...
    alone = p.place(dec, loads(0, 10, 0, decodes=[0, 5, 0]))
    assert alone.compute == (1,) and alone.reason == "decode"
    # ... and falls back to some instance when nobody has room.
    nowhere = p.place(dec, loads(0, 0, 0))
    assert len(nowhere.compute) == 1 and nowhere.storage.instances == nowhere.compute


def test_decode_scale_up_batch_zero_always_scales_up():
    p = policy(2, decode_scale_up_batch=0)
    dec = view(prompt=10, computed=20, new=1, held=(2, 0), last=0)
    placed = p.place(dec, loads(50, 50, decodes=[1, 0]))
    assert placed.reason == "scale-up" and placed.storage.instances == (1,)


def test_decode_without_blocks_goes_to_the_least_loaded():
    p = policy(3)
    placed = p.place(
        view(prompt=10, computed=10, new=1, held=(0, 0, 0), last=None),
        loads(5, 9, 9, decodes=[1, 2, 0]),
    )
    assert placed.reason == "decode" and placed.compute == (2,)


def test_consolidate_moves_the_smallest_shard_to_the_largest():
    p = policy(3, migrate_blocks_per_step=4)
    dec = view(prompt=10, computed=200, new=1, held=(3, 8, 2), last=1)
    assert p.consolidate(dec, loads(10, 10, 10)) == (2, 1, 2)
    # Bounded by the per-step budget ...
    big = view(prompt=10, computed=300, new=1, held=(9, 10, 0), last=1)
    assert p.consolidate(big, loads(10, 50, 10)) == (0, 1, 4)
    # ... and by the destination's room, keeping one block for growth.
    assert p.consolidate(big, loads(10, 3, 10)) == (0, 1, 2)
    assert p.consolidate(big, loads(10, 1, 10)) is None
    assert p.consolidate(big, loads(10, 0, 10)) is None
    # Ties: the lower instance is the destination.
    tie = view(prompt=10, computed=100, new=1, held=(4, 4, 0), last=1)
    assert p.consolidate(tie, loads(10, 10, 10)) == (1, 0, 4)


def test_consolidate_declines_prefill_single_shard_and_disabled():
    p = policy(3, migrate_blocks_per_step=4)
    assert (
        p.consolidate(view(prompt=300, computed=100, new=100, held=(3, 3, 0)), loads(10, 10, 10))
        is None
    )
    assert (
        p.consolidate(
            view(prompt=10, computed=100, new=1, held=(0, 7, 0), last=1), loads(10, 10, 10)
        )
        is None
    )
    off = policy(3, migrate_blocks_per_step=0)
    assert (
        off.consolidate(
            view(prompt=10, computed=100, new=1, held=(3, 8, 0), last=1), loads(10, 10, 10)
        )
        is None
    )


@settings(max_examples=200, deadline=None)
@given(
    held=st.lists(st.integers(0, 20), min_size=2, max_size=4),
    data=st.data(),
    budget=st.integers(1, 8),
)
def test_consolidate_is_bounded(held, data, budget):
    free = data.draw(st.lists(st.integers(0, 20), min_size=len(held), max_size=len(held)))
    p = policy(len(held), migrate_blocks_per_step=budget)
    decision = p.consolidate(
        view(prompt=1, computed=500, new=1, held=tuple(held), last=0), loads(*free)
    )
    if sum(1 for h in held if h) < 2:
        assert decision is None
        return
    if decision is None:
        dst = max(range(len(held)), key=lambda i: (held[i], -i))
        assert free[dst] <= 1
        return
    src, dst, count = decision
    assert src != dst and held[src] > 0
    assert held[dst] == max(held) and held[src] <= min(
        h for i, h in enumerate(held) if h and i != dst
    )
    assert 1 <= count <= min(budget, held[src], free[dst] - 1)


def test_prefill_compute_ties_go_to_the_lowest_instances() -> None:
    placed = policy(4).place(view(prompt=100, new=100), loads(40, 40, 40, 40))
    assert placed.compute == (0, 1)


def test_fewest_storage_needs_no_new_instance_once_the_prompt_fits() -> None:
    # 7 blocks already held cover 100 prompt tokens + 1: only the last-block
    # instance is named, even when it is full (the pool spills if needed).
    placed = policy(4).place(
        view(prompt=100, computed=96, new=4, held=(0, 7, 0, 0), last=1), loads(30, 0, 30, 30)
    )
    assert placed.storage == StoragePlacement((1,), stripe=False)


def test_consolidation_names_its_fields() -> None:
    decision = policy(3, migrate_blocks_per_step=4).consolidate(
        view(prompt=10, computed=200, new=1, held=(3, 8, 2), last=1), loads(10, 10, 10)
    )
    assert decision is not None
    assert (decision.src, decision.dst, decision.num_blocks) == (2, 1, 2)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    num_instances=st.integers(1, 4),
    storage=st.sampled_from(["fewest", "stripe"]),
    batch=st.integers(0, 3),
)
def test_place_returns_a_valid_placement(
    data: st.DataObject, num_instances: int, storage: str, batch: int
) -> None:
    free = data.draw(st.lists(st.integers(0, 20), min_size=num_instances, max_size=num_instances))
    decodes = data.draw(st.lists(st.integers(0, 5), min_size=num_instances, max_size=num_instances))
    held = tuple(
        data.draw(st.lists(st.integers(0, 6), min_size=num_instances, max_size=num_instances))
    )
    last = data.draw(st.sampled_from([None] + [i for i, h in enumerate(held) if h]))
    prompt = data.draw(st.integers(1, 400))
    computed = data.draw(st.integers(0, prompt + 50))
    new = data.draw(st.integers(1, max(1, prompt - computed))) if computed < prompt else 1
    p = policy(num_instances, prefill_storage=storage, decode_scale_up_batch=batch)
    request = view(prompt=prompt, computed=computed, new=new, held=held, last=last)
    placed = p.place(request, loads(*free, decodes=decodes))
    instances = range(num_instances)
    assert placed.compute and len(set(placed.compute)) == len(placed.compute)
    assert all(i in instances for i in placed.compute + placed.storage.instances)
    if request.is_prefill:
        assert placed.reason == "prefill"
        assert placed.compute == tuple(sorted(placed.compute))
        assert len(placed.compute) == p.prefill_dop(new, computed)
        by_free = sorted(instances, key=lambda i: (-free[i], i))
        assert set(placed.compute) == set(by_free[: len(placed.compute)])
        if storage == "stripe":
            assert placed.storage == StoragePlacement(placed.compute, stripe=True)
        else:
            chosen = placed.storage.instances
            assert not placed.storage.stripe and len(set(chosen)) == len(chosen)
            assert last is None or chosen[0] == last
            needed = -(-(prompt + 1) // 16) - sum(held)
            # Enough room, or every instance named; the last one was needed.
            assert sum(free[i] for i in chosen) >= needed or len(chosen) == num_instances
            assert sum(free[i] for i in chosen[:-1]) < needed or chosen == (
                (last,) if last is not None else ()
            )
    else:
        assert len(placed.compute) == 1
        assert placed.storage == StoragePlacement(placed.compute)
        assert placed.reason in ("decode", "scale-up")
        assert (placed.reason == "scale-up") == (last is not None and placed.compute != (last,))
        if last is not None and free[last] > 0 and decodes[last] <= batch:
            assert placed.compute == (last,)
