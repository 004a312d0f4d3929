"""How ESP instances are started: local processes or Ray actors.

Each instance is one vLLM worker (a full model replica with its own KV
cache and its own world of one) that the ESP executor drives by RPC:

* :class:`MPInstance` wraps vLLM's own ``MultiprocExecutor`` with a world
  of one (its process, message queues, health monitor and OpenMP binding);
* :class:`RayInstance` is vLLM's own ``RayWorkerWrapper`` as a Ray actor,
  placed in bundle ``i`` of one placement group (one bundle per instance),
  so the instances can sit on different nodes of a Ray cluster.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any


class Pending:
    """Result of an RPC in flight."""

    def __init__(self, getter: Any) -> None:
        self._getter = getter

    def result(self) -> Any:
        return self._getter()


class Instance(ABC):
    """One ESP instance, driven by RPC."""

    index: int

    @abstractmethod
    def call(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
        """Run ``method(*args, **kwargs)`` on the worker without waiting:
        a worker method's name, or a function taking the worker first (as
        vLLM's ``collective_rpc``)."""

    def call_sync(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.call(method, *args, **kwargs).result()

    @abstractmethod
    def check_health(self) -> None: ...

    @abstractmethod
    def shutdown(self) -> None: ...


@contextlib.contextmanager
def bound_env(**values: str | None) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block.

    An executor's workers read ``VLLM_CPU_OMP_THREADS_BIND`` /
    ``CUDA_VISIBLE_DEVICES`` when it starts them, so setting them around its
    construction binds that executor (or engine) alone; vLLM's env cache is
    dropped on both sides so it reads the values of the moment.
    """
    import vllm.envs as envs

    old = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        envs.disable_envs_cache()
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        envs.disable_envs_cache()


def default_cpu_binds(num_instances: int) -> list[str | None]:
    """Split this process's allowed cores evenly; None (no binding) if too few."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < num_instances:
        return [None] * num_instances
    per = len(cores) // num_instances
    return [",".join(str(c) for c in cores[i * per : (i + 1) * per]) for i in range(num_instances)]


def _wait_for_replies_idle(executor: Any) -> None:
    """EngineCore waits for this instance's replies without busy-polling.

    vLLM's reader of a worker's reply queue spins (``sched_yield``) for a
    second after every reply before it sleeps on the queue's notification
    socket. With one worker that spin has a core of its own; on a CPU
    machine whose cores are all bound to ESP instances it runs on theirs,
    and during a step (the whole time EngineCore waits) it took about a
    fifth of a core from them. The writer notifies the socket on every
    reply, so sleeping on it at once costs a wake-up (tens of µs) per step.
    """
    for queue in executor.response_mqs:
        spin = getattr(queue, "_spin_condition", None)
        if spin is not None:
            spin.busy_loop_s = 0.0


class MPInstance(Instance):
    """An instance in a local process (vLLM's ``MultiprocExecutor`` of one worker)."""

    def __init__(self, index: int, vllm_config: Any, cpu_bind: str | None) -> None:
        from vllm.platforms import current_platform
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        self.index = index
        bind: dict[str, str | None] = {}
        if current_platform.is_cpu():
            bind["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind or "nobind"
        else:
            # One GPU per instance, by index among the visible ones.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            devices = (
                visible.split(",")
                if visible
                else [str(i) for i in range(current_platform.device_count())]
            )
            if index >= len(devices):
                raise ValueError(f"ESP instance {index} needs a GPU; only {len(devices)} visible")
            bind["CUDA_VISIBLE_DEVICES"] = devices[index]
        with bound_env(**bind):
            self.executor = MultiprocExecutor(vllm_config)
        if current_platform.is_cpu():
            _wait_for_replies_idle(self.executor)

    def call(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
        future = self.executor.collective_rpc(
            method, args=args, kwargs=kwargs or None, non_block=True
        )
        return Pending(lambda: future.result()[0])

    def check_health(self) -> None:
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()


class RayInstance(Instance):
    """An instance as a Ray actor in bundle ``index`` of ``placement_group``."""

    def __init__(
        self, index: int, vllm_config: Any, placement_group: Any, num_cpus: float, num_gpus: float
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        from vllm.v1.executor.ray_utils import RayWorkerWrapper

        self.index = index
        self._ray = ray
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RayWorkerWrapper)
        self.actor = actor_cls.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=placement_group,
                placement_group_bundle_index=index,
            )
        ).remote(rpc_rank=0)
        # A world of one needs no port: a FileStore on the actor's own node.
        init_method = f"file://{tempfile.gettempdir()}/vllm-esp-{uuid.uuid4().hex}"
        kwargs = dict(
            vllm_config=vllm_config,
            local_rank=0,
            rank=0,
            distributed_init_method=init_method,
            is_driver_worker=True,
        )
        ray.get(self.actor.init_worker.remote([kwargs]))

    def call(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
        if not isinstance(method, str):
            import cloudpickle  # what vLLM's own Ray executor sends functions as

            method = cloudpickle.dumps(method)
        ref = self.actor.execute_method.remote(method, *args, **kwargs)
        return Pending(lambda: self._ray.get(ref))

    def node_ip(self) -> str:
        return self._ray.get(self.actor.get_node_ip.remote())

    def check_health(self) -> None:
        self._ray.get(self.actor.get_node_ip.remote(), timeout=30)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.get(self.actor.execute_method.remote("shutdown"), timeout=30)
        with contextlib.suppress(Exception):
            self._ray.kill(self.actor)
