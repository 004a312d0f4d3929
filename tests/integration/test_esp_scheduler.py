"""``ESPScheduler`` on the real vLLM scheduler with fabricated runner outputs.

The engine's block space is N instances' pools side by side; these tests
check that the per-instance free queues never lose or double-count a block,
that every ``SchedulerOutput`` carries an ``esp_plan`` consistent with
vLLM's own view of the step, that the elastic behaviours (a prompt larger
than one instance, scale-down, stripe, scale-up, consolidation) show up in
the block tables, and that any registered ``ElasticPolicy`` drives them.

Cost model (``calibration_file`` fixture): 1 ms + 0.01 ms per token; a
``prefill_target_ms`` of 0.001 therefore forces the largest DoP and the
default 250 ms keeps every prefill on one instance. The auto hostage bound
is 4 decode steps, 4.04 ms: a chunk of up to 708 tokens on two instances,
more than these tests' token budgets, so only the hostage tests set one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from vllm.v1.request import RequestStatus

from vllm_esp.core.costmodel import StepCostModel
from vllm_esp.core.esp.cluster import ClusterPlan, ClusterView
from vllm_esp.core.esp.config import ESPConfig
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.core.esp.loong.elastic import LoongElasticPolicy
from vllm_esp.core.esp.placement import (
    Consolidation,
    ElasticPolicy,
    InstanceLoad,
    PrefillTime,
    RequestPlacementView,
    StepPlacement,
    StoragePlacement,
    bounded_prefill_chunk,
)
from vllm_esp.core.esp.registry import ELASTIC_POLICIES
from vllm_esp.core.esp.step_plan import ESPStepPlan, instance_of, local_batch
from vllm_esp.harness.scheduler import create_scheduler, fake_output, make_request
from vllm_esp.integration.esp.scheduler import ESPScheduler
from vllm_esp.integration.metrics import STATS_PREFIX
from vllm_esp.sim import SimRequest, simulate

BLOCK_SIZE = 16


def make_esp(model_dir, calibration_file, *, num_blocks=40, esp=None, mlfq=None, **kwargs):
    mlfq_settings = {
        "num_levels": 8,
        "base_quantum_ms": 4.0,
        "calibration_file": calibration_file,
        "starvation_threshold_s": 0.0,
        # Quantum demotion: the tests need rank changes to happen.
        "demote_by_value": False,
    }
    mlfq_settings.update(mlfq or {})
    # The threshold rules unless a test asks for another placement.
    esp_settings = {"num_instances": 2, "placement": "threshold"}
    esp_settings.update(esp or {})
    kwargs.setdefault("max_num_batched_tokens", 256)
    s = create_scheduler(
        model_dir,
        scheduler_cls=ESPScheduler,
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        additional_config={"mlfq": mlfq_settings, "esp": esp_settings},
        **kwargs,
    )
    assert isinstance(s, ESPScheduler)
    return s


def instance_sizes(s) -> list[int]:
    B = s.blocks_per_instance
    return [max(0, min(B, s.num_blocks - i * B)) for i in range(s.num_instances)]


def table(s, rid) -> list[int]:
    (ids,) = s.kv_cache_manager.get_block_ids(rid)
    return list(ids)


def instances(s, rid) -> list[int]:
    return [instance_of(b, s.blocks_per_instance) for b in table(s, rid)]


def check_blocks(s) -> None:
    """Per-instance conservation: free + held (+ the null block) == pool size."""
    pool = s.kv_cache_manager.block_pool
    B = s.blocks_per_instance
    held: set[int] = set()
    for rid, blocks in s._manager.req_to_blocks.items():
        for b in blocks:
            if not b.is_null:
                assert b.ref_cnt > 0, (rid, b)
                held.add(b.block_id)
    for request in s.requests.values():
        if request.status == RequestStatus.RUNNING:
            assert set(table(s, request.request_id)) <= held
    free = s.free_queues.free_per_instance()
    for i, queue in enumerate(s.free_queues.queues):
        ids = [b.block_id for b in queue.get_all_free_blocks()]
        assert len(ids) == free[i]
        assert all(instance_of(b, B) == i for b in ids), f"foreign block on instance {i}"
        assert not set(ids) & held, "a held block is also free"
        assert all(pool.blocks[b].ref_cnt == 0 for b in ids)
    assert pool.null_block.block_id == 0
    for i, size in enumerate(instance_sizes(s)):
        on_i = sum(1 for b in held if instance_of(b, B) == i)
        null = 1 if i == 0 else 0
        assert free[i] + on_i + null == size, (i, free, on_i, size)
    assert pool.get_num_free_blocks() == sum(free)
    # Every block that is neither free nor the null block is held by a request.
    for block in pool.blocks[1:]:
        assert (block.ref_cnt > 0) == (block.block_id in held), block


def check_plan(s, out) -> ESPStepPlan:
    plan: ESPStepPlan = out.esp_plan
    assert plan.num_instances == s.num_instances
    assert plan.blocks_per_instance == s.blocks_per_instance
    assert plan.block_size == BLOCK_SIZE
    assert [r.req_id for r in plan.requests] == list(out.num_scheduled_tokens)
    assert len({r.req_id for r in plan.requests}) == len(plan.requests)
    for r in plan.requests:
        request = s.requests[r.req_id]
        assert len(r.token_ids) == out.num_scheduled_tokens[r.req_id]
        assert r.end == request.num_computed_tokens
        assert list(r.token_ids) == list(request.all_token_ids[r.start : r.end])
        assert list(r.block_ids) == table(s, r.req_id)
        assert len(r.block_ids) * BLOCK_SIZE >= r.end
        assert r.compute and all(0 <= c < s.num_instances for c in r.compute)
        assert len(set(r.compute)) == len(r.compute)
        assert (r.sample is not None) == (r.end >= request.num_tokens)
        if r.start >= request.num_prompt_tokens:
            # Decode: computed where its token's KV is stored.
            assert r.compute == (plan.storage_instance(r, r.start),)
    assert set(plan.finished_req_ids) == set(out.finished_req_ids)
    batches = [local_batch(plan, i) for i in range(plan.num_instances)]
    assert sum(b.num_rows for b in batches) == out.total_num_scheduled_tokens
    num_sampled = sum(len(b.sample_rows) for b in batches)
    assert num_sampled == sum(1 for r in plan.requests if r.sample is not None)
    # Migrations: destinations are in a scheduled request's table; a source
    # left every table, unless a later move of the same step reuses it as its
    # destination (freed, then handed out again). A block is never read after
    # an earlier move of the step wrote it, so applying the moves in plan order
    # equals applying them all at once (what the runner does).
    in_tables = {b for r in plan.requests for b in r.block_ids}
    all_tables = {
        b for blocks in s._manager.req_to_blocks.values() for b in (x.block_id for x in blocks)
    }
    srcs = [m.src for m in plan.moves]
    dsts = [m.dst for m in plan.moves]
    assert len(set(srcs)) == len(srcs) and len(set(dsts)) == len(dsts)
    for k, move in enumerate(plan.moves):
        assert move.dst in in_tables
        assert move.src not in all_tables or move.src in dsts[k + 1 :]
        assert move.src not in dsts[:k]
        assert instance_of(move.src, s.blocks_per_instance) != instance_of(
            move.dst, s.blocks_per_instance
        )
    return plan


def esp_step(s, token: int = 7):
    """schedule -> checks -> fabricated output -> update_from_output."""
    out = s.schedule()
    plan = check_plan(s, out)
    check_blocks(s)
    engine_outputs = s.update_from_output(out, fake_output(s, out, token))
    check_blocks(s)
    return out, plan, engine_outputs


def run(s, max_steps=2000):
    plans = []
    for _ in range(max_steps):
        if not s.has_requests():
            return plans
        _, plan, _ = esp_step(s)
        s.check_invariants()
        plans.append(plan)
    raise AssertionError("did not drain")


def assert_all_free(s):
    sizes = instance_sizes(s)
    assert s.free_queues.free_per_instance() == [sizes[0] - 1, *sizes[1:]]


# ------------------------------------------------------------------ setup
def test_free_queue_replaces_vllm_and_splits_the_pool(config_model_dir, calibration_file):
    s = make_esp(config_model_dir, calibration_file, num_blocks=41, esp={"num_instances": 3})
    assert s.blocks_per_instance == 14
    assert s.kv_cache_manager.block_pool.free_block_queue is s.free_queues
    assert s.free_queues.free_per_instance() == [13, 14, 13]
    check_blocks(s)
    out, plan, _ = esp_step(s)
    assert plan.requests == () and plan.step == 0 and out.esp_plan is plan
    _, plan, _ = esp_step(s)
    assert plan.step == 1


# ------------------------------------------------------------------ prefill
def test_long_prompt_spans_instances_when_one_cannot_hold_it(config_model_dir, calibration_file):
    s = make_esp(config_model_dir, calibration_file, num_blocks=40)  # 20 + 20 blocks
    s.add_request(make_request("long", 400, 3))  # 25 blocks, one instance holds 20
    plans = []
    while s.requests["long"].num_computed_tokens < 400:
        _, plan, _ = esp_step(s)
        plans.append(plan)
    assert len(table(s, "long")) == 25
    assert set(instances(s, "long")) == {0, 1}
    # Fewest: the first instance is filled before the second one is used.
    ins = instances(s, "long")
    assert ins == sorted(ins, key=lambda i: ins.index(i))
    assert max(ins.count(0), ins.count(1)) == 20
    assert plans[-1].holders(plans[-1].requests[0]) == (0, 1)
    run(s)
    assert_all_free(s)


def test_scale_down_computes_on_all_and_stores_on_one(config_model_dir, calibration_file):
    s = make_esp(
        config_model_dir,
        calibration_file,
        esp={"prefill_target_ms": 0.001, "migrate_blocks_per_step": 0},
    )
    s.add_request(make_request("r", 200, 2))  # 13 blocks fit on one instance
    _, plan, _ = esp_step(s)
    (req,) = plan.requests
    assert req.compute == (0, 1) and len(req.token_ids) == 200
    assert len(set(instances(s, "r"))) == 1
    home = instances(s, "r")[0]
    other = 1 - home
    batches = [local_batch(plan, i) for i in range(2)]
    # A striped ring: half the tokens are computed away from their storage,
    # and home keeps them as the other instance's stripe passes (nothing
    # is shipped besides the ring's own traffic).
    assert not batches[other].ship_out and batches[other].store_rows == []
    (ring,) = batches[home].rings
    assert len(ring.keep_rows[ring.group.index(other)]) == 100
    assert len(batches[home].store_rows) == 100
    assert s.counters.num_multi_instance_prefills == 1
    run(s)
    assert_all_free(s)


def test_stripe_storage_deals_blocks_over_the_compute_instances(config_model_dir, calibration_file):
    s = make_esp(
        config_model_dir,
        calibration_file,
        esp={"prefill_target_ms": 0.001, "prefill_storage": "stripe", "migrate_blocks_per_step": 0},
    )
    s.add_request(make_request("r", 200, 2))
    _, plan, _ = esp_step(s)
    assert plan.requests[0].compute == (0, 1)
    assert instances(s, "r") == [0, 1] * 6 + [0]
    run(s)
    assert_all_free(s)


def test_single_instance_prefill_with_the_default_target(config_model_dir, calibration_file):
    s = make_esp(config_model_dir, calibration_file)
    s.add_request(make_request("r", 200, 2))
    _, plan, _ = esp_step(s)
    assert len(plan.requests[0].compute) == 1
    assert set(instances(s, "r")) == set(plan.requests[0].compute)
    assert s.counters.num_multi_instance_prefills == 0


# ------------------------------------------------------------------ decode
def test_decode_scale_up_zero_puts_new_blocks_on_another_instance(
    config_model_dir, calibration_file
):
    s = make_esp(
        config_model_dir,
        calibration_file,
        esp={"decode_scale_up_batch": 0, "migrate_blocks_per_step": 0},
    )
    s.add_request(make_request("r", 20, 61))  # KV of 20 + 60 tokens: 5 blocks
    seen = []
    while s.has_requests():
        esp_step(s)
        if "r" in s._manager.req_to_blocks:
            seen = instances(s, "r")
    assert len(seen) == 5
    # Prefill on one instance, then every block boundary moves to the other.
    assert seen[0] == seen[1]
    assert all(a != b for a, b in itertools.pairwise(seen[1:])), seen
    assert s.counters.num_scale_ups > 0
    assert_all_free(s)


def test_decode_stays_home_by_default(config_model_dir, calibration_file):
    s = make_esp(config_model_dir, calibration_file)
    s.add_request(make_request("r", 20, 61))
    seen = []
    while s.has_requests():
        esp_step(s)
        if "r" in s._manager.req_to_blocks:
            seen = instances(s, "r")
    assert len(seen) == 5 and len(set(seen)) == 1
    assert s.counters.num_scale_ups == 0


def test_consolidation_moves_blocks_to_the_largest_shard(config_model_dir, calibration_file):
    s = make_esp(
        config_model_dir,
        calibration_file,
        esp={"prefill_target_ms": 0.001, "prefill_storage": "stripe", "migrate_blocks_per_step": 4},
    )
    s.add_request(make_request("r", 200, 20))
    _, plan, _ = esp_step(s)
    assert plan.moves == ()  # no migration during prefill
    assert instances(s, "r").count(0) == 7 and instances(s, "r").count(1) == 6
    before = table(s, "r")
    _, plan, _ = esp_step(s)  # first decode: 4 blocks move 1 -> 0
    assert len(plan.moves) == 4
    after = table(s, "r")
    for move in plan.moves:
        assert instance_of(move.src, s.blocks_per_instance) == 1
        assert instance_of(move.dst, s.blocks_per_instance) == 0
        idx = before.index(move.src)
        assert after[idx] == move.dst  # vLLM's table points at the copy
    assert [b for b in after if b not in {m.dst for m in plan.moves}] == [
        b for b in before if b not in {m.src for m in plan.moves}
    ]
    assert instances(s, "r").count(0) == 11
    _, plan, _ = esp_step(s)  # the last two (the last block is already on 0)
    assert len(plan.moves) == 2
    assert set(instances(s, "r")) == {0}
    _, plan, _ = esp_step(s)
    assert plan.moves == ()
    assert s.counters.num_migrated_blocks == 6
    run(s)
    assert_all_free(s)


def test_consolidation_never_moves_a_shared_prefix_block(config_model_dir, calibration_file):
    s = make_esp(
        config_model_dir,
        calibration_file,
        num_blocks=60,
        enable_prefix_caching=True,
        esp={"prefill_target_ms": 0.001, "prefill_storage": "stripe", "migrate_blocks_per_step": 4},
    )
    prompt = [1 + i % 900 for i in range(200)]
    s.add_request(make_request("a", 200, 30, prompt_token_ids=prompt))
    esp_step(s)
    assert instances(s, "a") == [0, 1] * 6 + [0]
    # b hits a's 12 full prompt blocks: every block of a on instance 1 is
    # shared, so neither request may move one while both hold them.
    s.add_request(make_request("b", 200, 45, prompt_token_ids=prompt))
    while "a" in s._manager.req_to_blocks:
        _, plan, _ = esp_step(s)
        assert plan.moves == ()
        if "a" in s._manager.req_to_blocks:
            assert table(s, "a")[:12] == table(s, "b")[:12]
    # Once a is gone, b owns them alone and consolidates onto instance 0.
    moved = []
    while s.has_requests():
        _, plan, _ = esp_step(s)
        moved += plan.moves
        if "b" in s._manager.req_to_blocks:
            ins = instances(s, "b")
    assert len(moved) == 6 and set(ins) == {0}
    assert all(instance_of(m.dst, s.blocks_per_instance) == 0 for m in moved)
    check_blocks(s)


# ------------------------------------------------------------------ hostage bound
def long_prompt_chunks(s, rid: str = "long") -> list[tuple[int, int, tuple[int, ...], int]]:
    """(start, tokens, compute, decodes in the step) of each chunk of ``rid``."""
    chunks = []
    while s.requests[rid].num_computed_tokens < s.requests[rid].num_prompt_tokens:
        _, plan, _ = esp_step(s)
        s.check_invariants()
        (r,) = [r for r in plan.requests if r.req_id == rid]
        decodes = sum(1 for q in plan.requests if q.req_id != rid and len(q.token_ids) == 1)
        chunks.append((r.start, len(r.token_ids), r.compute, decodes))
    return chunks


@pytest.mark.parametrize("bound_ms", [1.5, 0])
def test_a_long_prompt_is_chunked_under_the_bound_while_short_requests_decode(
    config_model_dir, calibration_file, bound_ms
):
    s = make_esp(
        config_model_dir,
        calibration_file,
        num_blocks=200,
        max_num_batched_tokens=1024,
        esp={"max_decode_stall_ms": bound_ms},
    )
    s.add_request(make_request("s0", 20, 30))
    s.add_request(make_request("s1", 20, 30))
    esp_step(s)  # both prefill, then decode
    s.add_request(make_request("long", 600, 2))
    chunks = long_prompt_chunks(s)
    if bound_ms:
        # 1 ms + 200 x 0.01 ms = 3 ms on two instances: 1.5 ms each, the
        # bound; both short requests decode in every one of those steps.
        assert chunks == [(0, 200, (0, 1), 2), (200, 200, (0, 1), 2), (400, 200, (0, 1), 2)]
        assert s.last_esp_plan.max_decode_stall_s == 0.0015
        assert s.last_esp_plan.num_waiting_decodes == 2
    else:
        # No bound: one 600-token chunk (7 ms) on one instance holds both
        # decodes for its whole step.
        assert chunks == [(0, 600, chunks[0][2], 2)] and len(chunks[0][2]) == 1
        assert s.last_esp_plan.max_decode_stall_s is None
    run(s)
    assert_all_free(s)


def test_a_long_prompt_alone_is_not_chunked(config_model_dir, calibration_file):
    s = make_esp(
        config_model_dir,
        calibration_file,
        num_blocks=200,
        max_num_batched_tokens=1024,
        esp={"max_decode_stall_ms": 1.5},
    )
    s.add_request(make_request("long", 600, 2))
    # No decode waits: the whole prompt in one step, on one instance (7 ms
    # is within the 250 ms DoP target).
    ((start, num_tokens, compute, decodes),) = long_prompt_chunks(s)
    assert (start, num_tokens, len(compute), decodes) == (0, 600, 1, 0)
    assert s.last_esp_plan.num_waiting_decodes == 0
    run(s)
    assert_all_free(s)


def test_a_prefix_hit_is_cut_by_the_cost_of_its_own_context(config_model_dir, tmp_path):
    # With an attention term the bound buys fewer tokens after a long
    # context: the cut and the DoP must both see the prefix-cache hit.
    model = StepCostModel(alpha_s=1e-3, beta_s=1e-5, gamma_s=1e-7, source="calibrated")
    model.save(tmp_path / "attention.json")
    s = make_esp(
        config_model_dir,
        str(tmp_path / "attention.json"),
        num_blocks=300,
        max_num_batched_tokens=2048,
        enable_prefix_caching=True,
        esp={"max_decode_stall_ms": 3.0},
    )
    prompt = [1 + (i * 7) % 997 for i in range(1100)]
    s.add_request(make_request("a", 1100, 40, prompt_token_ids=prompt))
    esp_step(s)  # a alone: one chunk; then a decodes
    s.add_request(make_request("b", 1300, 2, prompt_token_ids=prompt[:1008] + [5] * 292))
    chunks = long_prompt_chunks(s, "b")
    # b starts after its 63 cached blocks; 44 tokens after 1008 cost
    # 1 + 0.44 + 0.0001 x 44 x (1008 + 22.5) = 5.97 ms: 3 ms on each of two.
    expected = bounded_prefill_chunk(model.chunk_time, 292, 1008, max_dop=2, max_stall_s=3e-3)
    assert expected == 44
    assert chunks[0] == (1008, 44, (0, 1), 1)
    # At an empty context the same 44 tokens fit on one instance (1.54 ms):
    # a DoP taken without the hit would break the bound.
    assert model.chunk_time(44, 0) <= 3e-3 < model.chunk_time(44, 1008) / 1
    run(s)


# ------------------------------------------------------------------ random workloads
@dataclass(frozen=True)
class Arrival:
    step: int
    num_prompt_tokens: int
    num_output_tokens: int
    abort_after: int | None


arrivals = st.lists(
    st.builds(
        Arrival,
        step=st.integers(0, 30),
        num_prompt_tokens=st.integers(1, 500),
        num_output_tokens=st.integers(1, 40),
        abort_after=st.one_of(st.none(), st.integers(0, 40)),
    ),
    min_size=1,
    max_size=12,
)

esp_settings = st.fixed_dictionaries(
    {
        "num_instances": st.integers(2, 3),
        "prefill_target_ms": st.sampled_from([0.001, 3.0, 250.0]),
        "prefill_storage": st.sampled_from(["fewest", "stripe"]),
        "decode_scale_up_batch": st.sampled_from([0, 1, 64]),
        "migrate_blocks_per_step": st.sampled_from([0, 1, 4]),
        # Random bounds, from cutting most chunks (0.5 ms) to off (0); every
        # step's plan is checked against it (check_invariants).
        "max_decode_stall_ms": st.sampled_from([None, 0, 0.5, 1.5, 3.0]),
        # LoongServe's scheduler answers placement from its cluster plan.
        "placement": st.sampled_from(["threshold", "loong"]),
    }
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload=arrivals,
    esp=esp_settings,
    num_blocks=st.integers(45, 90),
    max_num_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
)
def test_random_workloads_conserve_blocks_per_instance(
    config_model_dir,
    calibration_file,
    workload,
    esp,
    num_blocks,
    max_num_seqs,
    prefix_caching,
):
    s = make_esp(
        config_model_dir,
        calibration_file,
        num_blocks=num_blocks,
        esp=esp,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix_caching,
    )
    pending = sorted(enumerate(workload), key=lambda x: x[1].step)
    aborts: dict[int, list[str]] = {}
    finished: dict[str, int] = {}
    moved, multi = 0, False
    for step_index in range(3000):
        while pending and pending[0][1].step <= step_index:
            i, a = pending.pop(0)
            rid = f"r{i}"
            s.add_request(make_request(rid, a.num_prompt_tokens, a.num_output_tokens))
            if a.abort_after is not None:
                aborts.setdefault(step_index + a.abort_after, []).append(rid)
        for rid in aborts.pop(step_index, []):
            for req in s.finish_requests(rid, RequestStatus.FINISHED_ABORTED):
                finished[req.request_id] = finished.get(req.request_id, 0) + 1
            check_blocks(s)
        if not pending and not aborts and not s.has_requests():
            break
        _, plan, engine_outputs = esp_step(s)
        moved += len(plan.moves)
        spread = max((len(plan.holders(r)) for r in plan.requests), default=0)
        multi = multi or spread > 1
        s.check_invariants()
        for eco in engine_outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = finished.get(o.request_id, 0) + 1
    else:
        raise AssertionError("workload did not drain")
    assert set(finished) == {f"r{i}" for i in range(len(workload))}
    assert all(n == 1 for n in finished.values()), finished
    assert not s._manager.req_to_blocks
    assert_all_free(s)
    assert s.counters.num_migrated_blocks == moved
    if esp["migrate_blocks_per_step"] == 0:
        assert moved == 0
    event(f"migrated: {moved > 0}")
    event(f"KV on several instances: {multi}")
    event(f"rank preemptions: {s.num_rank_preemptions > 0}")
    event(f"scale-ups: {s.counters.num_scale_ups > 0}")
    if esp["placement"] == "loong":
        event(f"loong placements from its plan: {s.elastic.num_planned > 0}")


def test_loong_places_from_its_cluster_plan(config_model_dir, calibration_file):
    """``placement="loong"``: each step the scheduler hands the cluster view to
    the same ``LoongPolicy`` the simulator runs, and allocations follow its
    plan: a prompt no instance holds is computed on both and kept on both."""
    s = make_esp(config_model_dir, calibration_file, num_blocks=60, esp={"placement": "loong"})
    assert isinstance(s.elastic, LoongElasticPolicy)
    seen: list[ClusterView] = []
    original = s.elastic.policy.schedule

    def spy(view: ClusterView) -> ClusterPlan:
        seen.append(view)
        plan = original(view)
        plan.check_invariants(view)
        return plan

    s.elastic.policy.schedule = spy
    s.add_request(make_request("long", 40 * BLOCK_SIZE, 3))
    s.add_request(make_request("short", 2 * BLOCK_SIZE, 3))
    computes: set[tuple[int, ...]] = set()
    holders: set[int] = set()
    for _ in range(200):
        if not s.has_requests():
            break
        _, plan, _ = esp_step(s)
        for r in plan.requests:
            if r.req_id == "long" and r.start < 40 * BLOCK_SIZE:
                computes.add(r.compute)
                holders |= set(plan.holders(r))
    assert_all_free(s)
    view = seen[0]
    assert [w.req_id for w in view.waiting] == ["long", "short"]
    assert [i.capacity_tokens for i in view.instances] == [30 * BLOCK_SIZE] * 2
    assert s.elastic.num_planned > 0
    # 40 blocks: no instance holds the prompt; its chunks run on both.
    assert computes == {(0, 1)} and holders == {0, 1}
    # The very object that placed the engine's requests runs in the simulator.
    policy = s.elastic.policy
    policy.schedule = original
    trace = [SimRequest(f"q{i}", 0.01 * i, 40 * (i + 1), 3) for i in range(6)]
    sim = simulate(
        policy,
        trace,
        num_instances=2,
        capacity_tokens=30 * BLOCK_SIZE,
        truth=s.esp_cost,
        check=True,
    )
    assert len(sim.records) == 6 and not sim.unfinished
    # Residents reach the view with their KV per instance in tokens: each
    # instance's used tokens are its residents' tokens rounded up to whole
    # blocks (plus the null block on instance 0).
    assert any(v.running for v in seen)
    for v in seen:
        for inst in v.instances:
            held = [n for r in v.running for i, n in r.kv if i == inst.instance]
            rounded = sum(-(-n // BLOCK_SIZE) * BLOCK_SIZE for n in held)
            null = BLOCK_SIZE if inst.instance == 0 else 0
            assert sum(held) <= inst.used_tokens - null <= rounded + len(held) * BLOCK_SIZE


def test_loong_holds_back_a_prompt_its_compute_gate_defers(config_model_dir, calibration_file):
    """Step 1 admits in the engine: a prompt that needs both instances while a
    short request decodes on one is deferred by the compute gate (its gain
    does not pay for the decode's slowdown), so the engine holds it back
    until the decode ends instead of running it beside the decode; nothing
    held back ever starts, and with nothing resident nothing is held."""
    s = make_esp(config_model_dir, calibration_file, num_blocks=60, esp={"placement": "loong"})
    s.add_request(make_request("short", 2 * BLOCK_SIZE, 12))
    esp_step(s)
    assert s.elastic.held_back == frozenset()  # nothing was resident
    s.add_request(make_request("long", 40 * BLOCK_SIZE, 3))
    started: dict[str, int] = {}
    finished: dict[str, int] = {}
    num_held_steps = 0
    for step in range(200):
        if not s.has_requests():
            break
        out, _, engine_outputs = esp_step(s)
        s.check_invariants()
        held = s.elastic.held_back
        num_held_steps += "long" in held
        for req in out.scheduled_new_reqs:
            assert req.req_id not in held
            started.setdefault(req.req_id, step)
        for eco in engine_outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = step
    assert not s.has_requests() and set(finished) == {"short", "long"}
    assert num_held_steps > 0
    assert started["long"] > finished["short"]
    assert_all_free(s)


@pytest.mark.parametrize("num_instances", [2, 4])
def test_esp_stats_report_per_instance_free_blocks(
    config_model_dir, calibration_file, num_instances
):
    s = make_esp(
        config_model_dir, calibration_file, num_blocks=64, esp={"num_instances": num_instances}
    )
    s.add_request(make_request("r", 100, 3))
    esp_step(s)
    stats = s.plugin_stats()
    free = s.free_queues.free_per_instance()
    assert [
        stats[f"{STATS_PREFIX}esp_instance_free_blocks_{i}"] for i in range(num_instances)
    ] == free
    assert sum(free) == 64 - 1 - 7
    assert stats[f"{STATS_PREFIX}esp_request_steps_total"] == 1
    assert stats[f"{STATS_PREFIX}esp_request_instances_total"] == 1
    assert stats[f"{STATS_PREFIX}esp_migrated_blocks_total"] == 0


def test_scale_up_counter_counts_groups_grown(config_model_dir, calibration_file):
    s = make_esp(
        config_model_dir,
        calibration_file,
        esp={"decode_scale_up_batch": 0, "migrate_blocks_per_step": 0},
    )
    s.add_request(make_request("r", 20, 61))  # KV of 80 tokens: blocks 2, 3, 4 are new
    run(s)
    assert s.counters.num_scale_ups == 3


def test_counters_reach_the_plugin_stats(config_model_dir, calibration_file):
    s = make_esp(
        config_model_dir,
        calibration_file,
        esp={"prefill_target_ms": 0.001, "prefill_storage": "stripe"},
    )
    s.add_request(make_request("r", 200, 20))
    run(s)
    c = s.counters
    assert c.num_multi_instance_prefills == 1 and c.num_migrated_blocks == 6
    stats = s.plugin_stats()
    assert stats[f"{STATS_PREFIX}esp_multi_instance_prefills_total"] == 1
    assert stats[f"{STATS_PREFIX}esp_migrated_blocks_total"] == 6
    assert stats[f"{STATS_PREFIX}esp_request_steps_total"] == c.num_request_steps == 20
    assert stats[f"{STATS_PREFIX}esp_migrated_bytes_total"] == 6 * s.block_bytes > 0


# ------------------------------------------------------------------ any elastic policy
class StripeThenGather(ElasticPolicy):
    """A toy policy the scheduler knows only by name: prefills compute on
    every instance and stripe their KV; decodes run on ``home``; one block
    per step migrates to ``home``."""

    name = "stripe-then-gather"

    def __init__(self, num_instances: int, home: int) -> None:
        self.all = tuple(range(num_instances))
        self.home = home
        self.num_consolidate_calls = 0

    @classmethod
    def from_settings(
        cls,
        settings: ESPConfig,
        *,
        num_instances: int,
        prefill_time: PrefillTime,
        esp_cost: ESPCostModel,
    ) -> StripeThenGather:
        return cls(num_instances, home=num_instances - 1)

    def place(self, request: RequestPlacementView, loads: list[InstanceLoad]) -> StepPlacement:
        if request.is_prefill:
            return StepPlacement(self.all, StoragePlacement(self.all, stripe=True), "prefill")
        return StepPlacement((self.home,), StoragePlacement((self.home,)), "decode")

    def consolidate(
        self, request: RequestPlacementView, loads: list[InstanceLoad]
    ) -> Consolidation | None:
        self.num_consolidate_calls += 1
        assert not request.is_prefill
        for src, num_held in enumerate(request.blocks_per_instance):
            # The last block never moves (the step writes into it).
            num_movable = num_held - (src == request.last_block_instance)
            if src != self.home and num_movable > 0:
                return Consolidation(src, self.home, 1)
        return None


def test_a_registered_policy_drives_placement_and_migration(
    config_model_dir, calibration_file, monkeypatch
):
    monkeypatch.setitem(ELASTIC_POLICIES, StripeThenGather.name, StripeThenGather)
    s = make_esp(
        config_model_dir,
        calibration_file,
        num_blocks=60,
        esp={"num_instances": 3, "placement": StripeThenGather.name},
    )
    assert type(s.elastic) is StripeThenGather and s.elastic.home == 2
    s.add_request(make_request("r", 200, 20))  # 13 blocks
    _, plan, _ = esp_step(s)
    assert plan.requests[0].compute == (0, 1, 2) and plan.moves == ()
    assert instances(s, "r") == [0, 1, 2] * 4 + [0]
    moves = []
    while s.requests["r"].num_output_tokens < 12:
        _, plan, _ = esp_step(s)
        assert len(plan.moves) <= 1
        moves += plan.moves
    # One block per decode step onto instance 2; the prompt's last block
    # (on 0) follows once a decode block on 2 is the request's last.
    assert set(instances(s, "r")) == {2}
    assert len(moves) == 9 == s.counters.num_migrated_blocks
    assert all(instance_of(m.dst, s.blocks_per_instance) == 2 for m in moves)
    assert s.elastic.num_consolidate_calls >= 9
    run(s)
    assert_all_free(s)


# ------------------------------------------------------------ per-instance token budget
def test_a_chunk_on_two_instances_takes_both_instances_budgets(config_model_dir, calibration_file):
    """max_num_batched_tokens is per instance: a prefill on 2 instances
    computes twice it in one step, each instance its budget."""
    s = make_esp(
        config_model_dir,
        calibration_file,
        num_blocks=80,
        esp={"prefill_target_ms": 0.001, "migrate_blocks_per_step": 0},
        max_num_batched_tokens=256,
    )
    s.add_request(make_request("r", 700, 2, block_size=BLOCK_SIZE))
    out, plan, _ = esp_step(s)
    assert out.num_scheduled_tokens == {"r": 512}
    (req,) = plan.requests
    assert req.compute == (0, 1)
    assert [local_batch(plan, i).num_rows for i in (0, 1)] == [256, 256]
    run(s)
    assert_all_free(s)


def test_a_step_gives_each_instance_its_budget_and_no_more(config_model_dir, calibration_file):
    """Single-instance prefills on different instances each take their
    instance's budget in one step; a third one shares an instance's budget
    with the chunk already placed there."""
    s = make_esp(config_model_dir, calibration_file, num_blocks=80, max_num_batched_tokens=256)
    for rid in "abc":
        s.add_request(make_request(rid, 200, 2, block_size=BLOCK_SIZE))
    out, plan, _ = esp_step(s)
    per_instance = [0, 0]
    for req in plan.requests:
        assert len(req.compute) == 1
        per_instance[req.compute[0]] += len(req.token_ids)
    # Two full chunks side by side (stock vLLM's one budget would cut b to
    # 56 tokens), and c gets what is left on its instance.
    assert out.num_scheduled_tokens == {"a": 200, "b": 200, "c": 56}
    assert sorted(per_instance) == [200, 256]
    run(s)
    assert_all_free(s)


@pytest.mark.parametrize("placement", ["threshold", "loong"])
def test_a_prefix_hit_keeps_growing_where_its_blocks_are(
    config_model_dir, calibration_file, placement
):
    """A request admitted with a prefix-cache hit is placed knowing where the
    hit's blocks are: its KV never spans instances, under either policy (the
    loong plan, made before vLLM allocates, cannot see the hit)."""
    s = make_esp(
        config_model_dir,
        calibration_file,
        num_blocks=80,
        esp={"placement": placement},
        enable_prefix_caching=True,
    )
    prompt = list(range(1, 13 * BLOCK_SIZE + 1))
    for i in range(6):
        s.add_request(make_request(f"r{i}", len(prompt), 12, prompt_token_ids=prompt))
    spread: set[str] = set()
    for _ in range(400):
        if not s.has_requests():
            break
        out, _, _ = esp_step(s)
        spread |= {r for r in out.num_scheduled_tokens if len(set(instances(s, r))) > 1}
    assert_all_free(s)
    assert not spread
