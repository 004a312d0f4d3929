"""``MLFQConfig``: settings of the MLFQ schedulers (``additional_config["mlfq"]``)."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_esp.core.mlfq import POLICIES
from vllm_esp.core.settings import Settings, is_int, is_number

MLFQ_CONFIG_KEY = "mlfq"


@dataclass(frozen=True)
class MLFQConfig(Settings):
    """Skip-join MLFQ settings (see ``vllm_esp/core/mlfq/skip_join.py``).

    Service is charged in *standalone seconds* from the calibrated cost
    model (``vllm_esp/core/costmodel.py`` says why), so quanta are seconds.
    """

    label = "MLFQ"
    key = MLFQ_CONFIG_KEY

    #: Number of priority levels K. Level 0 is the highest. The default of
    #: 3, with ``demote_by_value``, was within 1% of FCFS's mean JCT or
    #: below it on every trace family of the workload suite at two loads
    #: near saturation, under two cost models (SIMULATED,
    #: ``benchmarks/sim_jct.py``, README "Results"). With 2 levels ("first
    #: quantum, then FCFS") a short request whose prefill spent most of its
    #: quantum waits behind the long ones and every newer arrival's prefill
    #: (1.12-1.38x FCFS on short/long traffic); with 4 or more, requests in
    #: the tail of ShareGPT's replies sink below newcomers (up to 1.14x).
    num_levels: int = 3
    #: Quantum of level 0 in milliseconds; ``None`` = auto: the standalone
    #: time of ``auto_quantum_decode_steps`` decode steps at 512 tokens of
    #: context on this machine (from the cost model).
    base_quantum_ms: float | None = None
    #: Level k's quantum is ``base * quantum_ratio ** k``.
    quantum_ratio: float = 2.0
    #: Used only when ``base_quantum_ms`` is None.
    auto_quantum_decode_steps: int = 8
    #: Join the highest level whose quantum covers the estimated prefill
    #: time (FastServe's skip-join). False = every request joins level 0.
    skip_join: bool = True
    #: A request not served for this long (since its last step, or since
    #: arrival if it never ran) is promoted to level 0, in its arrival
    #: place, until it finishes (never demoted again). ``0`` disables.
    starvation_threshold_s: float = 10.0
    #: Path of a calibration file from ``python -m vllm_esp.calibrate``;
    #: ``None`` = the default path for the model, else the analytic fallback.
    calibration_file: str | None = None
    #: Name of the ranking policy (``mlfq``; ``srpt`` and ``fcfs`` exist for
    #: benchmarks and tests, see ``vllm_esp.core.mlfq.POLICIES``).
    policy: str = "mlfq"
    #: Demote a request only once its Gittins index, from the output
    #: lengths of finished requests, is clearly below a fresh request's
    #: (``MLFQPolicy.worth_demoting``; nothing is demoted under the
    #: memoryless prior, before 32 requests have finished). On increasing-hazard
    #: lengths (ShareGPT's replies) a request that has run is the better bet
    #: and keeps its level, as under FCFS; past the short mode of short/long
    #: traffic it goes down as MLFQ intends. Skip-join then places only the
    #: prefill: once prefilled, a request rejoins level 0 in its arrival
    #: place. ``False`` is FastServe's rule (demote on every spent quantum,
    #: no rejoin).
    demote_by_value: bool = True
    #: Output-length predictor the ``gittins`` policy conditions its learned
    #: distributions on (``vllm_esp.integration.predictor``): ``""`` off,
    #: ``"default"`` the one trained for the served model's tokenizer
    #: (``python -m vllm_esp.models.predictor train``), else a file path.
    output_predictor: str = ""
    #: KV blocks kept free when planning admissions (absorbs lookahead
    #: slots and rounding, so vLLM's own memory preemption stays rare).
    num_reserved_blocks: int = 0
    #: Preempt a resident for a newcomer only when that lowers their total
    #: response time: the victim's expected remaining service exceeds the
    #: newcomer's by more than what preemption costs the victim (recompute,
    #: or the host round trip), all from the cost model and the output
    #: lengths of finished requests (``vllm_esp/core/mlfq/value.py``).
    #: Off by default (by rank, FastServe's rule) until it is shown to pay
    #: over HTTP: two demo runs minutes apart gave mlfq 3.38x fcfs's mean
    #: E2E with it and 1.25x without, but at different machine speeds, and
    #: the code without the rule measured 2.56x the same day. On a tiny
    #: cache with fast promotion and FastServe's demotion it recomputes 208
    #: tokens where rank alone recomputes 1,663
    #: (``test_tiny_kv_with_fast_promotion_does_not_thrash_on_recompute``).
    preempt_by_value: bool = False
    #: Most requests that hold KV without running (paused residents);
    #: ``None`` = no bound but memory: paused residents are the first
    #: victims when a request worth it needs their blocks. With a bound, a
    #: newcomer beyond it preempts a resident if that is worth it, else
    #: waits holding nothing. Off by default: with memory to spare a bound
    #: only turns free pauses into recomputes (SIMULATED on mixed traffic,
    #: ``benchmarks.sim_jct``: K=8 from 0.42x to 0.79x fcfs's mean JCT at a
    #: bound of ``max_num_seqs``, K=2 from 1.21x to 1.10x but p99 1.9x);
    #: set it to cap the scheduler's per-step work with thousands of
    #: requests in the system.
    max_paused_requests: int | None = None

    def __post_init__(self) -> None:
        bad = self.invalid
        if not (is_int(self.num_levels) and 1 <= self.num_levels <= 64):
            raise bad("num_levels", "must be an integer in [1, 64]")
        if self.base_quantum_ms is not None and not (
            is_number(self.base_quantum_ms) and self.base_quantum_ms > 0
        ):
            raise bad("base_quantum_ms", "must be a positive number of milliseconds or null (auto)")
        if not (is_number(self.quantum_ratio) and self.quantum_ratio > 1.0):
            raise bad("quantum_ratio", "must be a number > 1")
        if not (is_int(self.auto_quantum_decode_steps) and self.auto_quantum_decode_steps >= 1):
            raise bad("auto_quantum_decode_steps", "must be an integer >= 1")
        if not isinstance(self.demote_by_value, bool):
            raise bad("demote_by_value", "must be true or false")
        if not isinstance(self.skip_join, bool):
            raise bad("skip_join", "must be true or false")
        if not (is_number(self.starvation_threshold_s) and self.starvation_threshold_s >= 0):
            raise bad(
                "starvation_threshold_s", "must be a number of seconds >= 0 (0 disables promotion)"
            )
        if self.policy not in POLICIES:
            raise bad("policy", f"unknown policy; choose from {sorted(POLICIES)}")
        if not isinstance(self.output_predictor, str):
            raise bad("output_predictor", 'must be a string: "" (off), "default" or a path')
        if self.output_predictor and self.policy != "gittins":
            raise bad("output_predictor", "only the gittins policy uses a predictor")
        if not (is_int(self.num_reserved_blocks) and self.num_reserved_blocks >= 0):
            raise bad("num_reserved_blocks", "must be an integer >= 0")
        if not isinstance(self.preempt_by_value, bool):
            raise bad("preempt_by_value", "must be true or false")
        if self.max_paused_requests is not None and not (
            is_int(self.max_paused_requests) and self.max_paused_requests >= 0
        ):
            raise bad("max_paused_requests", "must be an integer >= 0 or null (no bound)")
