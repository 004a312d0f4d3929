"""The one settings base of vllm-esp: frozen dataclasses loaded from dicts or JSON.

Each capability has one settings class (``MLFQConfig``, ``SwapConfig``,
``ESPConfig``, one module each under ``vllm_esp.core``), all subclasses of
:class:`Settings`. They reach the EngineCore process through vLLM's own
``VllmConfig.additional_config`` dict (``--additional-config`` on the CLI,
``additional_config=`` in ``LLM(...)``), each under its own ``key``; that
dict is part of vLLM's config hash, so two engines with different settings
never share a compilation cache entry by mistake.

Everything is validated twice: in the front-end process when the flag is
parsed (so ``vllm serve`` fails before spawning anything) and again where
the setting is used in EngineCore (so ``LLM(...)`` users get the same
message).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

_S = TypeVar("_S", bound="Settings")


class SettingsError(ValueError):
    """An invalid vllm-esp setting. The message names the setting."""


class Settings:
    """Dict/JSON loading shared by the frozen settings dataclasses: unknown
    keys and malformed JSON are refused with the section's name."""

    #: Human name of the section in error messages, e.g. "MLFQ".
    label: ClassVar[str] = ""
    #: Key of the section in ``VllmConfig.additional_config``.
    key: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[_S], data: Mapping[str, Any] | None) -> _S:
        """Build from a plain dict, rejecting unknown keys by name."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(
                f"unknown {cls.label} setting(s) {unknown}; valid settings: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls: type[_S], text: str) -> _S:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{cls.label} settings are not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise SettingsError(f"{cls.label} settings must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_additional_config(cls: type[_S], additional_config: Mapping[str, Any] | None) -> _S:
        return cls.from_dict((additional_config or {}).get(cls.key))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def invalid(self, name: str, why: str) -> SettingsError:
        """The error for setting ``name`` (its current value is quoted)."""
        return SettingsError(f"invalid {self.label} setting {name}={getattr(self, name)!r}: {why}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
