"""Cost-model profiles that ship with the package, and the code that builds them.

A *derived* profile comes from a roofline over published hardware figures
and a few stated assumptions (MFU, host overhead, link latencies), not from
a measurement; its ``meta`` names every input and the cross-checks against
what LoongServe reports. The committed JSON is what :func:`derived_a800_profile`
builds (a test asserts it), so it is regenerated, never edited::

    python -m vllm_esp.core.esp.profiles        # rewrites profiles/*.json

Measured profiles come from ``python -m vllm_esp.calibrate --esp OUT.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vllm_esp.core.esp.cost_model import (
    DecodeCoeffs,
    ESPCostModel,
    MigrationCoeffs,
    PrefillCoeffs,
)

__all__ = [
    "DERIVED_PROFILES",
    "PROFILE_DIR",
    "Roofline",
    "derived_a800_profile",
    "load_profile",
    "profile_path",
    "write_derived_profiles",
]

PROFILE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Roofline:
    """Inputs of a derived profile: model shape, hardware figures, assumptions."""

    # -- model: LWM-Text-1M, the Llama-2-7B architecture (LoongServe's only model)
    num_layers: int = 32
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_heads: int = 32
    num_kv_heads: int = 32
    vocab_size: int = 32000
    bytes_per_value: int = 2  # fp16 weights and KV
    # -- hardware: A800-80GB SXM (datasheet), LoongServe's nodes (paper section 7)
    tensor_parallel: int = 2  # GPUs per instance
    gpus_per_node: int = 8
    peak_flops_per_gpu: float = 312e12  # dense fp16 tensor core
    hbm_bytes_per_s_per_gpu: float = 2.0e12
    #: NVLink per GPU; LoongServe's migration model divides by 400 GB/s * TP.
    nvlink_bytes_per_s_per_gpu: float = 400e9
    #: One 200 Gbps HCA per two GPUs (4 per node), i.e. per TP=2 instance.
    ib_bytes_per_s_per_instance: float = 25e9
    # -- assumptions (not datasheet figures)
    gemm_mfu: float = 0.5  # dense GEMMs at prefill batch sizes
    attention_mfu: float = 0.4  # flash attention, causal prefill
    hbm_efficiency: float = 0.8  # achieved / peak bandwidth, streaming reads
    #: Prefill: host time per layer, not hidden (each layer ends in a sync).
    prefill_host_per_layer_s: float = 4.0e-4
    #: Decode: host time per layer left exposed (kernels are enqueued async).
    decode_host_per_layer_s: float = 1.5e-4
    nvlink_p2p_latency_s: float = 10e-6  # NCCL small-message send/recv
    ib_p2p_latency_s: float = 20e-6
    migration_latency_s: float = 1e-3  # one RPC and the gather kernel's launch
    tp_efficiency: float = 0.9  # TP across instances (a baseline): cost-model default
    capacity_tokens: int = 210_000  # LoongServe's max_total_token_num at TP=2

    # ------------------------------------------------------------ model sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies by (all layers, no embedding/LM head)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * self.intermediate_size
        return self.num_layers * per_layer

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def weight_bytes_per_forward(self) -> int:
        """Weights read by one forward (the embedding is gathered, not streamed)."""
        return (self.matmul_params + self.lm_head_params) * self.bytes_per_value

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all layers, both TP shards."""
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.num_layers * kv * self.bytes_per_value

    @property
    def tp_allreduce_bytes_per_token(self) -> int:
        """Bytes one GPU sends per token in TP's two all-reduces per layer."""
        tp = self.tensor_parallel
        per_allreduce = 2 * (tp - 1) / tp * self.hidden_size * self.bytes_per_value
        return int(2 * self.num_layers * per_allreduce)

    @property
    def exchange_bytes_per_request(self) -> int:
        """Decode query exchange, one (request, peer), all layers: the fp16 query
        out, the fp32 partial output and LSE back."""
        q = self.num_heads * self.head_dim * self.bytes_per_value
        partial = self.num_heads * self.head_dim * 4 + self.num_heads * 4
        return self.num_layers * (q + partial)

    # ------------------------------------------------------------ per instance
    @property
    def instance_flops(self) -> float:
        return self.tensor_parallel * self.peak_flops_per_gpu

    @property
    def instance_hbm(self) -> float:
        return self.tensor_parallel * self.hbm_bytes_per_s_per_gpu * self.hbm_efficiency

    @property
    def instance_nvlink(self) -> float:
        return self.tensor_parallel * self.nvlink_bytes_per_s_per_gpu

    def crosses_nodes(self, dop: int) -> bool:
        return dop * self.tensor_parallel > self.gpus_per_node


def _prefill_row(r: Roofline, dop: int, base: PrefillCoeffs) -> PrefillCoeffs:
    """DoP ``dop``: tokens and pairs split evenly, plus the ring's ``dop - 1``
    hops per layer, not overlapped with attention (LoongServe's evaluated mode)."""
    if dop == 1:
        return base
    ib = r.crosses_nodes(dop)
    hop_latency = r.ib_p2p_latency_s if ib else r.nvlink_p2p_latency_s
    link = r.ib_bytes_per_s_per_instance if ib else r.instance_nvlink
    ring_bytes_per_token = (dop - 1) / dop * r.kv_bytes_per_token  # each local block, each hop
    return PrefillCoeffs(
        A_s=base.A_s + (dop - 1) * r.num_layers * hop_latency,
        B_s=base.B_s / dop + ring_bytes_per_token / link,
        C_s=base.C_s / dop,
    )


def derived_a800_profile(r: Roofline | None = None) -> ESPCostModel:
    """LWM-Text-1M on TP=2 A800-80GB instances (LoongServe's setup), by roofline."""
    r = r or Roofline()
    weights_s = r.weight_bytes_per_forward / r.instance_hbm
    allreduce_s = r.tp_allreduce_bytes_per_token / r.nvlink_bytes_per_s_per_gpu
    # A (query, key) pair costs 2 * 2 * hidden FLOPs per layer (QK^T, PV);
    # sum_l2 counts l^2 = twice the causal pairs.
    pair_flops = 4.0 * r.hidden_size * r.num_layers
    base = PrefillCoeffs(
        A_s=weights_s + r.num_layers * r.prefill_host_per_layer_s,
        B_s=2.0 * r.matmul_params / (r.instance_flops * r.gemm_mfu) + allreduce_s,
        C_s=pair_flops / 2.0 / (r.instance_flops * r.attention_mfu),
    )
    prefill = {d: _prefill_row(r, d, base) for d in (1, 2, 4, 8)}
    decode = DecodeCoeffs(
        a_s=weights_s + r.num_layers * r.decode_host_per_layer_s,
        b_s=2.0 * (r.matmul_params + r.lm_head_params) / (r.instance_flops * r.gemm_mfu)
        + allreduce_s,
        c_s=r.kv_bytes_per_token / r.instance_hbm,
        e_s=r.exchange_bytes_per_request / r.instance_nvlink,
    )
    migration = MigrationCoeffs(
        latency_s=r.migration_latency_s,
        bytes_per_token=float(r.kv_bytes_per_token),
        bandwidth_bytes_per_s=r.instance_nvlink,
    )
    ring_hop_s = r.num_layers * r.nvlink_p2p_latency_s
    model = ESPCostModel(
        prefill=prefill,
        decode=decode,
        migration=migration,
        ring_hop_s=ring_hop_s,
        tp_efficiency=r.tp_efficiency,
        source="derived",
    )
    return replace(model, meta=_meta(r, model, weights_s))


def _meta(r: Roofline, m: ESPCostModel, weights_s: float) -> dict[str, object]:
    """Provenance: inputs, what each coefficient is, and the cross-checks."""
    p1, d = m.prefill[1], m.decode
    ref_batch = 32
    kv_at_22ms = (22e-3 - d.a_s - ref_batch * d.b_s) / d.c_s
    return {
        "name": "a800_lwm7b_tp2",
        "capacity_tokens": r.capacity_tokens,
        "instance": f"TP={r.tensor_parallel} A800-80GB SXM, {r.gpus_per_node} GPUs per node",
        "model": "LWM-Text-1M (Llama-2-7B architecture), fp16",
        "inputs": asdict(r),
        "sizes": {
            "matmul_params": r.matmul_params,
            "weight_bytes_per_forward": r.weight_bytes_per_forward,
            "kv_bytes_per_token": r.kv_bytes_per_token,
            "tp_allreduce_bytes_per_token_per_gpu": r.tp_allreduce_bytes_per_token,
            "exchange_bytes_per_remote_request": r.exchange_bytes_per_request,
        },
        "derivation": {
            "prefill.1.A_s": "weights read once (weight_bytes / (TP * HBM * hbm_efficiency)) "
            "+ num_layers * prefill_host_per_layer_s",
            "prefill.1.B_s": "2 * matmul_params FLOPs / (TP * peak * gemm_mfu) "
            "+ TP all-reduce bytes per token / NVLink per GPU",
            "prefill.1.C_s": "4 * hidden * num_layers FLOPs per (query, key) pair / 2 "
            "(sum_l2 counts l^2 = 2 * causal pairs) / (TP * peak * attention_mfu)",
            "prefill.d": "B_1 and C_1 divide by d (striped SP splits tokens and pairs); "
            "+ (d-1)/d * kv_bytes_per_token / link in B (each local KV block travels d-1 "
            "hops, not overlapped); + (d-1) * num_layers * p2p latency in A; link and "
            "latency are IB's when d * TP exceeds a node (d = 8: 16 GPUs, 2 nodes)",
            "ring_hop_s": "num_layers * nvlink_p2p_latency_s (DoPs without a row)",
            "decode.a_s": "weights read once + num_layers * decode_host_per_layer_s",
            "decode.b_s": "2 * (matmul + LM head) FLOPs per request / (TP * peak * gemm_mfu) "
            "+ TP all-reduce bytes / NVLink; the additive roofline overstates a step "
            "near the ridge point by up to 2x",
            "decode.c_s": "kv_bytes_per_token / (TP * HBM * hbm_efficiency)",
            "decode.e_s": "exchange bytes per remote request / (TP * NVLink); NCCL's per-step "
            "message latency (num_layers * p2p latency) is per step, not per request, and "
            "is left in a_s's host overhead",
            "migration": "kv_bytes_per_token / (TP * 400 GB/s) as LoongServe's "
            "_get_migration_time, plus migration_latency_s (LoongServe has no fixed term)",
        },
        "cross_check": {
            "prefill_A_ms_vs_third_party_17_44": p1.A_s * 1e3,
            "prefill_B_ms_per_token_vs_third_party_0.03_0.14": p1.B_s * 1e3,
            "prefill_C_ms_per_token2_vs_third_party_3.5e-7_5e-6": p1.C_s * 1e3,
            "decode_ridge_batch_vs_min_comp_bound_100_128": weights_s / d.b_s,
            "decode_kv_tokens_per_instance_for_22ms_at_32_requests": kv_at_22ms,
            "migration_bytes_per_token_vs_512KiB": r.kv_bytes_per_token / 2**10,
            "kv_GB_at_capacity_vs_110": r.capacity_tokens * r.kv_bytes_per_token / 1e9,
            "prefill_100k_dop1_s": m.prefill_time(1, 1e5, 1e10),
        },
    }


#: Derived profiles by name (the JSON file is ``profiles/<name>.json``).
DERIVED_PROFILES: dict[str, Callable[[], ESPCostModel]] = {
    "a800_lwm7b_tp2": derived_a800_profile,
}


def profile_path(name: str) -> Path:
    return PROFILE_DIR / f"{name}.json"


def load_profile(name: str) -> ESPCostModel:
    """A shipped profile by name, or any cost-model file by path."""
    path = profile_path(name)
    if not path.exists():
        candidate = Path(name)
        if candidate.suffix == ".json" and candidate.exists():
            path = candidate
        else:
            shipped = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
            raise ValueError(f"no ESP cost profile {name!r} (shipped: {shipped})")
    return ESPCostModel.load(path)


def write_derived_profiles(directory: Path = PROFILE_DIR) -> list[Path]:
    """(Re)write every derived profile's JSON into ``directory``."""
    paths = []
    for name, build in DERIVED_PROFILES.items():
        path = directory / f"{name}.json"
        build().save(path)
        paths.append(path)
    return paths
