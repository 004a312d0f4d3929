"""ESP core on CPU: ring prefill speed-up, bytes on the wire, servable context.

    python -m benchmarks.esp_core [--quick] [--seed 0] --out FILE.json

Runs two real instances (spawned processes, gloo, one torch thread each so
an instance is one core) and measures, for one attention layer with
``NUM_HEADS`` query heads, ``NUM_KV_HEADS`` KV heads, head size
``HEAD_SIZE``, fp32, block size ``BLOCK_SIZE``:

1. **Ring prefill time** of one long prompt at group size 1 (instance 0
   alone, the other idle) and 2 (both). Timed between two world barriers
   around ``RingPrefillExecutor.forward_layer`` (ring transfers, attention,
   merge and the retention copy into the paged pool); the plan and the
   per-rank schedule are built before the clock starts. ``speedup`` is
   ``t(1) / t(2)``, medians over ``--reps`` repetitions. Because the
   cores may be shared with other work, the CPU seconds of the busiest
   instance are recorded too (``cpu_time_ratio_...``: how much the
   per-instance work shrank, independent of contention).
2. **Bytes per layer**. What is counted: the payload handed to
   ``isend`` (K, V and the int64 position of every token in the block),
   summed over instances; gloo framing is not included. Ring theory: each
   block makes ``N - 1`` hops, so the prompt's KV crosses the wire
   ``N - 1`` times: ``(N - 1) * L * (2 * Hkv * D * 4 + 8)`` bytes (each rank
   sends ``(N-1)/N`` of the prompt's KV). With a retention plan the bytes
   are unchanged (scale-down adds nothing). Decode theory, per participant
   of each request: the query out (``Hq * D * 4``) and the fp32 partial
   back (``Hq * (D + 1) * 4``), independent of the context length.
3. **Largest servable context** with fixed per-instance pools
   (``--pool-blocks`` blocks of ``BLOCK_SIZE``): the longest prompt for
   which the planner finds a ring prefill plus one decode step, at group
   sizes 1 and 2 (binary search over the real planner and directory), then
   run for real at that length with the decode output checked against
   float64 attention, and one token more shown to raise ``ESPCapacityError``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.common import finish_metadata, run_metadata, write_json
from vllm_esp.core.esp.decode_plan import (
    DecodeStepPlan,
    assign_masters_fullest_first,
    plan_decode_step,
)
from vllm_esp.core.esp.directory import (
    DistributedKVDirectory,
    ESPCapacityError,
    KVPoolConfig,
)
from vllm_esp.core.esp.ring_plan import (
    RetentionPlan,
    RingPrefillPlan,
    StripeLayout,
    schedule_ring_prefill,
)
from vllm_esp.kernels.attention import KVLayout, PagedKVCache
from vllm_esp.kernels.esp.decode import DecodeExecutor
from vllm_esp.kernels.esp.group import InstanceCluster, InstanceGroup
from vllm_esp.kernels.esp.ring_prefill import RingPrefillExecutor

NUM_INSTANCES = 2
NUM_HEADS = 8
NUM_KV_HEADS = 8
HEAD_SIZE = 64
BLOCK_SIZE = 16
DTYPE = torch.float32
KV_ROW_BYTES = 2 * NUM_KV_HEADS * HEAD_SIZE * DTYPE.itemsize + 8  # K, V, int64 position
DECODE_BYTES_PER_PARTICIPANT = (
    NUM_HEADS * HEAD_SIZE * DTYPE.itemsize + NUM_HEADS * (HEAD_SIZE + 1) * 4
)


def _sequence(seed: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, NUM_HEADS, HEAD_SIZE, generator=gen),
        torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=gen),
        torch.randn(num_tokens, NUM_KV_HEADS, HEAD_SIZE, generator=gen),
    )


def _prefill_plan(
    num_tokens: int, group: tuple[int, ...], num_blocks: int, retention: str, req_id: str = "req"
) -> tuple[DistributedKVDirectory, RingPrefillPlan]:
    d = DistributedKVDirectory(KVPoolConfig.uniform(NUM_INSTANCES, num_blocks, BLOCK_SIZE))
    plan = None
    if retention == "halves" and len(group) > 1:
        # Keep contiguous halves: both instances stay (no scale-down).
        bounds = [num_tokens * r // len(group) for r in range(len(group) + 1)]
        plan = RetentionPlan(
            group,
            (req_id,),
            (num_tokens,),
            tuple((((bounds[r], bounds[r + 1]),),) for r in range(len(group))),
        )
    return d, schedule_ring_prefill(d, [req_id], [num_tokens], group, plan)


# --------------------------------------------------------------------- instance side


def time_prefill(
    group: InstanceGroup,
    plan: RingPrefillPlan,
    seed: int,
    num_tokens: int,
    num_blocks: int,
    reps: int,
) -> dict[str, Any]:
    me = group.instance_id
    member = me in plan.group
    if member:
        cache = PagedKVCache.allocate(
            num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, DTYPE, "cpu", KVLayout.FLASH
        )
        t0 = time.perf_counter()
        ex = RingPrefillExecutor(group, plan)
        schedule_s = time.perf_counter() - t0
        rows = torch.tensor(
            list(StripeLayout(len(plan.group), (num_tokens,)).positions(plan.group.index(me), 0)),
            dtype=torch.int64,
        )
        q, k, v = (t[rows] for t in _sequence(seed, num_tokens))
    times, cpu_times = [], []
    for _ in range(reps):
        group.barrier()
        group.reset_counters()
        t0, c0 = time.perf_counter(), time.process_time()
        if member:
            ex.forward_layer(q, k, v, cache, HEAD_SIZE**-0.5)
        cpu_times.append(time.process_time() - c0)
        group.barrier()
        times.append(time.perf_counter() - t0)
    return {
        "times_s": times,
        "cpu_times_s": cpu_times,
        "bytes_sent": group.num_bytes_sent,
        "schedule_build_s": schedule_s if member else 0.0,
    }


def run_decode(
    group: InstanceGroup,
    prefill_plan: RingPrefillPlan,
    decode_plan: DecodeStepPlan,
    seed: int,
    num_tokens: int,
    num_blocks: int,
    check: bool,
) -> dict[str, Any]:
    """Prefill one request, then one decode step; optionally check the decode output."""
    me = group.instance_id
    scale = HEAD_SIZE**-0.5
    cache = PagedKVCache.allocate(
        num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE, DTYPE, "cpu", KVLayout.FLASH
    )
    q_all, k_all, v_all = _sequence(seed, num_tokens + 1)
    if me in prefill_plan.group:
        rows = torch.tensor(
            list(
                StripeLayout(len(prefill_plan.group), (num_tokens,)).positions(
                    prefill_plan.group.index(me), 0
                )
            ),
            dtype=torch.int64,
        )
        RingPrefillExecutor(group, prefill_plan).forward_layer(
            q_all[rows], k_all[rows], v_all[rows], cache, scale
        )
    group.barrier()
    group.reset_counters()
    ex = DecodeExecutor(group, decode_plan)
    mastered = [decode_plan.requests[i] for i in ex.schedule.mastered]
    pos = [r.position for r in mastered]
    t0 = time.perf_counter()
    out = ex.forward_layer(q_all[pos], k_all[pos], v_all[pos], cache, scale)
    decode_s = time.perf_counter() - t0
    err = None
    if check and mastered:
        # float64 single-instance attention of the new token over all keys.
        p = pos[0]
        scores = torch.einsum("hd,khd->hk", q_all[p].double(), k_all[: p + 1].double()) * scale
        ref = torch.einsum("hk,khd->hd", scores.softmax(-1), v_all[: p + 1].double())
        err = float((out[0].double() - ref).abs().max() / ref.abs().max())
    return {"bytes_sent": group.num_bytes_sent, "decode_s": decode_s, "rel_err": err}


# ----------------------------------------------------------------------- parent side


def bench_prefill(
    cluster: InstanceCluster, lengths: list[int], reps: int, seed: int
) -> list[dict[str, Any]]:
    rows = []
    for num_tokens in lengths:
        num_blocks = -(-num_tokens // BLOCK_SIZE)
        row: dict[str, Any] = {"num_prompt_tokens": num_tokens}
        for group in ((0,), (0, 1)):
            retentions = ("fullest_first", "halves") if len(group) > 1 else ("fullest_first",)
            for retention in retentions:
                _, plan = _prefill_plan(num_tokens, group, num_blocks, retention)
                res = cluster.run(time_prefill, plan, seed, num_tokens, num_blocks, reps)
                n = len(group)
                key = f"group{n}" + ("" if retention == "fullest_first" else f"_{retention}")
                row[key] = {
                    "retention": retention,
                    "retaining_group": list(plan.retention.retaining_group()),
                    "time_median_s": statistics.median(res[0]["times_s"]),
                    "times_s": res[0]["times_s"],
                    # CPU seconds of the busiest instance (process-wide, gloo
                    # threads included): robust to other load on the machine.
                    "cpu_time_median_s": max(statistics.median(r["cpu_times_s"]) for r in res),
                    "schedule_build_s": max(r["schedule_build_s"] for r in res),
                    "bytes_sent_per_layer": sum(r["bytes_sent"] for r in res),
                    "bytes_theory_per_layer": (n - 1) * num_tokens * KV_ROW_BYTES,
                }
                print(
                    f"prefill L={num_tokens} {key}: {row[key]['time_median_s']:.3f}s "
                    f"bytes={row[key]['bytes_sent_per_layer']}",
                    flush=True,
                )
        row["speedup_group2_vs_group1"] = (
            row["group1"]["time_median_s"] / row["group2"]["time_median_s"]
        )
        row["cpu_time_ratio_group1_vs_group2_busiest"] = (
            row["group1"]["cpu_time_median_s"] / row["group2"]["cpu_time_median_s"]
        )
        rows.append(row)
    return rows


def bench_decode_bytes(
    cluster: InstanceCluster, contexts: list[int], seed: int
) -> list[dict[str, Any]]:
    rows = []
    for num_tokens in contexts:
        num_blocks = -(-num_tokens // BLOCK_SIZE) + 2
        d, prefill = _prefill_plan(num_tokens, (0, 1), num_blocks, "halves")
        # Instance 1 is master; instance 0 holds the first half and answers with a partial.
        decode = plan_decode_step(d, {"req": 1})
        res = cluster.run(run_decode, prefill, decode, seed, num_tokens, num_blocks, True)
        participants = sum(len(r.participants) for r in decode.requests)
        rows.append(
            {
                "context_tokens": num_tokens,
                "bytes_sent_per_layer": sum(r["bytes_sent"] for r in res),
                "bytes_theory_per_layer": participants * DECODE_BYTES_PER_PARTICIPANT,
                "decode_step_s": max(r["decode_s"] for r in res),
                "rel_err_vs_fp64": max(r["rel_err"] for r in res if r["rel_err"] is not None),
            }
        )
        print(f"decode C={num_tokens}: {rows[-1]}", flush=True)
    return rows


def _fits(num_tokens: int, group: tuple[int, ...], pool_blocks: int) -> bool:
    try:
        d, _ = _prefill_plan(num_tokens, group, pool_blocks, "fullest_first")
        plan_decode_step(d, assign_masters_fullest_first(d, ["req"], group))
    except ESPCapacityError:
        return False
    return True


def bench_capacity(cluster: InstanceCluster, pool_blocks: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for group in ((0,), (0, 1)):
        lo, hi = 1, pool_blocks * BLOCK_SIZE * len(group) + 1  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _fits(mid, group, pool_blocks) else (lo, mid)
        d, prefill = _prefill_plan(lo, group, pool_blocks, "fullest_first")
        decode = plan_decode_step(d, assign_masters_fullest_first(d, ["req"], group))
        d.check_invariants()
        res = cluster.run(run_decode, prefill, decode, seed, lo, pool_blocks, True)
        # Every slot of the group is used at lo + 1, so the decode token has no
        # room; one token more does not even prefill.
        pool_tokens = pool_blocks * BLOCK_SIZE * len(group)
        try:
            _prefill_plan(pool_tokens + 1, group, pool_blocks, "fullest_first")
        except ESPCapacityError as exc:
            error = str(exc)
        else:
            raise AssertionError("a prompt larger than the group's pools was accepted")
        rows.append(
            {
                "group_size": len(group),
                "pool_tokens_per_instance": pool_blocks * BLOCK_SIZE,
                "max_servable_context": lo,
                "max_servable_context_prefill_only": pool_tokens,
                "served_for_real_rel_err": max(
                    r["rel_err"] for r in res if r["rel_err"] is not None
                ),
                "error_at_prefill_only_limit_plus_one": error,
            }
        )
        print(f"capacity G={len(group)}: {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4K and 8K prompts, 2 reps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--pool-blocks", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    meta = run_metadata(seed=args.seed, argv=argv)
    if meta["git"]["commit"] is None:
        meta["git"]["commit"] = "uncommitted"
    lengths = [4096, 8192] if args.quick else [4096, 8192, 16384, 32768]
    reps = args.reps or (2 if args.quick else 3)
    config = {
        "num_instances": NUM_INSTANCES,
        "num_layers": 1,
        "num_heads": NUM_HEADS,
        "num_kv_heads": NUM_KV_HEADS,
        "head_size": HEAD_SIZE,
        "dtype": str(DTYPE),
        "block_size": BLOCK_SIZE,
        "torch_threads_per_instance": 1,
        "backend": "gloo",
        "attention_backend": "cpu (vllm_esp.kernels.attention.cpu_fused, auto on CPU)",
        "reps": reps,
        "quick": args.quick,
        "bytes_counted": "payload handed to isend (K, V in fp32 plus the int64 position "
        "of every token; fp32 (out, lse) partials and queries in decode), "
        "summed over instances, per layer; gloo framing excluded",
        "ring_bytes_theory": "(N - 1) * L * (2 * Hkv * D * 4 + 8)",
        "decode_bytes_theory": "participants * (Hq * D * 4 + Hq * (D + 1) * 4)",
    }
    with InstanceCluster(NUM_INSTANCES, num_threads=1, timeout_s=1800.0) as cluster:
        prefill = bench_prefill(cluster, lengths, reps, args.seed)
        decode = bench_decode_bytes(
            cluster, [1024, 4096] if args.quick else [1024, 4096, 16384], args.seed
        )
        capacity = bench_capacity(cluster, args.pool_blocks, args.seed)
    result = {
        "benchmark": "esp_core",
        "config": config,
        "prefill": prefill,
        "decode_bytes": decode,
        "capacity": capacity,
        "metadata": finish_metadata(meta),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
