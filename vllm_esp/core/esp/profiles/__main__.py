"""Rewrite the derived profiles' JSON: ``python -m vllm_esp.core.esp.profiles``."""

from __future__ import annotations

from vllm_esp.core.esp.profiles import write_derived_profiles

if __name__ == "__main__":
    for path in write_derived_profiles():
        print(f"wrote {path}")
