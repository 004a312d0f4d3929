"""Command line: ``python -m vllm_esp.models build [--preset NAME] [--cache-dir DIR]``.

Prints the model folder on stdout (and only that), so scripts can do
``MODEL=$(python -m vllm_esp.models build)``.
"""

from __future__ import annotations

import argparse
import sys
import time

from vllm_esp.models.presets import PRESETS
from vllm_esp.models.tiny import build_model, is_built, model_path


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m vllm_esp.models")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a random-weight Llama model (idempotent)")
    b.add_argument("--preset", default="default", choices=sorted(PRESETS))
    b.add_argument(
        "--cache-dir",
        default=None,
        help="parent folder (default $VLLM_ESP_CACHE/models or ~/.cache/vllm-esp/models)",
    )
    b.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    sub.add_parser("list", help="list presets")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name, p in PRESETS.items():
            print(
                f"{name:8s} layers={p.num_layers} hidden={p.hidden_size} heads={p.num_heads}/"
                f"{p.num_kv_heads} head_dim={p.head_dim} ffn={p.intermediate_size} "
                f"vocab={p.vocab_size} max_pos={p.max_position_embeddings} dtype={p.dtype}"
            )
        return 0

    preset = PRESETS[args.preset]
    target = model_path(preset, args.cache_dir)
    if not args.force and is_built(target, preset):
        print(f"already built ({preset.digest()})", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        target = build_model(preset, args.cache_dir, force=args.force)
        print(
            f"built {preset.name} ({preset.digest()}) in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
