"""Step 1 of LoongServe's scheduler: which waiting requests start now.

LoongServe's ``ReqQueue.generate_new_req_list`` scans the waiting queue in
FCFS order, skipping at most a bounded number of times out of order, and
admits a request when three gates pass:

* **memory** (LightLLM's future-peak estimate, :class:`PeakGate`): if every
  resident and admitted request runs to its output length, the total KV at
  its peak fits the cluster, so an admission never forces an eviction later;
* **compute, normal case**: the batch fits the tokens of the instances that
  packing the resident KV would leave empty, and running it on those now
  costs at most the time until the decodes free everything
  (``T(max free instances) - T(all) <= estimated waiting time``), within
  ``max_prefill_time_s`` (the first request is exempt);
* **compute, "undecided"** (requests that need the decode instances, paper
  Eq. 1-2): the decodes' normalised slowdown ``T(all) * sum 1/out_len`` is at
  most the new requests' normalised gain ``waiting * sum 1/in_len``.

Instances busy with a batch in flight cannot be planned, so "all" means all
idle instances here. The waiting-time estimate uses the cost model's
decode step instead of LoongServe's constant ``avg_decoding_time``, and the
remaining output length is known (``max_output_tokens``, as with
``ignore_eos``) unless :attr:`LoongSettings.output_len_guess` is set.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from vllm_esp.core.esp.cluster import ClusterView, RunningRequest, WaitingRequest
from vllm_esp.core.esp.cost_model import ESPCostModel

__all__ = [
    "Dispatch",
    "LoongSettings",
    "PeakGate",
    "ResidentLoad",
    "dispatch",
    "estimated_waiting_time",
    "future_peak_tokens",
    "guessed_output_tokens",
    "isolated_idle",
]


@dataclass(frozen=True)
class LoongSettings:
    """LoongServe's scheduler knobs (defaults: the paper's runs, Mixed workload)."""

    #: Consecutive decisions that may admit out of FCFS order (``max_num_ooe``).
    max_num_ooe: int = 4
    #: Cap on a multi-request prefill batch's estimated time (``max_prefill_time``).
    max_prefill_time_s: float = 5.0
    #: Decode batch per master above which a master is added (compute-bound FFN).
    min_comp_bound_decode_batch: int = 128
    #: Resident plus admitted requests (``running_max_req_size``).
    max_running_requests: int = 1024
    #: Decode steps per decision when no waiting request is admitted
    #: (``max_wait_tokens``); a decision that admits prefills runs decodes 1 step.
    decode_steps_per_decision: int = 10
    #: None: a request's output length is ``max_output_tokens`` (known, as
    #: with ``ignore_eos``). A factor ``g >= 1``: LightLLM's running guess
    #: ``min(max_output, max(ceil(g * outputs so far), output_guess_floor_tokens))``.
    output_len_guess: float | None = None
    #: Floor of the running guess (LightLLM's ``router_max_new_token_len``).
    output_guess_floor_tokens: int = 1024

    def __post_init__(self) -> None:
        ints = {
            "max_num_ooe": (self.max_num_ooe, 0),
            "min_comp_bound_decode_batch": (self.min_comp_bound_decode_batch, 1),
            "max_running_requests": (self.max_running_requests, 1),
            "decode_steps_per_decision": (self.decode_steps_per_decision, 1),
            "output_guess_floor_tokens": (self.output_guess_floor_tokens, 1),
        }
        for name, (value, low) in ints.items():
            if not isinstance(value, int) or value < low:
                raise ValueError(f"LoongSettings.{name} must be an int >= {low}, got {value!r}")
        if not (math.isfinite(self.max_prefill_time_s) and self.max_prefill_time_s > 0):
            raise ValueError("LoongSettings.max_prefill_time_s must be finite and > 0")
        guess = self.output_len_guess
        if guess is not None and not (math.isfinite(guess) and guess >= 1.0):
            raise ValueError("LoongSettings.output_len_guess must be None or >= 1")


def guessed_output_tokens(req: RunningRequest | WaitingRequest, settings: LoongSettings) -> int:
    """The output length the gates assume for ``req`` (all its outputs)."""
    if settings.output_len_guess is None:
        return req.max_output_tokens
    # The epsilon keeps 1.1 * 100 at 110 (binary floating point gives 110.00000000000001).
    grown = math.ceil(settings.output_len_guess * req.num_output_tokens - 1e-9)
    return min(req.max_output_tokens, max(grown, settings.output_guess_floor_tokens))


@dataclass(frozen=True)
class ResidentLoad:
    """What the gates need of the resident requests (one pass over them)."""

    #: ``(tokens now, tokens still to grow)`` of each resident request.
    items: list[tuple[int, int]]
    #: Tokens held by no resident request (reservations of batches in flight).
    base_tokens: int
    num_decodes: int
    num_decode_tokens: int
    #: Instances holding KV of a decoding request.
    num_decode_instances: int
    #: The most output steps a decoding request has left.
    max_remaining_steps: int

    @classmethod
    def of(cls, view: ClusterView, settings: LoongSettings) -> ResidentLoad:
        items: list[tuple[int, int]] = []
        held = num_decodes = num_decode_tokens = max_steps = 0
        holders: set[int] = set()
        guess = settings.output_len_guess is not None
        for req in view.running:
            kv = req.kv
            computed = kv[0][1] if len(kv) == 1 else sum(t for _, t in kv)
            held += computed
            total = guessed_output_tokens(req, settings) if guess else req.max_output_tokens
            left = max(0, total - req.num_output_tokens)
            if computed >= req.num_prompt_tokens:
                items.append((computed, left))
                num_decodes += 1
                num_decode_tokens += computed
                holders.update(i for i, _ in kv)
                max_steps = max(max_steps, left)
            else:  # counted as if prefilled: its prompt is reserved growth
                items.append((req.num_prompt_tokens, max(0, left - 1)))
        used = sum(inst.used_tokens for inst in view.instances)
        return cls(
            items, max(0, used - held), num_decodes, num_decode_tokens, len(holders), max_steps
        )


def future_peak_tokens(items: Iterable[tuple[int, int]]) -> int:
    """LightLLM's peak KV if every request grows to its end, then frees.

    Sorted by remaining growth descending, when request ``i`` (0-based)
    ends, requests ``0..i`` are alive and each grew by ``rem_i``:
    ``peak = max_i (rem_i * (i + 1) + sum_{j <= i} now_j)``.
    """
    peak = 0
    prefix = 0
    for k, (now, rem) in enumerate(sorted(items, key=lambda it: -it[1])):
        prefix += now
        peak = max(peak, rem * (k + 1) + prefix)
    return peak


class PeakGate:
    """:func:`future_peak_tokens` with one more request, in ``O(log n)``.

    Inserting ``(c, r)`` at position ``p`` (after the requests with growth
    ``>= r``) leaves the terms before ``p`` unchanged, adds its own term
    ``r * (p + 1) + S_p + c`` and shifts each later term ``k`` to
    ``rem_k * (k + 2) + S_{k+1} + c``; prefix and suffix maxima of those
    give the new peak. An insertion raises the peak by at most ``r + c``,
    so admissions only track that bound and the tables are rebuilt
    (``O(n)``) when a request is too close to the capacity to decide by it.
    """

    def __init__(
        self,
        items: Iterable[tuple[int, int]],
        *,
        base_tokens: int,
        capacity_tokens: int,
        max_requests: int,
    ) -> None:
        self._items = sorted(items, key=lambda it: -it[1])
        self._neg_rem = [-rem for _, rem in self._items]
        self.base_tokens = base_tokens
        self.capacity_tokens = capacity_tokens
        self.max_requests = max_requests
        self._rebuild()

    def _rebuild(self) -> None:
        items = self._items
        prefix = [0, *accumulate(now for now, _ in items)]
        rems = [rem for _, rem in items]
        terms = [rem * k + s for k, (rem, s) in enumerate(zip(rems, prefix[1:]), 1)]
        shifted = [rem * k + s for k, (rem, s) in enumerate(zip(rems, prefix[1:]), 2)]
        self._prefix = prefix
        self._head = [0, *accumulate(terms, max)]
        tail = [*accumulate(reversed(shifted), max)]
        tail.reverse()
        tail.append(-1)
        self._tail = tail
        #: The exact peak (base excluded) while the tables are fresh, else a bound.
        self._bound = self._head[-1]
        self._fresh = True

    @property
    def num_requests(self) -> int:
        return len(self._items)

    def peak_with(self, now: int, rem: int) -> int:
        """Total peak KV (base included) if ``(now, rem)`` joined."""
        if not self._fresh:
            self._rebuild()
        p = bisect_right(self._neg_rem, -rem)
        own = rem * (p + 1) + self._prefix[p] + now
        later = self._tail[p] + now if self._tail[p] >= 0 else 0
        return self.base_tokens + max(self._head[p], own, later)

    def admits(self, now: int, rem: int) -> bool:
        if self.num_requests + 1 > self.max_requests:
            return False
        if self.base_tokens + self._bound + rem + now <= self.capacity_tokens:
            return True
        return self.peak_with(now, rem) <= self.capacity_tokens

    def add(self, now: int, rem: int) -> None:
        p = bisect_right(self._neg_rem, -rem)
        self._items.insert(p, (now, rem))
        self._neg_rem.insert(p, -rem)
        self._bound += rem + now
        self._fresh = False

    def copy(self) -> PeakGate:
        gate = PeakGate.__new__(PeakGate)
        gate.__dict__.update(self.__dict__)
        gate._items = list(self._items)
        gate._neg_rem = list(self._neg_rem)
        return gate


def isolated_idle(capacities: Sequence[int], used_tokens: int) -> tuple[int, int]:
    """``(instances, tokens)`` left empty if ``used_tokens`` were packed into
    the fewest of these instances (the largest first)."""
    caps = sorted(capacities, reverse=True)
    held = 0
    k = 0
    while held < used_tokens and k < len(caps):
        held += caps[k]
        k += 1
    return len(caps) - k, sum(caps[k:])


def estimated_waiting_time(
    view: ClusterView,
    cost: ESPCostModel,
    settings: LoongSettings,
    load: ResidentLoad | None = None,
) -> float:
    """How long the decodes keep instances (LoongServe's waiting estimate).

    The most remaining output steps of a decoding request (at least
    ``decode_steps_per_decision``: a waiting request is reconsidered after
    that many steps anyway) times one decode step of the resident batch
    spread over the instances that hold decode KV.
    """
    load = load or ResidentLoad.of(view, settings)
    steps = max(settings.decode_steps_per_decision, load.max_remaining_steps)
    k = max(1, load.num_decode_instances)
    num_master = max(1, -(-load.num_decodes // k))
    return steps * cost.decode_time(num_master, -(-load.num_decode_tokens // k))


@dataclass(frozen=True)
class Dispatch:
    """Step 1's answer."""

    #: Admitted requests, in the order the scan admitted them.
    admitted: tuple[WaitingRequest, ...]
    #: The consecutive out-of-order decision count after this decision.
    num_ooe: int


@dataclass
class _Batch:
    """Length sums of a candidate batch."""

    reqs: list[WaitingRequest]
    sum_l: int = 0
    sum_l2: int = 0
    sum_inv: float = 0.0

    def add(self, req: WaitingRequest) -> None:
        self.reqs.append(req)
        self.sum_l += req.num_prompt_tokens
        self.sum_l2 += req.num_prompt_tokens**2
        self.sum_inv += 1.0 / max(1, req.num_prompt_tokens)


def dispatch(
    view: ClusterView,
    decodable: Sequence[RunningRequest],
    cost: ESPCostModel,
    settings: LoongSettings,
    num_ooe: int,
) -> Dispatch:
    """LoongServe's FCFS scan with bounded out-of-order admission.

    ``decodable``: the decoding requests a prefill would displace (their
    KV is on idle instances); ``num_ooe``: consecutive earlier decisions
    that admitted out of order.
    """
    idle = [inst for inst in view.instances if not inst.busy]
    if not view.waiting or not idle or len(view.running) >= settings.max_running_requests:
        return Dispatch((), num_ooe)
    load = ResidentLoad.of(view, settings)
    capacity = sum(inst.capacity_tokens for inst in view.instances)
    run_gate = PeakGate(
        load.items,
        base_tokens=load.base_tokens,
        capacity_tokens=capacity,
        max_requests=settings.max_running_requests,
    )
    all_gate = run_gate.copy()  # with the undecided requests too
    n_idle = len(idle)
    idle_free = sum(inst.free_tokens for inst in idle)
    n_isolated, isolated_tokens = isolated_idle(
        [inst.capacity_tokens for inst in idle], sum(inst.used_tokens for inst in idle)
    )
    waiting_s = estimated_waiting_time(view, cost, settings, load)
    inv_decode = sum(1.0 / max(1, r.num_output_tokens) for r in decodable)
    cap_s = settings.max_prefill_time_s
    allow_ooe = num_ooe < settings.max_num_ooe

    run = _Batch([])
    undecided = _Batch([])
    num_undecided_ok = 0  # prefix of ``undecided`` whose gain beats the slowdown
    undecided_open = True
    is_ooe = False
    before_ooe = 0
    need_break = False
    for req in view.waiting:
        now, rem = req.num_prompt_tokens, _waiting_growth(req, settings)
        new_l = run.sum_l + now
        if run_gate.admits(now, rem) and new_l <= idle_free:
            if (not undecided.reqs or allow_ooe) and new_l <= isolated_tokens:
                new_l2 = run.sum_l2 + now * now
                t_now = cost.prefill_time(n_isolated, new_l, new_l2)
                slowdown = t_now - cost.prefill_time(n_idle, new_l, new_l2)
                within = t_now <= cap_s
                if slowdown <= waiting_s and (not run.reqs or within):
                    need_break = need_break or not within
                    if undecided.reqs and not is_ooe:
                        before_ooe, is_ooe = len(run.reqs), True
                    run.add(req)
                    run_gate.add(now, rem)
                    all_gate.add(now, rem)
                    continue
            if (
                undecided_open
                and all_gate.admits(now, rem)
                and new_l + undecided.sum_l <= idle_free
            ):
                undecided.add(req)
                all_gate.add(now, rem)
                t_all = cost.prefill_time(
                    n_idle, undecided.sum_l + run.sum_l, undecided.sum_l2 + run.sum_l2
                )
                within = t_all <= cap_s
                single = len(run.reqs) + len(undecided.reqs) == 1
                if t_all * inv_decode <= waiting_s * undecided.sum_inv and (single or within):
                    need_break = need_break or not within
                    num_undecided_ok = len(undecided.reqs)
                continue
            undecided_open = False
        if allow_ooe and not need_break:
            if not is_ooe:
                before_ooe, is_ooe = len(run.reqs), True
            continue
        break
    admitted = tuple(run.reqs + undecided.reqs[:num_undecided_ok])
    if not admitted:
        return Dispatch((), num_ooe)
    ooe_now = is_ooe and before_ooe < len(admitted)
    return Dispatch(admitted, num_ooe + 1 if ooe_now else 0)


def _waiting_growth(req: WaitingRequest, settings: LoongSettings) -> int:
    # After its prefill a request holds its prompt and has sampled one more output.
    return max(0, guessed_output_tokens(req, settings) - req.num_output_tokens - 1)
