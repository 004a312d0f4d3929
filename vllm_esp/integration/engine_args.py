"""``--scheduler``, ``--mlfq-config``, ``--swap-config``, ``--esp-instances``
and ``--esp-config`` on vLLM's own argument parser.

vLLM calls the general plugins *before* it builds the engine flags
(``AsyncEngineArgs.add_cli_args``), so ``register()`` can wrap
``EngineArgs.add_cli_args`` and the flags appear in ``vllm serve``,
``vllm bench`` and every other parser vLLM builds. Without the wrapper,
argparse would read ``--scheduler`` as an ambiguous abbreviation of
``--scheduler-cls`` / ``--scheduler-reserve-full-isl``.

Values are validated while parsing (an invalid one is an argparse error
before anything is spawned) and merged into the real ``EngineArgs`` fields
(``scheduler_cls``, ``additional_config``, and for ``mlfq-swap``
``kv_transfer_config`` as a ``KVTransferConfig`` object, the type that
field has after vLLM's own parsing) in ``from_cli_args``, after
``--additional-config`` has been read, so the two compose.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vllm_esp.core.choices import (
    DEFAULT_SCHEDULER,
    ESP_EXECUTOR_CLS,
    MLFQ_SCHEDULER_CLS,
    SCHEDULER_CHOICES,
    SWAP_CONNECTOR,
    SWAP_CONNECTOR_MODULE,
    get_scheduler_choice,
)
from vllm_esp.core.esp.config import ESP_CONFIG_KEY, ESPConfig
from vllm_esp.core.mlfq.config import MLFQ_CONFIG_KEY, MLFQConfig
from vllm_esp.core.settings import Settings, SettingsError
from vllm_esp.core.swap.config import SWAP_CONFIG_KEY, SwapConfig


def swap_kv_transfer_config():
    """vLLM's ``KVTransferConfig`` selecting the host-swap connector.

    An object, not a dict: ``LLM(...)`` would convert a dict, but
    ``EngineArgs(...)`` and the CLI path (``EngineArgs.from_cli_args``)
    take the field as is.
    """
    from vllm.config.kv_transfer import KVTransferConfig

    return KVTransferConfig(
        kv_connector=SWAP_CONNECTOR,
        kv_connector_module_path=SWAP_CONNECTOR_MODULE,
        # Both directions (save on preemption, load on resume); the
        # connector overrides requires_kv_delivery, which kv_both implies.
        kv_role="kv_both",
    )


def scheduler_args(
    name: str | None = None,
    additional_config: dict[str, Any] | None = None,
    swap: dict[str, Any] | None = None,
    esp: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Engine keyword arguments that select scheduler ``name`` (default:
    ``DEFAULT_SCHEDULER`` of ``vllm_esp.core.choices``).

    >>> from vllm import LLM
    >>> llm = LLM(model=path, **scheduler_args("mlfq", base_quantum_ms=20))
    >>> llm = LLM(model=path, **scheduler_args("mlfq-swap", swap={"host_pool_gib": 8}))

    ``settings`` are :class:`~vllm_esp.core.mlfq.config.MLFQConfig` fields and
    ``swap`` holds :class:`~vllm_esp.core.swap.config.SwapConfig` fields (``mlfq-swap``
    only) and ``esp`` :class:`~vllm_esp.core.esp.config.ESPConfig` fields
    (``esp`` only, e.g. ``{"num_instances": 2}``); all are validated here, so
    a typo fails before the engine starts.

    >>> llm = LLM(model=path, enforce_eager=True,
    ...           **scheduler_args("esp", esp={"num_instances": 2}))
    """
    name = name or DEFAULT_SCHEDULER
    choice = get_scheduler_choice(name)
    merged = dict(additional_config or {})
    if swap is not None and not (choice.host_swap or choice.esp):
        raise SettingsError(f"scheduler {name!r} takes no swap settings (use 'mlfq-swap' or 'esp')")
    if esp is not None and not choice.esp:
        raise SettingsError(f"scheduler {name!r} takes no ESP settings (use 'esp')")
    if choice.scheduler_cls is None:
        if settings:
            raise SettingsError(
                f"scheduler {name!r} takes no MLFQ settings, got {sorted(settings)}"
            )
        return {"additional_config": merged} if merged else {}
    mlfq = dict(merged.get(MLFQ_CONFIG_KEY) or {})
    mlfq.update(settings)
    mlfq["policy"] = choice.policy
    MLFQConfig.from_dict(mlfq)  # validate now
    merged[MLFQ_CONFIG_KEY] = mlfq
    out: dict[str, Any] = {"scheduler_cls": choice.scheduler_cls, "additional_config": merged}
    if choice.host_swap or (choice.esp and swap is not None):
        swap_settings = dict(merged.get(SWAP_CONFIG_KEY) or {})
        swap_settings.update(swap or {})
        SwapConfig.from_dict(swap_settings)  # validate now
        merged[SWAP_CONFIG_KEY] = swap_settings
        out["kv_transfer_config"] = swap_kv_transfer_config()
    if choice.esp:
        esp_settings = dict(merged.get(ESP_CONFIG_KEY) or {})
        esp_settings.update(esp or {})
        esp_config = ESPConfig.from_dict(esp_settings)  # validate now
        merged[ESP_CONFIG_KEY] = esp_config.to_dict()
        if esp_config.num_instances == 1:
            # One instance is the stock engine: same executor, plain MLFQ.
            out["scheduler_cls"] = MLFQ_SCHEDULER_CLS
        else:
            out["distributed_executor_backend"] = ESP_EXECUTOR_CLS
            # Instances also need enforce_eager=True (the ESP step is not a
            # captured graph); the executor refuses to start without it.
    return out


_PATCHED = "_vllm_esp_patched"


class _SettingsAction(argparse.Action):
    """Stores a settings JSON after checking it alone is valid (an argparse
    error, before anything is spawned)."""

    settings_cls: type[Settings]

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            self.settings_cls.from_json(values)
        except SettingsError as e:
            parser.error(f"{option_string}: {e}")
        setattr(namespace, self.dest, values)


def _settings_action(cls: type[Settings]) -> type[argparse.Action]:
    return type(f"_{cls.__name__}Action", (_SettingsAction,), {"settings_cls": cls})


def _instances(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be in [1, 256], got {value}")
    return value


def add_esp_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("vllm-esp", "Scheduling by the vllm-esp plugin.")
    group.add_argument(
        "--scheduler",
        dest="esp_scheduler",
        choices=sorted(SCHEDULER_CHOICES),
        default=None,
        help="Request scheduler: "
        + "; ".join(f"'{s.name}': {s.description}" for s in SCHEDULER_CHOICES.values())
        + ". Default: vLLM's own.",
    )
    group.add_argument(
        "--mlfq-config",
        dest="esp_mlfq_config",
        action=_settings_action(MLFQConfig),
        default=None,
        help='MLFQ settings as JSON, e.g. \'{"num_levels": 6, "base_quantum_ms": 20}\' '
        "(fields of vllm_esp.core.mlfq.config.MLFQConfig).",
    )
    group.add_argument(
        "--swap-config",
        dest="esp_swap_config",
        action=_settings_action(SwapConfig),
        default=None,
        help="Host KV swap settings of --scheduler mlfq-swap as JSON, e.g. "
        '\'{"host_pool_gib": 8, "prefetch_depth": 2}\' '
        "(fields of vllm_esp.core.swap.config.SwapConfig).",
    )
    group.add_argument(
        "--esp-instances",
        dest="esp_instances",
        type=_instances,
        default=None,
        help="--scheduler esp: number of instances (model replicas, each with its own KV "
        "cache) behind this endpoint. 1 = the stock single-instance engine.",
    )
    group.add_argument(
        "--esp-config",
        dest="esp_esp_config",
        action=_settings_action(ESPConfig),
        default=None,
        help='ESP settings as JSON, e.g. \'{"backend": "ray", "prefill_target_ms": 200}\' '
        "(fields of vllm_esp.core.esp.config.ESPConfig).",
    )
    return parser


def apply_esp_arguments(engine_args: Any, args: argparse.Namespace) -> Any:
    """Fold the plugin's flags (``--scheduler``, ``--mlfq-config``,
    ``--swap-config``, ``--esp-*``) into real EngineArgs fields."""
    name = getattr(args, "esp_scheduler", None)
    settings_json = getattr(args, "esp_mlfq_config", None)
    swap_json = getattr(args, "esp_swap_config", None)
    instances = getattr(args, "esp_instances", None)
    esp_json = getattr(args, "esp_esp_config", None)
    if (
        name is None
        and settings_json is None
        and swap_json is None
        and instances is None
        and esp_json is None
    ):
        return engine_args
    if name is None:
        if instances is not None or esp_json is not None:
            name = "esp"
        else:
            name = "mlfq-swap" if swap_json is not None else "mlfq"
    esp = None
    if instances is not None or esp_json is not None:
        if name != "esp":
            raise SettingsError(f"--esp-instances/--esp-config need --scheduler esp, not {name}")
        esp = json.loads(esp_json) if esp_json else {}
        if instances is not None:
            esp["num_instances"] = instances
    # Only the settings given explicitly (the parse-time actions validated
    # the JSON; scheduler_args validates the merged result); the policy
    # comes from the scheduler name.
    settings = json.loads(settings_json) if settings_json else {}
    settings.pop("policy", None)
    swap = json.loads(swap_json) if swap_json else None
    extra = scheduler_args(
        name, additional_config=engine_args.additional_config, swap=swap, esp=esp, **settings
    )
    if "scheduler_cls" in extra:
        if engine_args.scheduler_cls not in (None, extra["scheduler_cls"]):
            raise SettingsError(
                f"--scheduler {name} conflicts with --scheduler-cls "
                f"{engine_args.scheduler_cls}; give one of them"
            )
        engine_args.scheduler_cls = extra["scheduler_cls"]
    if "additional_config" in extra:
        engine_args.additional_config = extra["additional_config"]
    if "distributed_executor_backend" in extra:
        given_backend = engine_args.distributed_executor_backend
        if given_backend not in (None, extra["distributed_executor_backend"]):
            raise SettingsError(
                f"--scheduler esp with several instances runs its own executor; "
                f"--distributed-executor-backend {given_backend} conflicts with it"
            )
        engine_args.distributed_executor_backend = extra["distributed_executor_backend"]
        engine_args.enforce_eager = True  # the ESP step runs the model eagerly
    if "kv_transfer_config" in extra:
        ours = extra["kv_transfer_config"]
        given = engine_args.kv_transfer_config
        if given is not None and given.kv_connector != ours.kv_connector:
            raise SettingsError(
                f"--scheduler {name} needs the {ours.kv_connector} KV connector; "
                f"--kv-transfer-config selects {given.kv_connector}; give one of them"
            )
        engine_args.kv_transfer_config = ours
    return engine_args


def patch_engine_args() -> None:
    """Wrap ``EngineArgs.add_cli_args`` / ``from_cli_args`` once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, _PATCHED, False):
        return
    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser):
        parser = orig_add(parser)
        return add_esp_arguments(parser)

    def from_cli_args(cls, args):
        return apply_esp_arguments(orig_from(cls, args), args)

    setattr(add_cli_args, _PATCHED, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
