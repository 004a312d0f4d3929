"""vllm-esp: preemptive MLFQ scheduling and elastic sequence parallelism
for stock vLLM, as a plugin.

vLLM calls :func:`register` in every process it starts (front end,
EngineCore, workers) through the ``vllm.general_plugins`` entry point.
It must stay cheap and idempotent: it installs the CLI flags and the
runtime patches of ``vllm_esp.integration.patches`` (see ``patches/README.md``).
Scheduler classes are named by qualname in the engine config, so
EngineCore imports them itself.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: The vLLM release whose internals this plugin is written against
#: (checked by tests/integration/test_vllm_internals.py).
VLLM_VERSION = "0.32.0"

_registered = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    global _registered
    if _registered:
        return
    from vllm_esp.integration.engine_args import patch_engine_args
    from vllm_esp.integration.patches import cpu_cores

    patch_engine_args()
    # Before EngineCore builds its executor (vLLM loads plugins first).
    cpu_cores.install()
    _registered = True


def scheduler_args(name: str | None = None, **settings):
    """Engine kwargs selecting a vllm-esp scheduler; see
    :func:`vllm_esp.integration.engine_args.scheduler_args`."""
    from vllm_esp.integration.engine_args import scheduler_args as _scheduler_args

    return _scheduler_args(name, **settings)


__all__ = ["VLLM_VERSION", "__version__", "register", "scheduler_args"]
