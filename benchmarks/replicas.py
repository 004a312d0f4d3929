"""Real-time replay of one trace over one or more engines in this process,
and LoongServe's replica baseline: N stock replicas behind a round-robin
dispatcher.

    records, run = replay_engines(llms, trace, assign_round_robin(len(trace), 2), ...)

**Why N ``LLM`` objects in one process, not N client processes.** Each
``LLM`` already runs its model in its own EngineCore and worker processes
(bound to one core each, like one ESP instance); the front end here only
adds requests and collects outputs. One replay loop over the N engines
needs no clock shared across processes, adds one front-end process instead
of N on a 2-core machine, and keeps memory at what N engines need (well
inside 24 GiB for the small model). An engine's ``step()`` blocks until
its EngineCore sends outputs, so the loop steps only engines whose output
queue already holds something, and otherwise waits for the first output or
the next arrival: one replica's long step never delays another's outputs.

**The dispatcher is a true baseline.** Requests go to replicas in arrival
order, ``i mod N`` (:func:`assign_round_robin`), whatever their length and
whatever the replicas' loads: a proxy that knows nothing about the engines
behind it. A request a replica cannot hold is refused by that replica
(vLLM raises in ``add_request``; :func:`refused_by` is vLLM's rule, kept
next to the engine's verdict so a difference shows in the JSON); it is not
retried elsewhere, since no replica holds more than another.

Nothing here imports torch or vLLM at module level, so the plumbing is
unit-testable without an engine.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import RequestRecord, summarize

__all__ = [
    "assign_round_robin",
    "engine_processes",
    "refusal_errors",
    "refused_by",
    "replay_engines",
]

#: Longest sleep of the multi-engine loop while nothing is ready (s): the
#: granularity at which a replica's outputs are seen when several run.
POLL_S = 0.001


def assign_round_robin(num_requests: int, num_replicas: int) -> list[int]:
    """Replica of each request, in arrival order: ``i mod num_replicas``."""
    if num_replicas < 1 or num_requests < 0:
        raise ValueError("need num_replicas >= 1 and num_requests >= 0")
    return [i % num_replicas for i in range(num_requests)]


def refused_by(prompt_len: int, max_model_len: int) -> bool:
    """vLLM 0.32's admission rule for a generating model: a prompt must
    leave room for at least one output token (``prompt_len < max_model_len``;
    ``InputProcessor._validate_prompt_len``). Longer outputs are cut at
    ``max_model_len``, not refused."""
    return prompt_len >= max_model_len


def refusal_errors() -> tuple[type[BaseException], ...]:
    """What ``add_request`` raises for a prompt an engine cannot hold.

    vLLM 0.32 raises ``VLLMValidationError`` (a client error, not a
    ``ValueError``); older releases a ``ValueError``. Imported on call so
    that this module loads without vLLM.
    """
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMValidationError)


# ------------------------------------------------------------ process view
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, comm) of every process this user may read."""
    table: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        table[int(name)] = (ppid, comm)
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> set[int]:
    out: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - out
        out |= frontier
    return out


def engine_processes(before: set[int]) -> tuple[set[int], list[dict[str, Any]]]:
    """This process's descendants now, and those not in ``before`` (the
    engine just started) with the cores and OpenMP threads they got: what
    vLLM-CPU's binding actually gave each worker."""
    table = _proc_table()
    now = _descendants(os.getpid(), table)
    rows = []
    for pid in sorted(now - before):
        if not table[pid][1].startswith("VLLM::"):
            continue  # e.g. multiprocessing's resource tracker
        row: dict[str, Any] = {"pid": pid, "name": table[pid][1]}
        try:
            row["cpus_allowed"] = sorted(os.sched_getaffinity(pid))
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            row["OMP_NUM_THREADS"] = (env.get(b"OMP_NUM_THREADS") or b"").decode() or None
            row["num_threads"] = len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
        rows.append(row)
    return now, rows


# ------------------------------------------------------------------ replay
def _output_queue(engine: Any) -> queue.Queue | None:
    """The queue the multiprocess EngineCore client fills (None in process)."""
    q = getattr(engine.engine_core, "outputs_queue", None)
    return q if isinstance(q, queue.Queue) else None


def _wait_ready(engines: Sequence[Any], busy: list[int], timeout_s: float) -> list[int]:
    """Indices in ``busy`` whose next ``step()`` will not block, waiting up
    to ``timeout_s`` for one. One busy engine: a wait on its queue (no
    polling); several: polls every ``POLL_S``."""
    queues = [_output_queue(engines[i]) for i in busy]
    if any(q is None for q in queues):  # in-process client: step() does the work
        return list(busy)
    deadline = time.perf_counter() + timeout_s
    if len(busy) == 1:
        q = queues[0]
        assert q is not None
        with q.not_empty:  # the queue's own condition: wait without consuming
            q.not_empty.wait_for(lambda: len(q.queue) > 0, max(timeout_s, 0.0))
    while True:
        ready = [i for i, q in zip(busy, queues) if q is not None and len(q.queue) > 0]
        left = deadline - time.perf_counter()
        if ready or left <= 0:
            return ready
        time.sleep(min(POLL_S, left))


def replay_engines(
    llms: Sequence[Any],
    trace: Sequence[Any],
    assignment: Sequence[int],
    tag: str,
    taps: Sequence[Any],
    max_replay_s: float,
    params: Any,
) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Replay ``trace`` (arrival-sorted ``TraceRequest``s) in real time,
    request ``i`` on engine ``assignment[i]``; ``params(max_tokens)`` gives
    its sampling parameters. JCT = finish - scheduled arrival; a request an
    engine refuses in ``add_request`` gets ``refused`` set and no JCT;
    requests still running after ``max_replay_s`` are aborted (unfinished).
    """
    from vllm.inputs import TokensPrompt

    refusals = refusal_errors()
    engines = [llm.llm_engine for llm in llms]
    limits = [e.vllm_config.model_config.max_model_len for e in engines]
    ids = [f"{tag}-{r.request_id}" for r in trace]
    recs = {
        rid: RequestRecord(
            request_id=r.request_id,
            source=r.source,
            prompt_len=r.prompt_len,
            output_len=r.output_len,
            arrival_s=float(r.arrival_s),
        )
        for rid, r in zip(ids, trace)
    }
    for tap in taps:
        tap.reset()
    in_flight: list[set[str]] = [set() for _ in engines]
    # Per engine, (end, length) of each interval between two outputs while
    # it had work (from the first add to an idle engine): its EngineCore's
    # step times as the client sees them, so the slowest show where long
    # prefills went. step() itself returns at once, its output waiting.
    gaps: list[list[tuple[float, float]]] = [[] for _ in engines]
    last_seen = [0.0] * len(engines)
    mismatches: list[str] = []
    num_done = nxt = 0
    timed_out = False
    t0 = time.perf_counter()
    while num_done < len(ids):
        now = time.perf_counter() - t0
        if now > max_replay_s:
            timed_out = True
            break
        while nxt < len(ids) and trace[nxt].arrival_s <= now:
            rid, r, k = ids[nxt], trace[nxt], assignment[nxt]
            rec = recs[rid]
            rec.added_s = time.perf_counter() - t0
            if not engines[k].has_unfinished_requests():
                last_seen[k] = rec.added_s
            try:
                engines[k].add_request(
                    rid,
                    TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)),
                    params(r.output_len),
                )
                in_flight[k].add(rid)
            except refusals as exc:
                rec.refused = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                num_done += 1
            if (rec.refused is not None) != refused_by(r.prompt_len, limits[k]):
                mismatches.append(r.request_id)
            nxt += 1
        busy = [k for k, e in enumerate(engines) if e.has_unfinished_requests()]
        next_arrival = trace[nxt].arrival_s if nxt < len(ids) else max_replay_s
        wait = max(min(next_arrival, max_replay_s) - (time.perf_counter() - t0), 0.0)
        if not busy:
            time.sleep(wait)
            continue
        for k in _wait_ready(engines, busy, wait):
            outputs = engines[k].step()
            t = time.perf_counter() - t0
            gaps[k].append((round(t, 4), round(t - last_seen[k], 4)))
            last_seen[k] = t
            for out in outputs:
                rec = recs.get(out.request_id)
                if rec is not None and rec.see(out, t):
                    in_flight[k].discard(out.request_id)
                    num_done += 1
    for k, engine in enumerate(engines):
        if timed_out and in_flight[k]:
            engine.abort_request(sorted(in_flight[k]))
            while engine.has_unfinished_requests():  # let the abort go through
                engine.step()
    run = {
        "num_engines": len(engines),
        "max_model_len_per_engine": limits,
        "num_outputs_seen": sum(len(g) for g in gaps),
        "wall_s": time.perf_counter() - t0,
        "timed_out": timed_out,
        "max_replay_s": max_replay_s,
        "output_interval_s": summarize([d for g in gaps for _, d in g]),
        "busy_s_per_engine": [sum(d for _, d in g) for g in gaps],
        "slowest_output_intervals_end_length_s": sorted(
            (x for g in gaps for x in g), key=lambda x: -x[1]
        )[:10],
        "refusal_rule_mismatches": mismatches,
        "refusal_example": next((r.refused for r in recs.values() if r.refused), None),
        "scheduler_stats": [tap.summary() for tap in taps],
    }
    return [recs[rid] for rid in ids], run
