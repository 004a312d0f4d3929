"""The cluster simulator's event loop (see ``cluster.py`` for the semantics).

A plain ``heapq`` of ``(time, seq, kind, payload)``: ``seq`` increases
monotonically, so events at one instant keep their push order and a run is
deterministic. Kinds: an arrival, the end of one step of a batch, the end
of a plan's migrations. Time is simulated only.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vllm_esp.core.esp.cluster import (
    Batch,
    ClusterPlan,
    ClusterPolicy,
    ClusterView,
    InstanceView,
    Migration,
    PrefillItem,
    RunningRequest,
    WaitingRequest,
)
from vllm_esp.core.esp.cost_model import ESPCostModel
from vllm_esp.sim.state import FINISHED, REFUSED, RUNNING, WAITING, BatchRun, SimReq

if TYPE_CHECKING:  # cluster.py builds this loop
    from vllm_esp.sim.cluster import SimRequest

__all__ = ["ChunkLimit", "EventLoop"]

#: ``(num_new, num_cached, dop, decodes_resident) -> most tokens this step``.
ChunkLimit = Callable[[int, int, int, bool], int]

# Event kinds (the heap orders by time, then by a unique sequence number).
_ARRIVAL = 0
_STEP_END = 1
_MIGRATION_END = 2

#: Consecutive plans that only migrate before the run is declared stuck (a
#: policy moving KV back and forth would otherwise never end).
_MAX_PLANS_WITHOUT_BATCH = 10_000


class EventLoop:
    """One run: the requests' and instances' state, and the event heap."""

    def __init__(
        self,
        policy: ClusterPolicy,
        num_instances: int,
        capacity_tokens: int,
        truth: ESPCostModel,
        max_sim_s: float | None,
        check: bool,
        lockstep: bool = False,
        chunk_limit: ChunkLimit | None = None,
    ) -> None:
        self.policy = policy
        self.lockstep = lockstep
        self.chunk_limit = chunk_limit
        self.n = num_instances
        self.cap = capacity_tokens
        self.truth = truth
        self.max_sim_s = max_sim_s
        self.check = check
        self.now = 0.0
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.reqs: list[SimReq] = []
        self.waiting: dict[str, SimReq] = {}
        self.running: dict[str, SimReq] = {}
        #: KV held per instance; decode tokens reserved by batches in flight.
        self.used = [0] * num_instances
        self.reserved = [0] * num_instances
        self.busy = [False] * num_instances
        self.num_idle = num_instances
        self.inst_views = [InstanceView(i, capacity_tokens, 0) for i in range(num_instances)]
        self.dirty: set[int] = set()
        #: The waiting queue's views, until the queue changes (many decisions
        #: admit nothing, and the queue can be thousands long).
        self.waiting_views: tuple[WaitingRequest, ...] | None = None
        #: The running requests' views in ``running``'s order (None: not built
        #: yet), and the running requests whose view changed since the last
        #: view: a decision rebuilds those only.
        self.running_views: dict[str, RunningRequest | None] = {}
        self.stale: set[SimReq] = set()
        self.num_decisions = 0
        self.num_batches = 0
        self.num_migrated_tokens = 0
        self.num_finished = 0
        self.sum_finished_output = 0
        self.plans_without_batch = 0

    # ------------------------------------------------------------------ trace
    def load(self, requests: Sequence[SimRequest]) -> None:
        seen: set[str] = set()
        for r in requests:
            if r.req_id in seen:
                raise ValueError(f"duplicate req_id {r.req_id!r}")
            seen.add(r.req_id)
            if not (math.isfinite(r.arrival_s) and r.arrival_s >= 0):
                raise ValueError(f"{r.req_id}: arrival_s must be finite and >= 0")
            if r.num_prompt_tokens < 1 or r.num_output_tokens < 1:
                raise ValueError(f"{r.req_id}: prompt and output need >= 1 token each")
            req = SimReq(r.req_id, r.arrival_s, r.num_prompt_tokens, r.num_output_tokens, r.cls)
            self.reqs.append(req)
            if req.peak_tokens > self.n * self.cap:
                req.state = REFUSED
            else:
                self._push(r.arrival_s, _ARRIVAL, req)

    def _push(self, time_s: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.heap, (time_s, self.seq, kind, payload))
        self.seq += 1

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        heap = self.heap
        while heap:
            t = heap[0][0]
            if self.max_sim_s is not None and t > self.max_sim_s:
                break
            assert t >= self.now, f"time went backwards: {t} < {self.now}"
            self.now = t
            decide = arrived = False
            while heap and heap[0][0] == t:
                _, _, kind, payload = heapq.heappop(heap)
                if kind == _ARRIVAL:
                    payload.state = WAITING
                    self.waiting[payload.req_id] = payload
                    if self.waiting_views is not None:  # it joins at the end
                        self.waiting_views += (payload.waiting_view(),)
                    arrived = True
                elif kind == _STEP_END:
                    decide |= self._step_end(payload)
                else:
                    self._migration_end(*payload)
                    decide = True
            # In lockstep a newcomer waits for the step in flight to end.
            free = self.num_idle == self.n if self.lockstep else self.num_idle > 0
            if decide or (arrived and free):
                self._decide()

    def _decide(self) -> None:
        while True:
            if self.check:
                self._check_books()
            view = self._view()
            plan = self.policy.schedule(view)
            self.num_decisions += 1
            if self.check:
                plan.check_invariants(view)
            self._apply(plan)
            if plan.batches or plan.migrations or not plan.preempt:
                return

    def _view(self) -> ClusterView:
        for i in self.dirty:
            self.inst_views[i] = InstanceView(
                i, self.cap, self.used[i] + self.reserved[i], self.busy[i]
            )
        self.dirty.clear()
        done = self.num_finished
        # A waiting request's cached view matches its state (launches and
        # preemptions reset it), so a cached one is taken without a call.
        waiting = self.waiting_views
        if waiting is None:
            waiting = tuple(
                [
                    view if (view := r.view) is not None else r.waiting_view()  # type: ignore[misc]
                    for r in self.waiting.values()
                ]
            )
            self.waiting_views = waiting
        # Every change to a running request marks it stale (a new one holds
        # its queue-order slot until rebuilt here), so the others' views are
        # reused as they are.
        views = self.running_views
        for req in self.stale:
            if req.state == RUNNING:
                views[req.req_id] = req.running_view()
        self.stale.clear()
        return ClusterView(
            now_s=self.now,
            instances=tuple(self.inst_views),
            waiting=waiting,
            running=tuple(views.values()),  # type: ignore[arg-type]  # every slot rebuilt above
            mean_finished_output_tokens=self.sum_finished_output / done if done else 0.0,
        )

    # ------------------------------------------------------------------ plans
    def _apply(self, plan: ClusterPlan) -> None:
        if plan.preempt:
            self._preempt(plan.preempt)
        ends, moved = self._migrate(plan.migrations)
        in_batches: set[int] = set()
        launched: list[tuple[BatchRun, float]] = []
        batches = plan.batches
        if self.chunk_limit is not None and any(b.prefills for b in batches):
            batches = self._chunked(batches)
        for batch in batches:
            start = max([ends[i] for i in batch.instances if i in ends], default=self.now)
            launched.append(self._launch(batch, start))
            in_batches.update(batch.instances)
        if self.lockstep and launched:
            # The engine steps every instance together: one step, one end.
            common = max(end for _, end in launched)
            launched = [(run, common) for run, _ in launched]
        for run, end in launched:
            self._push(end, _STEP_END, run)
        if plan.batches:
            self.plans_without_batch = 0
        elif plan.migrations:
            self.plans_without_batch += 1
            if self.plans_without_batch > _MAX_PLANS_WITHOUT_BATCH:
                raise RuntimeError(f"{type(self.policy).__name__} only migrates: no progress")
        # Migration endpoints and requests outside every batch wait for it.
        done_at: dict[float, tuple[list[int], list[SimReq]]] = {}
        for i, end in ends.items():
            if i not in in_batches:
                self._set_busy(i, True)
                done_at.setdefault(end, ([], []))[0].append(i)
        for req, end in moved.items():
            if not req.busy:
                req.busy = True
                req.view = None
                self.stale.add(req)
                done_at.setdefault(end, ([], []))[1].append(req)
        for end, (instances, reqs) in done_at.items():
            self._push(end, _MIGRATION_END, (instances, reqs))

    def _chunked(self, batches: Sequence[Batch]) -> tuple[Batch, ...]:
        """``batches`` with each prefill item cut to ``chunk_limit`` (the
        engine's chunked prefill): the cut keeps the front of its ``retain``
        (the engine fills its storage instances in order) and the rest of
        the prompt waits for a later decision."""
        limit = self.chunk_limit
        assert limit is not None
        decodes = any(r.num_computed >= r.num_prompt for r in self.running.values())
        out = []
        for batch in batches:
            items = []
            for item in batch.prefills:
                req = self.waiting.get(item.req_id) or self.running[item.req_id]
                allowed = limit(item.num_tokens, req.num_computed, len(batch.instances), decodes)
                items.append(_cut(item, max(1, allowed)))
            out.append(replace(batch, prefills=tuple(items)))
        return tuple(out)

    def _preempt(self, req_ids: Sequence[str]) -> None:
        front: dict[str, SimReq] = {}
        for req_id in req_ids:
            req = self.running.pop(req_id, None)
            assert req is not None and not req.busy, f"cannot preempt {req_id}"
            del self.running_views[req_id]
            self._free(req)
            req.state = WAITING
            req.num_prompt = req.orig_prompt + req.num_output
            req.num_preemptions += 1
            req.view = None
            front[req_id] = req
        self.waiting = front | self.waiting
        self.waiting_views = None

    def _migrate(
        self, migrations: Sequence[Migration]
    ) -> tuple[dict[int, float], dict[SimReq, float]]:
        """Move the KV now; return when each endpoint and each request is free."""
        if not migrations:
            return {}, {}
        tokens_at: dict[int, int] = {}
        for mig in migrations:
            req = self.running.get(mig.req_id)
            src, dst, num = mig.src, mig.dst, mig.num_tokens
            assert req is not None and not req.busy, f"bad migration {mig}"
            assert src != dst and not self.busy[src] and not self.busy[dst], f"bad {mig}"
            held = req.kv.get(src, 0)
            assert 0 < num <= held, f"migration {mig} moves more than the {held} tokens there"
            if num == held:
                del req.kv[src]
            else:
                req.kv[src] = held - num
            req.kv[dst] = req.kv.get(dst, 0) + num
            req.view = None
            self.stale.add(req)
            self.used[src] -= num
            self.used[dst] += num
            self._check_capacity(dst)
            self.dirty.update((src, dst))
            tokens_at[src] = tokens_at.get(src, 0) + num
            tokens_at[dst] = tokens_at.get(dst, 0) + num
            self.num_migrated_tokens += num
        ends = {i: self.now + self.truth.migration_time(t) for i, t in tokens_at.items()}
        moved: dict[SimReq, float] = {}
        for mig in migrations:
            req = self.running[mig.req_id]
            moved[req] = max(moved.get(req, self.now), ends[mig.src], ends[mig.dst])
        return ends, moved

    def _launch(self, batch: Batch, start_s: float) -> tuple[BatchRun, float]:
        """Start ``batch`` (KV retained, decode tokens reserved); returns its
        run and when its first step ends."""
        group = batch.instances
        assert group and len(set(group)) == len(group), f"bad group {group}"
        assert batch.prefills or batch.decodes, "empty batch"
        assert batch.num_steps >= 1 and not (batch.prefills and batch.num_steps > 1)
        for i in group:
            assert 0 <= i < self.n and not self.busy[i], f"instance {i} is not idle"
            self._set_busy(i, True)
        members = set(group)
        run = BatchRun(group, batch.tensor_parallel, 1 if self.lockstep else batch.num_steps)
        chunks: list[tuple[int, int]] = []
        for item in batch.prefills:
            req = self.waiting.pop(item.req_id, None)
            if req is not None:
                self.waiting_views = None
                req.state = RUNNING
                self.running[req.req_id] = req
                self.running_views[req.req_id] = None  # its place; built when viewed
            else:
                req = self.running.get(item.req_id)
                assert req is not None and not req.busy, f"{item.req_id} cannot prefill"
            cached = req.num_computed
            assert 0 < item.num_tokens <= req.num_prompt - cached, f"{item} prefills too much"
            assert sum(t for _, t in item.retain) == item.num_tokens, f"{item} retain count"
            for inst, tokens in item.retain:
                assert tokens > 0 and inst in members, f"{item} retains outside its group"
                req.kv[inst] = req.kv.get(inst, 0) + tokens
                self.used[inst] += tokens
                self._check_capacity(inst)
            req.num_computed += item.num_tokens
            req.busy = True
            req.view = None
            self.stale.add(req)
            chunks.append((item.num_tokens, cached))
            run.prefills.append(req)
        for dec in batch.decodes:
            req = self.running.get(dec.req_id)
            assert req is not None and not req.busy, f"{dec} not decodable"
            assert req.num_computed >= req.num_prompt, f"{dec}: prefill not complete"
            assert dec.master in members and members.issuperset(req.kv), f"{dec} outside group"
            req.busy = True
            req.view = None
            self.stale.add(req)
            self.reserved[dec.master] += min(run.steps_left, req.num_remaining_output)
            self._check_capacity(dec.master)
            run.add_decode(req, dec.master)
        duration = run.step_time(self.truth)
        if chunks:
            duration += self.truth.chunks_time(
                len(group), chunks, tensor_parallel=batch.tensor_parallel
            )
        self.num_batches += 1
        return run, start_s + duration

    # ------------------------------------------------------------------ events
    def _step_end(self, run: BatchRun) -> bool:
        """Apply one step of ``run``; True when the batch is over."""
        for req in run.prefills:
            if req.num_computed == req.num_prompt:  # the prefill samples a token
                req.num_output += 1
                if req.first_token_s is None:
                    req.first_token_s = self.now
                if req.num_output == req.max_output:
                    self._finish(req)
        run.prefills = [r for r in run.prefills if r.state == RUNNING]
        used, reserved, num_kv, stale = self.used, self.reserved, run.num_kv, self.stale
        striped = run.num_striped_kv
        for req, master in list(run.decodes.items()):
            kv = req.kv
            kv[master] = kv.get(master, 0) + 1
            if len(kv) > 1:  # it exchanges (BatchRun counts its KV as striped)
                striped[master] += 1
            req.num_computed += 1
            req.num_output += 1
            req.view = None
            stale.add(req)
            used[master] += 1
            reserved[master] -= 1
            num_kv[master] += 1
            if req.num_output == req.max_output:
                run.remove_decode(req)
                self._finish(req)
        self.dirty.update(run.decodes.values())
        run.steps_left -= 1
        if run.steps_left > 0 and run.decodes:
            self._push(self.now + run.step_time(self.truth), _STEP_END, run)
            return False
        for req in (*run.prefills, *run.decodes):
            req.busy = False
            req.view = None
            stale.add(req)
        for i in run.instances:
            assert reserved[i] == 0, f"instance {i}: {reserved[i]} reserved tokens left"
            self._set_busy(i, False)
        return True

    def _migration_end(self, instances: list[int], reqs: list[SimReq]) -> None:
        for i in instances:
            self._set_busy(i, False)
        for req in reqs:
            req.busy = False
            req.view = None
            self.stale.add(req)

    def _finish(self, req: SimReq) -> None:
        assert req.state == RUNNING, f"{req.req_id} finishes twice"
        self._free(req)
        del self.running[req.req_id]
        del self.running_views[req.req_id]
        req.state = FINISHED
        req.finish_s = self.now
        req.busy = False
        self.num_finished += 1
        self.sum_finished_output += req.max_output

    # ------------------------------------------------------------------ books
    def _free(self, req: SimReq) -> None:
        for inst, tokens in req.kv.items():
            self.used[inst] -= tokens
            assert self.used[inst] >= 0, f"instance {inst} below zero"
            self.dirty.add(inst)
        req.kv = {}
        req.num_computed = 0

    def _set_busy(self, inst: int, busy: bool) -> None:
        self.num_idle += 1 if self.busy[inst] else 0
        self.num_idle -= 1 if busy else 0
        self.busy[inst] = busy
        self.dirty.add(inst)

    def _check_capacity(self, inst: int) -> None:
        held = self.used[inst] + self.reserved[inst]
        assert held <= self.cap, f"instance {inst} over capacity: {held} > {self.cap}"

    def _check_books(self) -> None:
        """Recount every instance's KV from the requests (``check=True``)."""
        counted = [0] * self.n
        for req in self.running.values():
            assert req.state == RUNNING and sum(req.kv.values()) == req.num_computed
            for inst, tokens in req.kv.items():
                assert tokens > 0
                counted[inst] += tokens
        assert counted == self.used, f"KV books differ: {counted} != {self.used}"
        for i in range(self.n):
            assert self.used[i] >= 0 and self.reserved[i] >= 0
            self._check_capacity(i)
        assert self.num_idle == self.busy.count(False)
        assert all(r.state == WAITING and not r.kv for r in self.waiting.values())

    def finished(self) -> list[SimReq]:
        """The finished requests, in trace order (checked for completeness)."""
        done = [r for r in self.reqs if r.state == FINISHED]
        assert len(done) == self.num_finished
        assert all(r.num_output == r.max_output for r in done)
        return done


def _cut(item: PrefillItem, num_tokens: int) -> PrefillItem:
    """``item`` with at most ``num_tokens`` tokens, its ``retain`` cut from the back."""
    if num_tokens >= item.num_tokens:
        return item
    retain: list[tuple[int, int]] = []
    left = num_tokens
    for inst, tokens in item.retain:
        if left <= 0:
            break
        retain.append((inst, min(tokens, left)))
        left -= tokens
    return PrefillItem(item.req_id, num_tokens, tuple(retain))
