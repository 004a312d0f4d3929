"""The engine's ESP step on real processes: ``ESPStepContext`` over 3 gloo instances.

Seeded random plans mix what the engine serves: striped-ring prefill chunks
(DoP 2 or 3, with and without context from earlier steps, that context
rotated with the ring or attended where it is stored, KV kept inside or
outside the ring), queries-to-KV chunks whose KV spans instances, and
decodes. Every instance builds its ``local_batch`` of the same plan and runs
one attention layer through ``ESPStepContext.attend`` (the exchanges, the
ring, the LSE merges); the test then checks, against a single-process
float64 reference over every key:

* every row's output (each query sees exactly its request's keys
  ``<= its position``, whichever instances computed or store them);
* every token of every request sits at its block-table slot, with its
  position, on its storage instance (stored, shipped or kept from a passing
  stripe), and nothing else was written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from vllm_esp.core.esp.step_plan import (
    ESPStepPlan,
    RequestStep,
    instance_of,
    local_batch,
    local_block,
)
from vllm_esp.kernels.esp.group import InstanceCluster

pytestmark = [pytest.mark.multiproc]

NUM_INSTANCES = 3
BLOCK_SIZE = 4
BLOCKS_PER_INSTANCE = 24
NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE = 4, 2, 16
NUM_CASES = 36


@dataclass(frozen=True)
class Case:
    seed: int
    plan: ESPStepPlan
    dtype: torch.dtype


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    free = list(range(NUM_INSTANCES * BLOCKS_PER_INSTANCE))
    rng.shuffle(free)
    requests = []
    kinds = ["ring", "ring_prior", "spread", "decode"]
    for r in range(rng.randint(1, 4)):
        kind = rng.choice(kinds) if r else kinds[seed % len(kinds)]
        start = 0 if kind == "ring" else rng.randint(1, 30)
        length = 1 if kind == "decode" else rng.randint(1, 26)
        dop = rng.randint(2, NUM_INSTANCES) if kind.startswith("ring") else 1
        compute = tuple(rng.sample(range(NUM_INSTANCES), dop))
        num_blocks = -(-(start + length) // BLOCK_SIZE)
        if rng.random() < 0.5:  # fewest: one instance's blocks where possible
            home = rng.randrange(NUM_INSTANCES)
            mine = [b for b in free if instance_of(b, BLOCKS_PER_INSTANCE) == home]
            table = (mine + [b for b in free if b not in mine])[:num_blocks]
        else:
            table = free[:num_blocks]
        free = [b for b in free if b not in table]
        requests.append(
            RequestStep(
                req_id=f"r{r}",
                start=start,
                token_ids=tuple(range(length)),
                block_ids=tuple(table),
                compute=compute,
            )
        )
    plan = ESPStepPlan(
        step=0,
        num_instances=NUM_INSTANCES,
        blocks_per_instance=BLOCKS_PER_INSTANCE,
        block_size=BLOCK_SIZE,
        requests=tuple(requests),
        ring_context_min_tokens=(None, 1, 8)[seed % 3],
    )
    return Case(seed, plan, torch.bfloat16 if seed % 4 == 3 else torch.float32)


def tensors(case: Case) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per request: q of the step's tokens, k and v of positions [0, end)."""
    gen = torch.Generator().manual_seed(case.seed)
    out = {}
    for req in case.plan.requests:
        q = torch.randn(len(req.token_ids), NUM_HEADS, HEAD_SIZE, generator=gen)
        k = torch.randn(req.end, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
        v = torch.randn(req.end, NUM_KV_HEADS, HEAD_SIZE, generator=gen)
        out[req.req_id] = (q.to(case.dtype), k.to(case.dtype), v.to(case.dtype))
    return out


class _Layer:
    layer_name = "layer.0"


def run_case(group, case: Case) -> dict:
    """One instance's share of ``case``: the attention rows it computed and
    its cache contents (runs in the cluster's processes)."""
    from vllm_esp.integration.esp.step_context import ESPStepContext, KVCacheRegistry
    from vllm_esp.kernels.attention import KVLayout, PagedKVCache

    me, plan = group.instance_id, case.plan
    bs, nb = plan.block_size, plan.blocks_per_instance
    data = tensors(case)
    kv = PagedKVCache.allocate(
        nb, bs, NUM_KV_HEADS, HEAD_SIZE, case.dtype, "cpu", KVLayout.FLASH
    ).kv_cache
    caches = KVCacheRegistry(KVLayout.FLASH)
    cache = caches.get(_Layer(), kv)
    for req in plan.requests:  # context of earlier steps, where it is stored
        _, k, v = data[req.req_id]
        for pos in range(req.start):
            block = req.block_ids[pos // bs]
            if instance_of(block, nb) == me:
                slot = torch.tensor([local_block(block, nb) * bs + pos % bs])
                cache.write(slot, k[pos : pos + 1], v[pos : pos + 1], torch.tensor([pos]))
    batch = local_batch(plan, me)
    rows: list[tuple[str, int]] = []
    for req in plan.requests:
        rows += [
            (req.req_id, req.start + i)
            for i in range(len(req.token_ids))
            if req.compute_instance(i) == me
        ]
    q = torch.stack([data[r][0][pos - plan_start(plan, r)] for r, pos in rows]) if rows else None
    k = torch.stack([data[r][1][pos] for r, pos in rows]) if rows else None
    v = torch.stack([data[r][2][pos] for r, pos in rows]) if rows else None
    if q is None or k is None or v is None:  # a padding row, as the runner adds
        q = torch.zeros(1, NUM_HEADS, HEAD_SIZE, dtype=case.dtype)
        k = v = torch.zeros(1, NUM_KV_HEADS, HEAD_SIZE, dtype=case.dtype)
    ctx = ESPStepContext(batch, group, caches, torch.device("cpu"))
    out = ctx.attend(_Layer(), q, k, v, kv, HEAD_SIZE**-0.5)
    written = torch.nonzero(cache.positions >= 0).flatten().tolist()
    return {
        "rows": rows,
        "out": out.float(),
        "slots": {s: int(cache.positions[s]) for s in written},
        "k": {s: cache.gather_slots(torch.tensor([s]))[0][0].float() for s in written},
        "v": {s: cache.gather_slots(torch.tensor([s]))[1][0].float() for s in written},
        "num_ring_rows": sum(len(share.rows) for share in batch.rings),
    }


def plan_start(plan: ESPStepPlan, req_id: str) -> int:
    return next(r.start for r in plan.requests if r.req_id == req_id)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query row ``[Hq, D]`` over keys ``[n, Hkv, D]`` in float64."""
    group = NUM_HEADS // NUM_KV_HEADS
    k = k.double().repeat_interleave(group, dim=1)  # [n, Hq, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.double(), k) * HEAD_SIZE**-0.5
    return torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)


def check(case: Case, results: list[dict]) -> None:
    plan, data = case.plan, tensors(case)
    bs, nb = plan.block_size, plan.blocks_per_instance
    label = f"seed {case.seed}: {plan.requests}"
    tol = 2e-2 if case.dtype == torch.bfloat16 else 1e-4
    for result in results:
        for row, (req_id, pos) in enumerate(result["rows"]):
            q, k, v = data[req_id]
            want = reference(q[pos - plan_start(plan, req_id)], k[: pos + 1], v[: pos + 1])
            err = (result["out"][row].double() - want).abs().max().item()
            assert err < tol, f"{label}: row {req_id}@{pos} off by {err:.2e}"
    expected: dict[tuple[int, int], tuple[str, int]] = {}
    for req in plan.requests:
        for pos in range(req.end):
            block = req.block_ids[pos // bs]
            slot = local_block(block, nb) * bs + pos % bs
            expected[(instance_of(block, nb), slot)] = (req.req_id, pos)
    stored = {(i, s): p for i, r in enumerate(results) for s, p in r["slots"].items()}
    assert stored == {key: pos for key, (_, pos) in expected.items()}, label
    for (inst, slot), (req_id, pos) in expected.items():
        _, k, v = data[req_id]
        assert torch.equal(results[inst]["k"][slot], k[pos].float()), f"{label}: K {req_id}@{pos}"
        assert torch.equal(results[inst]["v"][slot], v[pos].float()), f"{label}: V {req_id}@{pos}"


@pytest.fixture(scope="module")
def cluster():
    with InstanceCluster(NUM_INSTANCES, timeout_s=180.0) as c:
        yield c


def test_served_step_matches_single_instance_attention_and_stores_every_token(cluster) -> None:
    cases = [make_case(seed) for seed in range(NUM_CASES)]
    seen = {
        "ring": 0,
        "ring_prior": 0,
        "ring_rotates_context": 0,
        "context_outside_ring": 0,
        "kept_outside_ring": 0,
        "spread": 0,
        "bf16": 0,
    }
    for case in cases:
        results = cluster.run(run_case, case)
        check(case, results)
        for req in case.plan.requests:
            ring = len(req.compute) > 1
            holders = set(case.plan.holders(req))
            seen["ring"] += ring
            seen["ring_prior"] += ring and req.start > 0
            seen["ring_rotates_context"] += case.plan.rotates_context(req)
            seen["context_outside_ring"] += case.plan.rotates_context(req) and bool(
                set(case.plan.holders(req, req.start)) - set(req.compute)
            )
            seen["kept_outside_ring"] += ring and bool(holders - set(req.compute))
            seen["spread"] += not ring and len(holders) > 1
        seen["bf16"] += case.dtype == torch.bfloat16
        assert sum(r["num_ring_rows"] for r in results) == sum(
            len(r.token_ids) for r in case.plan.requests if len(r.compute) > 1
        )
    # The seeded plans exercise every path of the served step.
    assert all(count > 0 for count in seen.values()), seen


def fail_on_instance_one(group) -> int:
    if group.instance_id == 1:
        raise RuntimeError("deliberate failure on instance 1")
    return group.instance_id


def instance_ids(group) -> int:
    group.barrier()
    return group.instance_id


def test_cluster_reports_remote_failure_and_recovers(cluster) -> None:
    from vllm_esp.kernels.esp.group import InstanceFailure

    with pytest.raises(InstanceFailure, match="deliberate failure on instance 1"):
        cluster.run(fail_on_instance_one)
    # The next call starts a fresh world.
    assert cluster.run(instance_ids) == list(range(NUM_INSTANCES))
