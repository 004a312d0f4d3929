"""ESP workers: vLLM's CPU/GPU workers plus the ESP group and the ESP step.

Selected per instance by :class:`~vllm_esp.integration.esp.executor.ESPExecutor`
through ``parallel_config.worker_cls`` (a qualname, as vLLM requires). vLLM
still initialises the device, loads the model and allocates the KV cache;
the worker adds three RPCs the executor calls:

* ``esp_init_group(instance, num_instances, host, port)``: join the ESP
  process group (gloo on CPU, NCCL on GPU) beside vLLM's own world of one;
* ``esp_execute(plan, swap)``: run this instance's share of an ESP step
  (and of the step's host-swap copies);
* ``esp_counters()``: bytes exchanged, tokens computed (in rings, and kept
  from passing stripes), blocks migrated in, blocks swapped out/in.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_esp.core.esp.step_plan import ESPStepPlan


class ESPWorkerMixin:
    """The ESP RPCs; mixed into a vLLM worker class (first in the MRO)."""

    _esp_group: Any = None
    _esp_runner: Any = None
    _esp_instance: int = 0
    # Set by the vLLM worker class this is mixed into.
    device: Any
    vllm_config: Any
    model_runner: Any

    def _esp_register_backend(self) -> None:
        from vllm_esp.integration.esp.attention_backend import register_esp_backend

        register_esp_backend()

    def esp_group_address(self) -> tuple[str, int]:
        """An address on this node for the ESP group's rendezvous (instance 0)."""
        from vllm.utils.network_utils import get_ip, get_open_port

        return get_ip(), get_open_port()

    def esp_init_group(self, instance: int, num_instances: int, host: str, port: int) -> int:
        from vllm.distributed.utils import (
            stateless_init_torch_distributed_process_group,
        )

        from vllm_esp.kernels.esp.group import InstanceGroup

        device = self.device if isinstance(self.device, torch.device) else torch.device(self.device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        pg = stateless_init_torch_distributed_process_group(
            host, port, instance, num_instances, backend=backend
        )
        self._esp_group = InstanceGroup(pg, device=device) if num_instances > 1 else None
        self._esp_instance = instance
        return instance

    def _esp_make_runner(self):
        from vllm.model_executor.layers.attention.attention import Attention

        from vllm_esp.integration.esp.runner import ESPStepRunner

        context = self.vllm_config.compilation_config.static_forward_context
        layers = {name: layer for name, layer in context.items() if isinstance(layer, Attention)}
        device = self.device if isinstance(self.device, torch.device) else torch.device(self.device)
        return ESPStepRunner(
            self.vllm_config,
            self.model_runner.get_model(),
            layers,
            self._esp_group,
            self._esp_instance,
            device,
        )

    def esp_execute(self, plan: ESPStepPlan, swap: Any = None) -> tuple[dict[str, int], set[str]]:
        if self._esp_runner is None:
            self._esp_runner = self._esp_make_runner()
        return self._esp_runner.execute(plan, swap)

    def esp_counters(self) -> dict[str, int]:
        runner, group = self._esp_runner, self._esp_group
        return {
            "instance": self._esp_instance,
            "steps": runner.num_steps if runner else 0,
            "tokens_computed": runner.num_tokens_computed if runner else 0,
            "local_kernel_rows": runner.num_local_kernel_rows if runner else 0,
            "ring_rows": runner.num_ring_rows if runner else 0,
            "ring_kept_rows": runner.num_ring_kept_rows if runner else 0,
            "blocks_moved_in": runner.num_blocks_moved_in if runner else 0,
            "host_blocks_out": runner.host_swap.num_blocks_out
            if runner and runner.host_swap
            else 0,
            "host_blocks_in": runner.host_swap.num_blocks_in if runner and runner.host_swap else 0,
            "bytes_sent": group.num_bytes_sent if group else 0,
            "bytes_received": group.num_bytes_received if group else 0,
        }


def _cpu_worker() -> type:
    from vllm.v1.worker.cpu_worker import CPUWorker

    class ESPCPUWorker(ESPWorkerMixin, CPUWorker):
        """vLLM's ``CPUWorker`` with the ESP RPCs and attention backend."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._esp_register_backend()
            super().__init__(*args, **kwargs)

    return ESPCPUWorker


def _gpu_worker() -> type:
    from vllm.v1.worker.gpu_worker import Worker

    class ESPGPUWorker(ESPWorkerMixin, Worker):
        """vLLM's GPU ``Worker`` with the ESP RPCs and attention backend."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._esp_register_backend()
            super().__init__(*args, **kwargs)

    return ESPGPUWorker


def __getattr__(name: str) -> Any:
    if name == "ESPCPUWorker":
        cls = _cpu_worker()
    elif name == "ESPGPUWorker":
        cls = _gpu_worker()
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls


def worker_qualname() -> str:
    """The ESP worker class for this platform."""
    from vllm.platforms import current_platform

    return (
        "vllm_esp.integration.esp.worker.ESPCPUWorker"
        if current_platform.is_cpu()
        else "vllm_esp.integration.esp.worker.ESPGPUWorker"
    )
