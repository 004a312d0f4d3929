"""The cluster simulator's mutable state: requests, and batches in flight.

Kept apart from the event loop (``cluster.py``) so that each stays a
screenful per concern. Everything here is private to ``vllm_esp.sim``; the
public records are the frozen dataclasses of ``cluster.py``.
"""

from __future__ import annotations

from vllm_esp.core.esp.cluster import RunningRequest, WaitingRequest
from vllm_esp.core.esp.cost_model import ESPCostModel

__all__ = ["FINISHED", "FUTURE", "REFUSED", "RUNNING", "WAITING", "BatchRun", "SimReq"]

# Request states.
FUTURE = 0  # not arrived yet
WAITING = 1  # in the queue, no KV
RUNNING = 2  # KV resident (prefilling in chunks, or decoding)
FINISHED = 3
REFUSED = 4  # no plan could ever hold it (refused at arrival)


class SimReq:
    """One request's state; ``view`` caches its frozen view until it changes."""

    __slots__ = (
        "arrival_s",
        "busy",
        "cls",
        "finish_s",
        "first_token_s",
        "kv",
        "max_output",
        "num_computed",
        "num_output",
        "num_preemptions",
        "num_prompt",
        "orig_prompt",
        "req_id",
        "state",
        "view",
    )

    def __init__(self, req_id: str, arrival_s: float, prompt: int, output: int, cls: str) -> None:
        self.req_id = req_id
        self.arrival_s = arrival_s
        self.orig_prompt = prompt
        self.max_output = output
        self.cls = cls
        #: Tokens to prefill: the prompt, plus the outputs so far once preempted.
        self.num_prompt = prompt
        self.num_output = 0
        #: Resident KV per instance (no zero entries) and its sum.
        self.kv: dict[int, int] = {}
        self.num_computed = 0
        self.state = FUTURE
        self.busy = False
        self.first_token_s: float | None = None
        self.finish_s = 0.0
        self.num_preemptions = 0
        self.view: WaitingRequest | RunningRequest | None = None

    @property
    def num_remaining_output(self) -> int:
        return self.max_output - self.num_output

    @property
    def peak_tokens(self) -> int:
        """KV the request holds just before it finishes (see ``cluster.py``)."""
        return self.orig_prompt + self.max_output - 1

    def waiting_view(self) -> WaitingRequest:
        view = self.view
        if view is None:
            view = WaitingRequest(
                self.req_id, self.arrival_s, self.num_prompt, self.max_output, self.num_output
            )
            self.view = view
        return view  # type: ignore[return-value]

    def running_view(self) -> RunningRequest:
        view = self.view
        if view is None:
            view = RunningRequest(
                self.req_id,
                self.arrival_s,
                self.num_prompt,
                self.max_output,
                self.num_output,
                tuple(self.kv.items()) if len(self.kv) == 1 else tuple(sorted(self.kv.items())),
                self.busy,
            )
            self.view = view
        return view  # type: ignore[return-value]


class BatchRun:
    """A launched batch: its prefilled requests and its decoding requests.

    Decode step times need, per group instance, the requests it masters,
    the KV tokens it reads and its (query, partial) exchanges; they are kept
    as running sums, updated as tokens are added and requests leave, so a
    step costs O(requests + DoP), not O(KV entries).
    """

    __slots__ = (
        "decodes",
        "instances",
        "num_kv",
        "num_master",
        "num_remote",
        "num_striped_kv",
        "prefills",
        "steps_left",
        "tensor_parallel",
    )

    def __init__(self, instances: tuple[int, ...], tensor_parallel: bool, num_steps: int) -> None:
        self.instances = instances
        self.tensor_parallel = tensor_parallel
        self.steps_left = num_steps
        self.prefills: list[SimReq] = []
        #: Decoding requests still in the batch, with their master.
        self.decodes: dict[SimReq, int] = {}
        self.num_master = dict.fromkeys(instances, 0)
        self.num_kv = dict.fromkeys(instances, 0)
        self.num_remote = dict.fromkeys(instances, 0)
        #: KV tokens here of requests that exchange (their KV is not all on their master).
        self.num_striped_kv = dict.fromkeys(instances, 0)

    def add_decode(self, req: SimReq, master: int) -> None:
        self.decodes[req] = master
        self._count(req, master, 1)

    def remove_decode(self, req: SimReq) -> None:
        self._count(req, self.decodes.pop(req), -1)

    def _count(self, req: SimReq, master: int, sign: int) -> None:
        self.num_master[master] += sign
        elsewhere = False
        for inst, tokens in req.kv.items():
            self.num_kv[inst] += sign * tokens
            if inst != master:
                self.num_remote[inst] += sign
                elsewhere = True
        if elsewhere:
            self.num_remote[master] += sign
            for inst, tokens in req.kv.items():
                self.num_striped_kv[inst] += sign * tokens

    def step_time(self, truth: ESPCostModel) -> float:
        """One decode step of the requests left: the slowest group instance
        (ESP), or the tensor-parallel group as one instance."""
        if not self.decodes:
            return 0.0
        if self.tensor_parallel:
            total_kv = sum(self.num_kv.values())
            return truth.decode_time(len(self.decodes), total_kv, tp_degree=len(self.instances))
        master, kv, remote, striped = (
            self.num_master,
            self.num_kv,
            self.num_remote,
            self.num_striped_kv,
        )
        return max(
            truth.decode_time(master[i], kv[i], remote[i], striped[i]) for i in self.instances
        )
