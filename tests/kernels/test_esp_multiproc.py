"""ESP end to end on real gloo processes: ring prefill, multi-master decode, migration.

One 4-instance world is spawned per module. The parent plays the scheduler:
it owns the ``DistributedKVDirectory``, draws random batches, retention
plans, decode masters (scale-ups included) and migrations, and sends the
resulting plain-data plans to the instances. Each instance executes them
with its own paged KV pools and compares every attention output it produces
with single-instance float64 attention over the whole sequence. At the end
each instance checks that its pools hold exactly the tokens the directory
says they hold (so KV sits only where the plans put it).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from vllm_esp.core.esp.decode_plan import (
    DecodeStepPlan,
    assign_masters_fullest_first,
    plan_decode_step,
)
from vllm_esp.core.esp.directory import (
    DistributedKVDirectory,
    ESPCapacityError,
    KVPoolConfig,
    ShardView,
    cdiv,
)
from vllm_esp.core.esp.migration_plan import (
    MigrationPlan,
    plan_consolidation,
    plan_migration,
)
from vllm_esp.core.esp.ring_plan import (
    RetentionPlan,
    RingPrefillPlan,
    StripeLayout,
    schedule_ring_prefill,
)
from vllm_esp.kernels.attention import KVLayout, PagedKVCache
from vllm_esp.kernels.esp.decode import DecodeExecutor
from vllm_esp.kernels.esp.group import InstanceCluster, InstanceFailure, InstanceGroup
from vllm_esp.kernels.esp.migrate import execute_migration
from vllm_esp.kernels.esp.ring_prefill import RingPrefillExecutor

pytestmark = pytest.mark.multiproc

NUM_INSTANCES = 4
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}
HEAD_CONFIGS = [(4, 4), (4, 2), (8, 1)]  # (query heads, KV heads): MHA and GQA
CASES_PER_GROUP_SIZE = 24


@dataclass(frozen=True)
class Case:
    """One scheduler script: a ring prefill, then decode and migration steps."""

    seed: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    num_layers: int
    dtype: str
    layout: str
    block_size: int
    num_blocks: tuple[int, ...]
    req_ids: tuple[str, ...]
    num_prompt_tokens: tuple[int, ...]
    max_len: int
    prefill: RingPrefillPlan
    steps: tuple[tuple[str, DecodeStepPlan | MigrationPlan], ...]
    final_shards: tuple[tuple[str, ShardView], ...]


# ---------------------------------------------------------------------- scheduler side


def random_retention(
    rng: random.Random, group: tuple[int, ...], req_ids: list[str], lens: list[int]
) -> RetentionPlan:
    kept = [[[] for _ in req_ids] for _ in group]
    for j, n in enumerate(lens):
        cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 3)))) if n > 1 else []
        bounds = [0, *cuts, n]
        for b, e in itertools.pairwise(bounds):
            kept[rng.randrange(len(group))][j].append((b, e))
    for per_req in kept:
        for ranges in per_req:
            rng.shuffle(ranges)
    return RetentionPlan(
        group,
        tuple(req_ids),
        tuple(lens),
        tuple(tuple(tuple(rs) for rs in per_req) for per_req in kept),
    )


def decode_step(
    rng: random.Random, d: DistributedKVDirectory, req_ids: list[str]
) -> DecodeStepPlan:
    """Random masters: mostly instances already holding the request, sometimes new ones."""
    masters = {}
    for r in req_ids:
        pool = list(range(d.num_instances)) if rng.random() < 0.35 else list(d.instances(r))
        rng.shuffle(pool)
        fitting = [i for i in pool if d.can_append(r, i)] or [
            i for i in range(d.num_instances) if d.can_append(r, i)
        ]
        masters[r] = fitting[0]
    try:
        return plan_decode_step(d, masters)
    except ESPCapacityError:
        # Two requests picked the same nearly full instance: let the planner pick.
        return plan_decode_step(
            d, assign_masters_fullest_first(d, req_ids, tuple(range(d.num_instances)))
        )


def make_case(seed: int, group_size: int, long_prompt: bool = False) -> Case:
    rng = random.Random(seed)
    num_heads, num_kv_heads = HEAD_CONFIGS[seed % len(HEAD_CONFIGS)]
    head_size = (64, 128)[(seed // 3) % 2]
    block_size = rng.choice([1, 2, 4, 8])
    lens = [rng.randint(1, 40) for _ in range(rng.randint(1, 3))]
    if long_prompt:
        # Longer than the attention's 1024-key chunk, in 16-token blocks.
        block_size = 16
        lens[0] = rng.randint(1100, 1500)
    if seed % 4 == 0:
        lens[0] = rng.randint(1, group_size)  # shorter than (or as long as) the group
    num_steps = rng.randint(2, 4)
    req_ids = [f"s{seed}r{j}" for j in range(len(lens))]
    tight = rng.random() < 0.5
    need = sum(cdiv(n + num_steps, block_size) for n in lens)
    per_instance = cdiv(need, group_size) + (1 if tight else need) + 2
    d = DistributedKVDirectory(KVPoolConfig.uniform(NUM_INSTANCES, per_instance, block_size))
    # Filler KV (never read) so that "fullest first" has something to sort by.
    for f in range(rng.randint(0, 3)):
        inst = rng.randrange(NUM_INSTANCES)
        n = rng.randint(1, max(1, d.num_free_blocks(inst) * block_size // 3))
        d.allocate_prefill({f"filler{f}": n}, {f"filler{f}": {inst: [(0, n)]}})
    group = tuple(rng.sample(range(NUM_INSTANCES), group_size))
    retention = random_retention(rng, group, req_ids, lens) if rng.random() < 0.5 else None
    try:
        prefill = schedule_ring_prefill(d, req_ids, lens, group, retention)
    except ESPCapacityError:
        prefill = schedule_ring_prefill(d, req_ids, lens, group)
    steps: list[tuple[str, DecodeStepPlan | MigrationPlan]] = []
    for _ in range(num_steps):
        if rng.random() < 0.25:  # an empty participant, as a scale-up leaves behind
            d.register(rng.choice(req_ids), rng.randrange(NUM_INSTANCES))
        if rng.random() < 0.4:
            r = rng.choice(req_ids)
            src = rng.choice(d.holders(r))
            dst = rng.choice([i for i in range(NUM_INSTANCES) if i != src])
            n = rng.randint(1, d.num_local_tokens(r, src))
            with contextlib.suppress(ESPCapacityError):  # dst full: no migration this step
                steps.append(("migrate", plan_migration(d, [(r, src, dst, n)], rng.randint(1, 8))))
        elif rng.random() < 0.2:
            result = plan_consolidation(d, tuple(range(NUM_INSTANCES)), rng.randint(1, 8))
            if result is not None:
                steps.append(("migrate", result[1]))
        steps.append(("decode", decode_step(rng, d, req_ids)))
        d.check_invariants()
    final = tuple((r, d.shard(r, i)) for r in req_ids for i in d.instances(r))
    return Case(
        seed,
        num_heads,
        num_kv_heads,
        head_size,
        rng.choice([1, 2]),
        "bfloat16" if seed % 5 == 4 else "float32",
        rng.choice(["CPU", "FLASH"]),
        block_size,
        d.config.num_blocks_per_instance,
        tuple(req_ids),
        tuple(lens),
        max(lens) + num_steps,
        prefill,
        tuple(steps),
        final,
    )


# ----------------------------------------------------------------------- instance side


def make_inputs(case: Case) -> list[list[tuple[torch.Tensor, ...]]]:
    """``[layer][req] -> (q, k, v)`` over all positions, identical on every process."""
    gen = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    out = []
    for _ in range(case.num_layers):
        per_req = []
        for _ in case.req_ids:
            q = torch.randn(case.max_len, case.num_heads, case.head_size, generator=gen)
            k = torch.randn(case.max_len, case.num_kv_heads, case.head_size, generator=gen)
            v = torch.randn(case.max_len, case.num_kv_heads, case.head_size, generator=gen)
            per_req.append((q.to(dtype), k.to(dtype), v.to(dtype)))
        out.append(per_req)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Single-instance causal attention in float64 over the whole sequence."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    n = q.shape[0]
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return float("inf")
    if out.numel() == 0:
        return 0.0
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def run_cases(group: InstanceGroup, cases: list[Case]) -> list[dict]:
    return [run_case(group, case) for case in cases]


def run_case(group: InstanceGroup, case: Case) -> dict:
    me = group.instance_id
    scale = case.head_size**-0.5
    inputs = make_inputs(case)
    refs = [[reference(q, k, v, scale) for q, k, v in per_req] for per_req in inputs]
    caches = [
        PagedKVCache.allocate(
            case.num_blocks[me],
            case.block_size,
            case.num_kv_heads,
            case.head_size,
            getattr(torch, case.dtype),
            "cpu",
            KVLayout[case.layout],
        )
        for _ in range(case.num_layers)
    ]
    result: dict = {
        "max_err": 0.0,
        "num_prefill_rows": 0,
        "num_decode_rows": 0,
        "bytes": Counter(),
        "placement_errors": [],
        "first_token_rows": [],
    }

    def check(out: torch.Tensor, ref: torch.Tensor) -> None:
        result["max_err"] = max(result["max_err"], rel_err(out, ref))

    if me in case.prefill.group:
        ex = RingPrefillExecutor(group, case.prefill)
        stripes = StripeLayout(len(case.prefill.group), case.num_prompt_tokens)
        r = case.prefill.group.index(me)
        rows = [
            torch.tensor(list(stripes.positions(r, j)), dtype=torch.int64)
            for j in range(len(case.req_ids))
        ]
        before = group.num_bytes_sent
        for layer in range(case.num_layers):
            q, k, v = (
                torch.cat([inputs[layer][j][t][rows_j] for j, rows_j in enumerate(rows)])
                for t in range(3)
            )
            out = ex.forward_layer(q, k, v, caches[layer], scale)
            check(out, torch.cat([refs[layer][j][rows_j] for j, rows_j in enumerate(rows)]))
            result["num_prefill_rows"] += out.shape[0]
        result["bytes"]["prefill"] += group.num_bytes_sent - before
        result["first_token_rows"] = [
            (j, int(ex.q_positions[row])) for j, row in ex.last_token_rows
        ]
    for kind, plan in case.steps:
        before = group.num_bytes_sent
        if kind == "migrate":
            execute_migration(group, plan, caches)
        else:
            ex = DecodeExecutor(group, plan)
            mine = [plan.requests[i] for i in ex.schedule.mastered]
            idx = [case.req_ids.index(req.req_id) for req in mine]
            for layer in range(case.num_layers):
                q, k, v = (
                    torch.stack([inputs[layer][j][t][req.position] for j, req in zip(idx, mine)])
                    if mine
                    else inputs[layer][0][t][:0]
                    for t in range(3)
                )
                out = ex.forward_layer(q, k, v, caches[layer], scale)
                if mine:
                    check(
                        out,
                        torch.stack([refs[layer][j][req.position] for j, req in zip(idx, mine)]),
                    )
                result["num_decode_rows"] += len(mine)
        result["bytes"][kind] += group.num_bytes_sent - before
    for req_id, shard in case.final_shards:
        if shard.instance != me or shard.num_tokens == 0:
            continue
        j = case.req_ids.index(req_id)
        bs = case.block_size
        slots = torch.tensor(
            [shard.block_ids[t // bs] * bs + t % bs for t in range(shard.num_tokens)]
        )
        positions = shard.positions()
        for layer, cache in enumerate(caches):
            k, v, pos = cache.gather_slots(slots)
            _, k_ref, v_ref = inputs[layer][j]
            if (
                pos.tolist() != positions
                or not torch.equal(k, k_ref[positions])
                or not torch.equal(v, v_ref[positions])
            ):
                result["placement_errors"].append((req_id, me, layer))
    return result


# ------------------------------------------------------------------------------- checks


def expected_bytes(case: Case) -> Counter:
    """Payload bytes the protocol must move, summed over instances (what we count)."""
    elt = getattr(torch, case.dtype).itemsize
    kv_row = 2 * case.num_kv_heads * case.head_size * elt + 8  # K, V and the int64 position
    n = len(case.prefill.group)
    # Ring: every block makes N-1 hops, so the whole prompt's KV moves N-1 times;
    # retention copies ride along and add nothing.
    total = Counter(prefill=(n - 1) * sum(case.num_prompt_tokens) * kv_row * case.num_layers)
    for kind, plan in case.steps:
        if kind == "decode":
            # Per participant: the query out, an fp32 (out, lse) back.
            per_participant = (
                case.num_heads * case.head_size * elt + case.num_heads * (case.head_size + 1) * 4
            )
            total["decode"] += (
                sum(len(r.participants) for r in plan.requests) * per_participant * case.num_layers
            )
        else:
            total["migrate"] += plan.num_tokens * (
                case.num_layers * 2 * case.num_kv_heads * case.head_size * elt + 8
            )
    return total


def run_and_check(cluster: InstanceCluster, cases: list[Case]) -> None:
    check_results(cases, cluster.run(run_cases, cases))


def check_results(cases: list[Case], per_instance: list[list[dict]]) -> None:
    for c, case in enumerate(cases):
        results = [per_instance[i][c] for i in range(NUM_INSTANCES)]
        label = f"case seed={case.seed} group={case.prefill.group} lens={case.num_prompt_tokens}"
        max_err = max(r["max_err"] for r in results)
        assert max_err < TOLERANCE[case.dtype], f"{label}: relative error {max_err:.2e}"
        assert (
            sum(r["num_prefill_rows"] for r in results)
            == sum(case.num_prompt_tokens) * case.num_layers
        ), label
        num_decoded = sum(len(p.requests) for k, p in case.steps if k == "decode")
        assert sum(r["num_decode_rows"] for r in results) == num_decoded * case.num_layers, label
        assert not [e for r in results for e in r["placement_errors"]], label
        moved = sum((r["bytes"] for r in results), Counter())
        assert moved == expected_bytes(case), label
        # The first output token comes from the rank holding the last prompt token.
        first = sorted(
            (j, pos, i) for i, r in enumerate(results) for j, pos in r["first_token_rows"]
        )
        layout = StripeLayout(len(case.prefill.group), case.num_prompt_tokens)
        assert first == [
            (j, n - 1, case.prefill.group[layout.last_token_rank(j)])
            for j, n in enumerate(case.num_prompt_tokens)
        ], label


@pytest.fixture(scope="module")
def cluster():
    with InstanceCluster(NUM_INSTANCES, timeout_s=180.0) as c:
        yield c


def coverage(cases: list[Case]) -> Counter:
    seen: Counter = Counter()
    for case in cases:
        ret = case.prefill.retention
        seen["short_request"] += any(n < len(ret.group) for n in case.num_prompt_tokens)
        seen["scaled_down"] += len(ret.retaining_group()) < len(ret.group)
        seen["gqa"] += case.num_heads != case.num_kv_heads
        seen[f"head_size_{case.head_size}"] += 1
        seen[case.dtype] += 1
        for kind, plan in case.steps:
            seen[kind] += 1
            if kind == "decode":
                seen["empty_participant"] += any(
                    s.num_tokens == 0 for r in plan.requests for s in r.shards
                )
                seen["multi_master"] += len(plan.masters) > 1
    return seen


@pytest.mark.parametrize("group_size", [1, 2, 3, 4])
def test_ring_prefill_decode_migration_match_single_instance(cluster, group_size: int) -> None:
    cases = [
        make_case(1000 * group_size + s, group_size, long_prompt=s == 0)
        for s in range(CASES_PER_GROUP_SIZE)
    ]
    run_and_check(cluster, cases)
    # The random scripts must actually exercise what the issue asks for.
    seen = coverage(cases)
    must = [
        "decode",
        "migrate",
        "gqa",
        "head_size_64",
        "head_size_128",
        "empty_participant",
        "multi_master",
        "bfloat16",
    ]
    if group_size > 1:
        must += ["short_request", "scaled_down"]
    assert all(seen[m] for m in must), seen


def test_request_larger_than_any_pool_is_served_by_a_group(cluster) -> None:
    """A 92-token prompt with 32-token pools: prefilled over 3, decoded with scale-up."""
    block_size, num_blocks = 4, 8
    d = DistributedKVDirectory(KVPoolConfig.uniform(NUM_INSTANCES, num_blocks, block_size))
    group = (2, 0, 1)
    prefill = schedule_ring_prefill(d, ["big"], [92], group)
    assert d.config.num_capacity_tokens(0) < 92
    assert len(prefill.retention.retaining_group()) == 3
    steps: list[tuple[str, DecodeStepPlan | MigrationPlan]] = []
    decode_group = list(group)
    masters_used = set()
    for _ in range(6):
        try:
            masters = assign_masters_fullest_first(d, ["big"], decode_group)
        except ESPCapacityError:
            decode_group.append(3)  # the memory deficit triggers scale-up to instance 3
            masters = assign_masters_fullest_first(d, ["big"], decode_group)
        masters_used.add(masters["big"])
        steps.append(("decode", plan_decode_step(d, masters)))
    d.check_invariants()
    assert masters_used == {1, 3} and d.num_tokens("big") == 98
    case = Case(
        7,
        4,
        2,
        64,
        1,
        "float32",
        "FLASH",
        block_size,
        d.config.num_blocks_per_instance,
        ("big",),
        (92,),
        98,
        prefill,
        tuple(steps),
        tuple(("big", d.shard("big", i)) for i in d.instances("big")),
    )
    run_and_check(cluster, [case])
    with pytest.raises(ESPCapacityError, match="does not fit"):
        schedule_ring_prefill(d, ["too_big"], [200], (0, 1, 2, 3))


def run_cases_on_stateless_group(group: InstanceGroup, port: int, cases: list[Case]) -> list[dict]:
    """The same cases over a group torch.distributed does not know (vLLM's stateless one)."""
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    pg = stateless_init_torch_distributed_process_group(
        "127.0.0.1", port, group.instance_id, group.num_instances, "gloo"
    )
    stateless = InstanceGroup(pg)
    results = run_cases(stateless, cases)
    stateless.barrier()  # nobody tears the store down while a peer still uses it
    return results


def test_executors_run_on_vllm_stateless_process_group(cluster) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [make_case(5000 + s, group_size) for s, group_size in enumerate((2, 3, 4))]
    check_results(cases, cluster.run(run_cases_on_stateless_group, port, cases))


def fail_on_instance_one(group: InstanceGroup) -> int:
    if group.instance_id == 1:
        raise RuntimeError("deliberate failure on instance 1")
    return group.instance_id


def test_cluster_reports_remote_failure_and_recovers(cluster) -> None:
    with pytest.raises(InstanceFailure, match="deliberate failure on instance 1"):
        cluster.run(fail_on_instance_one)
    # The next call starts a fresh world.
    assert cluster.run(instance_ids) == list(range(NUM_INSTANCES))


def instance_ids(group: InstanceGroup) -> int:
    group.barrier()
    return group.instance_id
