"""ESP communication: dynamic instance groups inside one process group.

Every instance is one rank of a single ``torch.distributed`` world (gloo on
CPU, NCCL on GPU), built once at start-up. A per-iteration group is not a
communicator: it is the ordered tuple of instance ids a plan names (logical
rank = index), and every exchange is one batch of point-to-point operations
(``dist.batch_isend_irecv``) between the members that need to talk. So
regrouping every step costs nothing, as in LoongServe's ``rnccl`` groups.

``InstanceCluster`` launches N such processes locally (spawn + a FileStore)
and runs picklable functions on all of them; tests and benchmarks use it.
"""

from __future__ import annotations

import datetime
import os
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TensorPeer = tuple[int, torch.Tensor]
"""``(peer instance id, tensor)``."""


class PendingExchange:
    """Handles of one posted batch of sends and receives."""

    def __init__(self, works: Sequence[dist.Work], tensors: Sequence[torch.Tensor]) -> None:
        self._works = list(works)
        # Keep the buffers alive until the transfers are done, even if the
        # caller built them inline.
        self._tensors = list(tensors)

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works.clear()
        self._tensors.clear()


class InstanceGroup:
    """This process's instance in the ESP world, with point-to-point exchange.

    The instance id is the rank in ``process_group``: the default world, or
    a group that torch.distributed does not know about, such as the one
    vLLM's ``stateless_init_torch_distributed_process_group`` returns (hence
    only the ProcessGroup's own methods and group-relative peers are used).
    Byte counters record the payload this instance sent and received.
    """

    def __init__(
        self, process_group: dist.ProcessGroup | None = None, device: torch.device | None = None
    ) -> None:
        if process_group is None:
            process_group = dist.group.WORLD
        if process_group is None:
            raise RuntimeError("torch.distributed is not initialized")
        self.process_group: dist.ProcessGroup = process_group
        self.instance_id = process_group.rank()
        self.num_instances = process_group.size()
        self.backend = process_group.name()
        if device is None:
            device = (
                torch.device("cuda", torch.cuda.current_device())
                if self.backend == "nccl"
                else torch.device("cpu")
            )
        self.device = device
        try:
            dist.get_global_rank(process_group, 0)
            self._registered = True
        except ValueError:
            self._registered = False
        self.num_bytes_sent = 0
        self.num_bytes_received = 0
        # NCCL requires every rank to join the first operation on a
        # communicator before batch_isend_irecv may involve only some of them.
        self.barrier()

    def exchange(self, sends: Sequence[TensorPeer], recvs: Sequence[TensorPeer]) -> PendingExchange:
        """Post all ``sends`` and ``recvs`` as one batch; returns immediately.

        Both sides must list the tensors they exchange with one peer in the
        same order: the k-th send to a peer matches its k-th receive from
        this instance (tagged ``k``). Empty tensors are skipped on both
        sides, which therefore must agree on sizes (plans guarantee it).
        Tensors must not be touched until ``wait()`` returns.
        """
        ops: list[tuple[bool, torch.Tensor, int, int]] = []  # (is_send, tensor, peer, tag)
        for is_send, pairs in ((True, sends), (False, recvs)):
            count_per_peer: dict[int, int] = {}
            for peer, tensor in pairs:
                if peer == self.instance_id:
                    raise ValueError("an instance cannot exchange with itself")
                tag = count_per_peer.get(peer, 0)
                count_per_peer[peer] = tag + 1
                if tensor.numel() > 0:
                    ops.append((is_send, tensor, peer, tag))
        self.num_bytes_sent += sum(t.numel() * t.element_size() for _, t in sends)
        self.num_bytes_received += sum(t.numel() * t.element_size() for _, t in recvs)
        if not ops:
            return PendingExchange([], [])
        return PendingExchange(self._post(ops), [t for _, t, _, _ in ops])

    def _post(self, ops: list[tuple[bool, torch.Tensor, int, int]]) -> list[dist.Work]:
        pg = self.process_group
        if self._registered:
            return dist.batch_isend_irecv(
                [
                    dist.P2POp(
                        dist.isend if is_send else dist.irecv,
                        tensor,
                        group=pg,
                        tag=tag,
                        group_peer=peer,
                    )
                    for is_send, tensor, peer, tag in ops
                ]
            )
        # A group unknown to torch.distributed (P2POp would look up global
        # ranks and fail): do what batch_isend_irecv does, through the
        # ProcessGroup itself. NCCL coalesces the batch into one group call.
        coalesce = pg._get_backend(self.device).supports_coalescing
        if coalesce:
            pg._start_coalescing(self.device)
        works = [
            pg.send([tensor], peer, tag) if is_send else pg.recv([tensor], peer, tag)
            for is_send, tensor, peer, tag in ops
        ]
        if coalesce:
            return [pg._end_coalescing(self.device)]
        return works

    def reset_counters(self) -> None:
        self.num_bytes_sent = 0
        self.num_bytes_received = 0

    def barrier(self) -> None:
        """Block until every instance got here (an all-reduce: works on any backend)."""
        token = torch.zeros(1, device=self.device)
        self.process_group.allreduce([token]).wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


class InstanceFailure(RuntimeError):
    """A function run on the cluster raised (or a process died) on some instance."""


def _instance_main(
    rank: int,
    num_instances: int,
    init_file: str,
    backend: str,
    num_threads: int,
    timeout_s: float,
    tasks: Any,
    results: Any,
) -> None:
    torch.set_num_threads(num_threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=num_instances,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    group = InstanceGroup()
    try:
        while (task := tasks.get()) is not None:
            fn, args, kwargs = task
            try:
                results.put((rank, True, fn(group, *args, **kwargs)))
            except BaseException:  # report every failure, the parent decides
                results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class InstanceCluster:
    """N local processes forming one ESP world; ``run`` calls a function on all.

    ``fn(group: InstanceGroup, *args, **kwargs)`` must be picklable by
    reference (a module-level function). If any instance fails, the whole
    cluster is torn down (peers may be blocked in a receive) and started
    again on the next ``run``.
    """

    def __init__(
        self,
        num_instances: int,
        *,
        backend: str = "gloo",
        num_threads: int = 1,
        timeout_s: float = 120.0,
    ) -> None:
        self.num_instances = num_instances
        self.backend = backend
        self.num_threads = num_threads
        self.timeout_s = timeout_s
        self._procs: list[Any] = []
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._tmpdir = tempfile.mkdtemp(prefix="esp_store_")
        self._tasks = [ctx.Queue() for _ in range(self.num_instances)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_instance_main,
                daemon=True,
                args=(
                    r,
                    self.num_instances,
                    os.path.join(self._tmpdir, "store"),
                    self.backend,
                    self.num_threads,
                    self.timeout_s,
                    self._tasks[r],
                    self._results,
                ),
            )
            for r in range(self.num_instances)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn`` on every instance; return the results indexed by instance id."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(outcomes) < self.num_instances:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
                outcomes[rank] = (ok, value)
                if not ok:
                    # Peers blocked on the failed instance will not answer soon.
                    deadline = min(deadline, time.monotonic() + 5.0)
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(self._procs) if not p.is_alive() and r not in outcomes
                ]
                if dead or time.monotonic() > deadline:
                    for r in range(self.num_instances):
                        outcomes.setdefault(
                            r,
                            (
                                False,
                                "process died" if r in dead else "no answer before the timeout",
                            ),
                        )
        failures = {r: v for r, (ok, v) in sorted(outcomes.items()) if not ok}
        if failures:
            self._stop(force=True)
            raise InstanceFailure(
                "\n".join(f"--- instance {r} ---\n{v}" for r, v in failures.items())
            )
        return [outcomes[r][1] for r in range(self.num_instances)]

    def _stop(self, force: bool) -> None:
        for p, q in zip(self._procs, self._tasks):
            if force:
                p.terminate()
            else:
                q.put(None)
        for p in self._procs:
            p.join(timeout=10.0)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs = []
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def close(self) -> None:
        if self._procs:
            self._stop(force=False)

    def __enter__(self) -> InstanceCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
