"""Front-end stat logger: vllm-esp queue state on vLLM's ``/metrics``.

The scheduler lives in the EngineCore process; ``/metrics`` is served by
the API server. vLLM already ships ``SchedulerStats`` from one to the
other every step, so the scheduler adds its numbers to the one open
``str -> int`` map of that message (``num_kv_fetch_reqs_by_stage``, under
keys prefixed ``vllm_esp:``; vLLM's loggers read only their own stage
names from it) and this logger, loaded through the
``vllm.stat_logger_plugins`` entry point, turns them into series:

    vllm_esp:mlfq_queue_length{level="k"}        gauge, requests per level
    vllm_esp:mlfq_paused_requests                 gauge, residents paused
    vllm_esp:mlfq_demotions_total                 counter
    vllm_esp:mlfq_promotions_total                counter
    vllm_esp:mlfq_rank_preemptions_total          counter (KV freed by rank)
    vllm_esp:recomputed_tokens_total              counter, tokens computed again
                                                  after their KV was lost

and, with host KV swap (``mlfq-swap``, ``vllm_esp/integration/swap/``):

    vllm_esp:swap_{out,in}_blocks_total           counter, KV blocks moved
    vllm_esp:swap_{out,in}_bytes_total            counter, bytes moved
    vllm_esp:swap_{out,in}_requests_total         counter, requests moved
    vllm_esp:swap_{out,in}_seconds_total          counter, worker copy time
    vllm_esp:swap_recompute_fallbacks_total       counter, host pool full
    vllm_esp:swap_proactive_offloads_total        counter, reserve refills
    vllm_esp:swap_prefetches_total                counter, loads ahead of time
    vllm_esp:swap_unprefetches_total              counter, prefetches given back
    vllm_esp:swap_dropped_total                   counter, host copies unused
    vllm_esp:swap_host_blocks_used                gauge, host pool slots in use
    vllm_esp:swap_host_pool_blocks                gauge, host pool size
    vllm_esp:swap_swapped_requests                gauge, requests with a copy

and, with elastic sequence parallelism (``--scheduler esp``, ``vllm_esp/integration/esp/``):

    vllm_esp:esp_instance_free_blocks{instance="i"}  gauge, free KV blocks per instance
    vllm_esp:esp_scale_ups_total                  counter, decode groups grown
                                                  onto another instance (no KV moved)
    vllm_esp:esp_multi_instance_prefills_total    counter, prefill chunks on > 1 instance
    vllm_esp:esp_migrated_{blocks,bytes}_total    counter, KV moved to consolidate
    vllm_esp:esp_request_{instances,steps}_total  counters; their rate ratio is the
                                                  mean instances per request-step

Swap numbers take the same side channel rather than vLLM's KV-connector
stats path: the scheduler already holds the cumulative counts (blocks,
fallbacks, offloads are scheduler decisions; copy times arrive as worker
metadata), the side channel carries totals (robust to a missed step), and
it needs no second exporter or metric naming scheme.

vLLM's own ``vllm:num_preemptions_total`` keeps counting every preemption.
Engines that run another scheduler send no such keys and this logger
registers nothing.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

STATS_PREFIX = "vllm_esp:"
_INSTANCE_FREE = "esp_instance_free_blocks_"
_COUNTERS = ("demotions_total", "promotions_total", "rank_preemptions_total")
#: stats key -> (series name without "_total", help, scale to the unit).
_PLAIN_COUNTERS: dict[str, tuple[str, str, float]] = {
    "recomputed_tokens_total": (
        "recomputed_tokens",
        "Tokens computed again after their KV was freed.",
        1.0,
    ),
    **{
        f"swap_{d}_{what}_total": (
            f"swap_{d}_{what}",
            f"KV {what} swapped {d} ({'device to host' if d == 'out' else 'host to device'}).",
            1.0,
        )
        for d in ("out", "in")
        for what in ("blocks", "bytes", "requests")
    },
    "swap_out_time_us_total": ("swap_out_seconds", "Worker time copying KV to host.", 1e-6),
    "swap_in_time_us_total": (
        "swap_in_seconds",
        "Worker time copying KV back to the device.",
        1e-6,
    ),
    "swap_recompute_fallbacks_total": (
        "swap_recompute_fallbacks",
        "Preemptions recomputed: host pool full.",
        1.0,
    ),
    "swap_proactive_offloads_total": (
        "swap_proactive_offloads",
        "Paused requests offloaded to keep free blocks.",
        1.0,
    ),
    "swap_prefetches_total": (
        "swap_prefetches",
        "Swapped requests loaded back ahead of their turn.",
        1.0,
    ),
    "swap_unprefetches_total": (
        "swap_unprefetches",
        "Prefetched requests whose device blocks were given back.",
        1.0,
    ),
    "swap_dropped_total": ("swap_dropped", "Host KV copies released unused.", 1.0),
    "esp_scale_ups_total": ("esp_scale_ups", "Decode groups grown onto another instance.", 1.0),
    "esp_multi_instance_prefills_total": (
        "esp_multi_instance_prefills",
        "Prefill chunks computed on several instances.",
        1.0,
    ),
    "esp_migrated_blocks_total": (
        "esp_migrated_blocks",
        "KV blocks migrated between instances.",
        1.0,
    ),
    "esp_migrated_bytes_total": ("esp_migrated_bytes", "KV bytes migrated between instances.", 1.0),
    "esp_request_instances_total": (
        "esp_request_instances",
        "Sum over steps and scheduled requests of the request's instance count.",
        1.0,
    ),
    "esp_request_steps_total": ("esp_request_steps", "Scheduled request-steps under ESP.", 1.0),
}
_PLAIN_GAUGES: dict[str, tuple[str, str]] = {
    "swap_host_blocks_used": ("swap_host_blocks_used", "Host KV pool blocks holding a copy."),
    "swap_host_pool_blocks": ("swap_host_pool_blocks", "Host KV pool size in blocks."),
    "swap_swapped_requests": ("swap_swapped_requests", "Requests with a host KV copy."),
}


class ESPPrometheusStatLogger(StatLoggerBase):
    """Exports the ``vllm_esp:`` entries of ``SchedulerStats``."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        self._gauges: dict[str, Any] = {}
        self._counters: dict[str, Any] = {}
        self._last_totals: dict[tuple[str, int], int] = {}
        self._queue_gauge = None
        self._model_name = (
            getattr(getattr(vllm_config, "model_config", None), "served_model_name", None)
            or "model"
        )
        if isinstance(self._model_name, (list, tuple)):
            self._model_name = self._model_name[0]

    def _metrics(self):
        import prometheus_client as prom

        if self._queue_gauge is None:
            labels = ["model_name", "engine"]
            self._queue_gauge = _get_or_create(
                prom.Gauge,
                "vllm_esp:mlfq_queue_length",
                "Requests per MLFQ level.",
                [*labels, "level"],
            )
            self._gauges["paused_reqs"] = _get_or_create(
                prom.Gauge,
                "vllm_esp:mlfq_paused_requests",
                "Resident requests paused by rank this step.",
                labels,
            )
            for name in _COUNTERS:
                self._counters[name] = _get_or_create(
                    prom.Counter,
                    f"vllm_esp:mlfq_{name.removesuffix('_total')}",
                    f"MLFQ {name.removesuffix('_total').replace('_', ' ')}.",
                    labels,
                )
            for key, (name, doc, _) in _PLAIN_COUNTERS.items():
                self._counters[key] = _get_or_create(prom.Counter, f"vllm_esp:{name}", doc, labels)
            for key, (name, doc) in _PLAIN_GAUGES.items():
                self._gauges[key] = _get_or_create(prom.Gauge, f"vllm_esp:{name}", doc, labels)
            self._instance_gauge = _get_or_create(
                prom.Gauge,
                "vllm_esp:esp_instance_free_blocks",
                "Free KV blocks per ESP instance.",
                [*labels, "instance"],
            )
        return self._queue_gauge

    def record(
        self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is None:
            return
        entries = {
            k.removeprefix(STATS_PREFIX): v
            for k, v in scheduler_stats.num_kv_fetch_reqs_by_stage.items()
            if k.startswith(STATS_PREFIX)
        }
        if not entries:
            return
        queue_gauge = self._metrics()
        labels = (self._model_name, str(engine_idx))
        for key, value in entries.items():
            if key.startswith("queue_level_"):
                queue_gauge.labels(*labels, key.removeprefix("queue_level_")).set(value)
            elif key.startswith(_INSTANCE_FREE):
                self._instance_gauge.labels(*labels, key.removeprefix(_INSTANCE_FREE)).set(value)
            elif key in self._gauges:
                self._gauges[key].labels(*labels).set(value)
            elif key in self._counters:
                child = self._counters[key].labels(*labels)  # exported from 0 on
                last = self._last_totals.get((key, engine_idx), 0)
                if value > last:
                    scale = _PLAIN_COUNTERS[key][2] if key in _PLAIN_COUNTERS else 1.0
                    child.inc((value - last) * scale)
                self._last_totals[(key, engine_idx)] = value

    def log_engine_initialized(self) -> None:
        return None


def _get_or_create(cls, name: str, doc: str, labels: list[str]):
    """prometheus_client refuses duplicate names; reuse on re-creation
    (several engines or a restarted engine in one process)."""
    import prometheus_client as prom

    existing = prom.REGISTRY._names_to_collectors.get(
        name
    ) or prom.REGISTRY._names_to_collectors.get(name + "_total")
    if existing is not None:
        return existing
    return cls(name, doc, labels)
