"""The discrete-event cluster simulator: a real ``ClusterPolicy`` in simulated time.

:func:`simulate` replays a trace of :class:`SimRequest` on ``num_instances``
instances of ``capacity_tokens`` KV tokens each. At every decision point it
builds a :class:`~vllm_esp.core.esp.cluster.ClusterView`, calls the policy
object itself (LoongServe's scheduler or a baseline, unchanged) and carries
the plan out, with durations from the TRUTH cost model (the policy keeps its
own belief model). Time is simulated only; the wall clock is never read.

Execution semantics (what policies rely on; ``vllm_esp.core.esp.cluster``
has the token lifecycle):

* Decision points: a batch or a migration ends; a request arrives while
  some instance is idle. Events at one instant are all applied before the
  policy runs. A plan that only preempts is followed at once by another
  decision (each one shrinks the running set, so this ends).
* Migrations run first. An endpoint is busy for ``migration_time`` of all
  the tokens it sends or receives in the plan (its link is shared, so one
  latency and the summed bytes); a batch starts once every migration
  endpoint of its group is done.
* A batch lasts its prefill part, ``prefill_time`` over its chunks
  (``chunk_terms``), plus its decode steps; each step is timed afresh from
  the requests still in it (see :class:`~vllm_esp.sim.state.BatchRun`).
* KV in tokens per instance: prefill retains at launch, a decode step adds
  one token on the master (reserved at launch, so a view counts it as
  used), a finish frees all at once, a preemption frees all and requeues
  the request at the front with ``prompt + outputs`` tokens to recompute.
* TTFT is the end of the batch completing the prefill; a request whose
  output is one token finishes there.

The simulator asserts its own bookkeeping: no instance above capacity or
below zero, each request finishes once, time never goes backwards. When the
policy plans nothing while nothing is in flight, time skips to the next
arrival; with no arrival left the run stops and the stuck requests are
reported in ``SimResult.unfinished`` (so a refusing policy cannot hang it).

The loop itself is ``events.py``; its per-request and per-batch state is
``state.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_esp.core.esp.cluster import ClusterPolicy
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.sim.events import ChunkLimit, EventLoop

__all__ = ["RequestRecord", "SimRequest", "SimResult", "simulate"]


@dataclass(frozen=True)
class SimRequest:
    """One request of a trace: lengths and arrival only (``ignore_eos``)."""

    req_id: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    #: Workload class, carried into the record (e.g. the source dataset).
    cls: str = ""


@dataclass(frozen=True)
class RequestRecord:
    """A finished request; times are absolute simulated seconds."""

    req_id: str
    cls: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    first_token_s: float
    finish_s: float
    num_preemptions: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass(frozen=True)
class SimResult:
    """What a run produced; ``records`` follow the trace's order."""

    records: tuple[RequestRecord, ...]
    #: Time of the last event processed.
    makespan_s: float
    num_decisions: int
    num_batches: int
    num_migrated_tokens: int
    #: Requests not served by ``max_sim_s``, refused, or left stuck by the policy.
    unfinished: tuple[str, ...]


def simulate(
    policy: ClusterPolicy,
    requests: Sequence[SimRequest],
    *,
    num_instances: int,
    capacity_tokens: int,
    truth: ESPCostModel,
    max_sim_s: float | None = None,
    check: bool = False,
    lockstep: bool = False,
    chunk_limit: ChunkLimit | None = None,
) -> SimResult:
    """Run ``policy`` on ``requests``; see the module docstring.

    ``check`` also runs ``plan.check_invariants(view)`` on every plan and
    recounts every instance's KV at every decision (slower; for tests).
    ``lockstep`` runs the cluster as the engine does: a plan's batches are
    one step (decode batches run one step whatever ``num_steps`` says) and
    all end together, when the slowest does; arrivals wait for that end.
    ``chunk_limit(num_new, num_cached, dop, decodes_resident)`` cuts each
    planned prefill item to at most that many tokens per launch, as the
    engine's chunked prefill does (the policy sees the rest as a partly
    prefilled resident at its next decision); None: prompts run whole.
    """
    if num_instances < 1 or capacity_tokens < 1:
        raise ValueError("num_instances and capacity_tokens must be >= 1")
    loop = EventLoop(
        policy, num_instances, capacity_tokens, truth, max_sim_s, check, lockstep, chunk_limit
    )
    loop.load(requests)
    loop.run()
    return _result(loop)


def _result(loop: EventLoop) -> SimResult:
    records = []
    for req in loop.finished():
        assert req.first_token_s is not None
        records.append(
            RequestRecord(
                req_id=req.req_id,
                cls=req.cls,
                arrival_s=req.arrival_s,
                num_prompt_tokens=req.orig_prompt,
                num_output_tokens=req.max_output,
                first_token_s=req.first_token_s,
                finish_s=req.finish_s,
                num_preemptions=req.num_preemptions,
            )
        )
    done = {rec.req_id for rec in records}
    return SimResult(
        records=tuple(records),
        makespan_s=loop.now,
        num_decisions=loop.num_decisions,
        num_batches=loop.num_batches,
        num_migrated_tokens=loop.num_migrated_tokens,
        unfinished=tuple(req.req_id for req in loop.reqs if req.req_id not in done),
    )
