"""``ESPExecutor``: one vLLM executor over N instances (model replicas).

To EngineCore it looks like an executor of ONE worker whose KV cache is the
N instances' caches side by side: it reports the sum of their KV memory,
so vLLM sizes a block space of ``N * blocks_per_instance`` blocks, and the
ESP scheduler places blocks on instances (global id = instance * B + local
id). Per step it hands the scheduler's plan (``SchedulerOutput.esp_plan``)
to every instance, which compute, exchange and attend in lock-step, and
merges their sampled tokens into one ``ModelRunnerOutput``::

    EngineCore ── schedule() ──> SchedulerOutput + esp_plan
         │
    ESPExecutor.execute_model ──> esp_execute(plan) on instance 0 .. N-1
         │                          (gloo / NCCL exchanges between them)
         └── merge {req_id: token} from each instance ──> ModelRunnerOutput
"""

from __future__ import annotations

import copy
from concurrent.futures import Future
from typing import Any

from vllm.logger import init_logger
from vllm.v1.executor.abstract import Executor
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_esp.core.esp.config import ESPConfig
from vllm_esp.core.esp.step_plan import ESPStepPlan, blocks_per_instance
from vllm_esp.integration.esp.instances import (
    Instance,
    MPInstance,
    RayInstance,
    default_cpu_binds,
)
from vllm_esp.integration.esp.worker import worker_qualname

logger = init_logger(f"vllm.{__name__}")


class ESPExecutor(Executor):
    """Executor of N ESP instances (see module docstring)."""

    uses_ray = False
    supports_pp = False

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        # The plan of step t+1 needs step t's sampled tokens.
        return False

    # ------------------------------------------------------------------ start-up
    def _init_executor(self) -> None:
        self.esp_config = ESPConfig.from_additional_config(self.vllm_config.additional_config)
        n = self.esp_config.num_instances
        pc = self.vllm_config.parallel_config
        if pc.world_size != 1:
            raise ValueError(
                "ESP instances are single-worker replicas: tensor/pipeline "
                f"parallelism is not supported (world size {pc.world_size})"
            )
        if not self.vllm_config.model_config.enforce_eager:
            raise ValueError(
                "ESP runs the model eagerly: set enforce_eager=True "
                "(vllm_esp.scheduler_args('esp', ...) does)"
            )
        self.instances: list[Instance] = []
        try:
            if self.esp_config.backend == "ray":
                self._start_ray(n)
            else:
                self._start_mp(n)
            self._init_group()
        except BaseException:
            self.shutdown()
            raise
        self.num_blocks_total = 0
        self.blocks_per_instance = 0
        logger.info("vllm-esp: %d ESP instances started (%s backend)", n, self.esp_config.backend)

    def _instance_config(self, index: int) -> Any:
        config = copy.deepcopy(self.vllm_config)
        config.parallel_config.worker_cls = worker_qualname()
        config.parallel_config.distributed_executor_backend = "mp"
        # Host swap (if on) is carried out by the ESP runner from the
        # scheduler's metadata: instances build no connector of their own.
        config.kv_transfer_config = None
        extra = dict(config.additional_config or {})
        extra["esp_instance"] = index  # for logs; the ESP group assigns the rank
        config.additional_config = extra
        return config

    def _start_mp(self, n: int) -> None:
        binds = list(self.esp_config.cpu_binds or default_cpu_binds(n))
        for i in range(n):
            self.instances.append(MPInstance(i, self._instance_config(i), binds[i]))

    def _start_ray(self, n: int) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from vllm.platforms import current_platform

        if not ray.is_initialized():
            ray.init(address=self.esp_config.ray_address, ignore_reinit_error=True)
        gpu = 0 if current_platform.is_cpu() else 1
        bundles = [{"CPU": 1, "GPU": gpu} if gpu else {"CPU": 1} for _ in range(n)]
        self._placement_group = placement_group(bundles, strategy="PACK")
        ray.get(self._placement_group.ready(), timeout=300)
        for i in range(n):
            self.instances.append(
                RayInstance(
                    i, self._instance_config(i), self._placement_group, num_cpus=1, num_gpus=gpu
                )
            )
        for method in ("init_device", "load_model"):
            self._all(method)

    def _init_group(self) -> None:
        n = len(self.instances)
        host, port = self.instances[0].call_sync("esp_group_address")
        pending = [
            inst.call("esp_init_group", inst.index, n, host, port) for inst in self.instances
        ]
        for p in pending:
            p.result()

    def _all(self, method: Any, *args: Any, **kwargs: Any) -> list[Any]:
        pending = [inst.call(method, *args, **kwargs) for inst in self.instances]
        return [p.result() for p in pending]

    # ------------------------------------------------------------------ vLLM API
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        # ``timeout`` is not enforced: instance RPCs wait like execute_model.
        results = self._all(method, *args, **(kwargs or {}))
        if non_block:
            future: Future = Future()
            future.set_result(results)
            return future
        return results

    def determine_available_memory(self) -> list[int]:
        # One worker to EngineCore, holding the N caches: their sum.
        per_instance = self._all("determine_available_memory")
        return [sum(per_instance)]

    def get_kv_cache_specs(self) -> list[dict[str, Any]]:
        return [self._all("get_kv_cache_spec")[0]]

    def initialize_from_config(self, kv_cache_configs: list[Any]) -> None:
        (config,) = kv_cache_configs
        n = len(self.instances)
        self.num_blocks_total = config.num_blocks
        nb = blocks_per_instance(config.num_blocks, n)
        self.blocks_per_instance = nb
        # vLLM's own planner, for one instance's share (strides depend on
        # the block count, so the tensors cannot simply be scaled).
        from vllm.v1.core.kv_cache_utils import (
            _pool_bytes_per_block,
            get_kv_cache_config_from_groups,
        )

        groups = config.kv_cache_groups
        local = get_kv_cache_config_from_groups(
            self.vllm_config, groups, nb * _pool_bytes_per_block(self.vllm_config, groups)
        )
        if local.num_blocks != nb:
            raise RuntimeError(f"per-instance KV plan has {local.num_blocks} blocks, expected {nb}")
        local.kv_cache_layout = config.kv_cache_layout
        logger.info("vllm-esp: %d global KV blocks = %d instances x %d", config.num_blocks, n, nb)
        self._all("initialize_from_config", [local])

    def execute_model(self, scheduler_output: Any, non_block: bool = False):
        output = self._execute(scheduler_output)
        if non_block:
            future: Future = Future()
            future.set_result(output)
            return future
        return output

    def _execute(self, scheduler_output: Any) -> ModelRunnerOutput:
        plan: ESPStepPlan | None = getattr(scheduler_output, "esp_plan", None)
        if plan is None:
            raise RuntimeError(
                "the ESP executor needs the ESP scheduler's plan "
                "(use --scheduler esp / scheduler_args('esp'))"
            )
        swap = scheduler_output.kv_connector_metadata
        has_copies = swap is not None and any(
            getattr(swap, k, ()) for k in ("swap_out", "swap_in", "prefetch")
        )
        if not plan.requests and not plan.moves and not has_copies:
            return EMPTY_MODEL_RUNNER_OUTPUT
        sampled: dict[str, int] = {}
        prefetched: set[str] = set()
        for part, loaded in self._all("esp_execute", plan, swap if has_copies else None):
            overlap = sampled.keys() & part.keys()
            if overlap:
                raise RuntimeError(f"requests sampled on two instances: {sorted(overlap)}")
            sampled.update(part)
            prefetched |= loaded
        req_ids = list(scheduler_output.num_scheduled_tokens)
        output = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[sampled[r]] if r in sampled else [] for r in req_ids],
        )
        if prefetched:
            from vllm.v1.outputs import KVConnectorOutput

            output.kv_connector_output = KVConnectorOutput(finished_recving=prefetched)
        return output

    def sample_tokens(self, grammar_output: Any, non_block: bool = False):
        raise RuntimeError("ESP samples inside execute_model")

    def take_draft_token_ids(self):
        return None

    def esp_counters(self) -> list[dict[str, int]]:
        return self._all("esp_counters")

    def check_health(self) -> None:
        for inst in self.instances:
            inst.check_health()

    def shutdown(self) -> None:
        # In parallel: each instance waits a few seconds for its process, and
        # EngineCore's own grace period is short.
        from concurrent.futures import ThreadPoolExecutor

        def stop(inst: Instance) -> None:
            try:
                inst.shutdown()
            except Exception:  # keep shutting the others down
                logger.exception("vllm-esp: shutting down instance %d failed", inst.index)

        instances, self.instances = list(getattr(self, "instances", [])), []
        if instances:
            with ThreadPoolExecutor(max_workers=len(instances)) as pool:
                list(pool.map(stop, instances))
        pg = getattr(self, "_placement_group", None)
        if pg is not None:
            import ray

            ray.util.remove_placement_group(pg)
            self._placement_group = None
