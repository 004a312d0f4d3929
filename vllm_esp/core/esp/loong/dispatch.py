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

A decision's cost must not grow with a queue backed up behind the gates
(thousands of requests at 64 instances), so the scan decides exactly as the
plain one but skips, by a tree of prompt minima (:class:`WaitingIndex`),
the requests whose prompt alone rules them out, and the memory gate sorts
its requests only when its cheap upper bound cannot decide.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from vllm_esp.core.esp.cluster import ClusterView, InstanceView, RunningRequest, WaitingRequest
from vllm_esp.core.esp.cost_model import ESPCostModel

__all__ = [
    "Dispatch",
    "LoongSettings",
    "PeakGate",
    "ResidentLoad",
    "WaitingIndex",
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
        # One pass with locals: this runs at every decision over every
        # resident request, so attribute and call overheads dominate it.
        items: list[tuple[int, int]] = []
        append = items.append
        held = num_decodes = num_decode_tokens = max_steps = 0
        holders: set[int] = set()
        add_holder = holders.add
        guess = settings.output_len_guess is not None
        for req in view.running:
            kv = req.kv
            if len(kv) == 1:
                home, computed = kv[0]
            else:
                home, computed = -1, sum(t for _, t in kv)
            held += computed
            total = guessed_output_tokens(req, settings) if guess else req.max_output_tokens
            left = total - req.num_output_tokens
            if left < 0:
                left = 0
            if computed >= req.num_prompt_tokens:
                append((computed, left))
                num_decodes += 1
                num_decode_tokens += computed
                if home >= 0:
                    add_holder(home)
                else:
                    holders.update(i for i, _ in kv)
                if left > max_steps:
                    max_steps = left
            else:  # counted as if prefilled: its prompt is reserved growth
                append((req.num_prompt_tokens, left - 1 if left > 0 else 0))
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
    and the peak is at most ``sum(now + rem)`` (each request's own growth
    bounds its term's), so admissions only track that bound, and the
    requests are sorted and the tables built (``O(n log n)``, then ``O(n)``
    per rebuild) only when a request is too close to the capacity to
    decide by it: most decisions of a cluster with room never sort.
    """

    def __init__(
        self,
        items: Iterable[tuple[int, int]],
        *,
        base_tokens: int,
        capacity_tokens: int,
        max_requests: int,
    ) -> None:
        self._items = list(items)
        #: ``_items`` is sorted by growth descending (``_neg_rem`` matches it).
        self._sorted = False
        self._neg_rem: list[int] = []
        self.base_tokens = base_tokens
        self.capacity_tokens = capacity_tokens
        self.max_requests = max_requests
        #: The exact peak (base excluded) while the tables are fresh, else a bound.
        self._bound = sum(map(sum, self._items))
        self._fresh = False

    def _rebuild(self) -> None:
        items = self._items
        if not self._sorted:
            items.sort(key=lambda it: -it[1])
            self._neg_rem = [-rem for _, rem in items]
            self._sorted = True
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
        self._bound = self._head[-1]
        self._fresh = True

    @property
    def num_requests(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        """Known to admit nothing more: full, or its exact peak (which an
        insertion never lowers) is already past the capacity."""
        if len(self._items) >= self.max_requests:
            return True
        return self._fresh and self.base_tokens + self._bound > self.capacity_tokens

    def peak_with(self, now: int, rem: int) -> int:
        """Total peak KV (base included) if ``(now, rem)`` joined."""
        if not self._fresh:
            self._rebuild()
        p = bisect_right(self._neg_rem, -rem)
        own = rem * (p + 1) + self._prefix[p] + now
        later = self._tail[p] + now if self._tail[p] >= 0 else 0
        return self.base_tokens + max(self._head[p], own, later)

    def admits(self, now: int, rem: int) -> bool:
        if len(self._items) >= self.max_requests:
            return False
        if self.base_tokens + self._bound + rem + now <= self.capacity_tokens:
            return True
        return self.peak_with(now, rem) <= self.capacity_tokens

    def add(self, now: int, rem: int) -> None:
        if self._sorted:
            p = bisect_right(self._neg_rem, -rem)
            self._items.insert(p, (now, rem))
            self._neg_rem.insert(p, -rem)
        else:
            self._items.append((now, rem))
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


class WaitingIndex:
    """The waiting queue's prompt lengths, to find the next request whose
    prompt is at most a limit in ``O(log n)`` (a tree of minima).

    The scan refuses a prompt past its limit, and a queue backed up behind
    the gates holds thousands; a caller that sees the same ``waiting``
    tuple at many decisions (the simulator keeps it while the queue does
    not change) builds the index once for all of them (:meth:`for_queue`).
    """

    def __init__(self, waiting: tuple[WaitingRequest, ...]) -> None:
        self.waiting = waiting
        level = [w.num_prompt_tokens for w in waiting]
        self.num_requests = len(level)
        #: ``levels[h][i]``: the least prompt of requests ``[i * 2^h, (i + 1) * 2^h)``.
        self.levels = [level]
        while len(level) > 1:
            if len(level) % 2:
                level = [*level, math.inf]  # type: ignore[list-item]
            level = list(map(min, level[0::2], level[1::2]))
            self.levels.append(level)

    @classmethod
    def for_queue(
        cls, waiting: tuple[WaitingRequest, ...], cached: WaitingIndex | None
    ) -> WaitingIndex:
        """``cached`` if it indexes this very tuple (immutable), else a new index."""
        if cached is not None and cached.waiting is waiting:
            return cached
        return cls(waiting)

    def next_fit(self, start: int, limit: float) -> int:
        """The first request at or after ``start`` whose prompt is at most
        ``limit``; ``num_requests`` if none."""
        levels = self.levels
        top = len(levels) - 1
        h, i = 0, start
        while True:  # climb right until a node holds a fit (all before it are past)
            level = levels[h]
            if i >= len(level):
                return self.num_requests
            if level[i] <= limit:
                break
            i += 1
            while i % 2 == 0 and h < top:  # a left child: its parent starts here too
                i //= 2
                h += 1
        while h > 0:  # descend to the node's first fit
            h -= 1
            i *= 2
            if levels[h][i] > limit:
                i += 1
        return i


def dispatch(
    view: ClusterView,
    decodable: Sequence[RunningRequest],
    cost: ESPCostModel,
    settings: LoongSettings,
    num_ooe: int,
    index: WaitingIndex | None = None,
) -> Dispatch:
    """LoongServe's FCFS scan with bounded out-of-order admission.

    ``decodable``: the decoding requests a prefill would displace (their
    KV is on idle instances); ``num_ooe``: consecutive earlier decisions
    that admitted out of order; ``index``: a :class:`WaitingIndex` of
    ``view.waiting`` kept from an earlier decision (rebuilt if it is not
    of this queue).
    """
    idle = [inst for inst in view.instances if not inst.busy]
    waiting = view.waiting
    if not waiting or not idle or len(view.running) >= settings.max_running_requests:
        return Dispatch((), num_ooe)
    idle_free = sum(inst.free_tokens for inst in idle)
    allow_ooe = num_ooe < settings.max_num_ooe
    # A request whose prompt is past ``_Scan.prompt_limit`` is refused
    # whatever the gates say, and one refusal or many in a row have the same
    # effect, so the scan visits the others only (``WaitingIndex.next_fit``).
    index = WaitingIndex.for_queue(waiting, index)
    first = index.next_fit(0, idle_free)
    n = len(waiting)
    if first == n or (first > 0 and not allow_ooe):
        return Dispatch((), num_ooe)
    scan = _Scan(view, decodable, cost, settings, idle, idle_free, allow_ooe)
    k = 0
    while k < n:
        j = index.next_fit(k, scan.prompt_limit())
        if (j > k and not scan.refused()) or j == n:  # refusals k..j-1
            break
        if scan.run_gate.closed:  # this request and every later one are refused
            scan.refused()
            break
        if not scan.visit(waiting[j]) and not scan.refused():
            break
        k = j + 1
    return scan.result(num_ooe)


class _Scan:
    """The state of :func:`dispatch`'s scan; ``visit`` is one request's gates."""

    def __init__(
        self,
        view: ClusterView,
        decodable: Sequence[RunningRequest],
        cost: ESPCostModel,
        settings: LoongSettings,
        idle: Sequence[InstanceView],
        idle_free: int,
        allow_ooe: bool,
    ) -> None:
        self.view = view
        self.decodable = decodable
        self.cost = cost
        self.settings = settings
        self.load = ResidentLoad.of(view, settings)
        self.run_gate = PeakGate(
            self.load.items,
            base_tokens=self.load.base_tokens,
            capacity_tokens=sum(inst.capacity_tokens for inst in view.instances),
            max_requests=settings.max_running_requests,
        )
        self.all_gate = self.run_gate.copy()  # with the undecided requests too
        self.n_idle = len(idle)
        self.idle_free = idle_free
        self.n_isolated, self.isolated_tokens = isolated_idle(
            [inst.capacity_tokens for inst in idle], sum(inst.used_tokens for inst in idle)
        )
        self.allow_ooe = allow_ooe
        self.guess = settings.output_len_guess is not None
        self.run = _Batch([])
        self.undecided = _Batch([])
        self.num_undecided_ok = 0  # prefix of ``undecided`` whose gain beats the slowdown
        self.undecided_open = True
        self.is_ooe = False
        self.before_ooe = 0
        self.need_break = False
        # Computed on first use: many scans never reach the compute gates.
        self._waiting_s: float | None = None
        self._inv_decode: float | None = None

    def waiting_s(self) -> float:
        if self._waiting_s is None:
            self._waiting_s = estimated_waiting_time(self.view, self.cost, self.settings, self.load)
        return self._waiting_s

    def inv_decode(self) -> float:
        if self._inv_decode is None:
            self._inv_decode = sum(1.0 / max(1, r.num_output_tokens) for r in self.decodable)
        return self._inv_decode

    def prompt_limit(self) -> int:
        """The longest prompt that can still join a batch: one within the
        idle free tokens, and once the undecided batch is closed, within the
        isolated instances' tokens (the normal case's only way in)."""
        room = self.idle_free if self.undecided_open else self.isolated_tokens
        return room - self.run.sum_l

    def refused(self) -> bool:
        """A request is refused; True if the scan goes on out of order."""
        if self.allow_ooe and not self.need_break:
            if not self.is_ooe:
                self.before_ooe, self.is_ooe = len(self.run.reqs), True
            return True
        return False

    def visit(self, req: WaitingRequest) -> bool:
        """Run ``req`` through the gates; True if it joined a batch."""
        now = req.num_prompt_tokens
        if self.guess:
            rem = _waiting_growth(req, self.settings)
        else:
            rem = max(0, req.max_output_tokens - req.num_output_tokens - 1)
        run, undecided, cost = self.run, self.undecided, self.cost
        new_l = run.sum_l + now
        if not (new_l <= self.idle_free and self.run_gate.admits(now, rem)):
            return False
        cap_s = self.settings.max_prefill_time_s
        if (not undecided.reqs or self.allow_ooe) and new_l <= self.isolated_tokens:
            new_l2 = run.sum_l2 + now * now
            t_now = cost.prefill_time(self.n_isolated, new_l, new_l2)
            slowdown = t_now - cost.prefill_time(self.n_idle, new_l, new_l2)
            within = t_now <= cap_s
            if slowdown <= self.waiting_s() and (not run.reqs or within):
                self.need_break = self.need_break or not within
                if undecided.reqs and not self.is_ooe:
                    self.before_ooe, self.is_ooe = len(run.reqs), True
                run.add(req)
                self.run_gate.add(now, rem)
                self.all_gate.add(now, rem)
                return True
        if (
            self.undecided_open
            and new_l + undecided.sum_l <= self.idle_free
            and self.all_gate.admits(now, rem)
        ):
            undecided.add(req)
            self.all_gate.add(now, rem)
            t_all = cost.prefill_time(
                self.n_idle, undecided.sum_l + run.sum_l, undecided.sum_l2 + run.sum_l2
            )
            within = t_all <= cap_s
            single = len(run.reqs) + len(undecided.reqs) == 1
            gain_ok = t_all * self.inv_decode() <= self.waiting_s() * undecided.sum_inv
            if gain_ok and (single or within):
                self.need_break = self.need_break or not within
                self.num_undecided_ok = len(undecided.reqs)
            return True
        self.undecided_open = False
        return False

    def result(self, num_ooe: int) -> Dispatch:
        admitted = tuple(self.run.reqs + self.undecided.reqs[: self.num_undecided_ok])
        if not admitted:
            return Dispatch((), num_ooe)
        ooe_now = self.is_ooe and self.before_ooe < len(admitted)
        return Dispatch(admitted, num_ooe + 1 if ooe_now else 0)


def _waiting_growth(req: WaitingRequest, settings: LoongSettings) -> int:
    # After its prefill a request holds its prompt and has sampled one more output.
    return max(0, guessed_output_tokens(req, settings) - req.num_output_tokens - 1)
