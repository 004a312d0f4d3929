"""Worker-side decode-phase KV migration.

Executes a ``MigrationPlan`` (see ``vllm_esp/core/esp/migration_plan.py``): for each chunk the
source gathers the chunk's slots from every layer into one buffer
``[num_layers, 2, n, Hkv, D]`` plus their positions and sends it in one
message; the destination writes the tokens into its own slots, per layer,
in its own cache layout (token-level copies, so source and destination
may store different layouts or CPU ISAs).

Chunks run strictly in plan order, each completing before the next starts:
the directory may have handed a block freed by an earlier chunk to a later
one, so a chunk's reads must precede every later chunk's writes. Chunks not
involving this instance are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_esp.core.esp.migration_plan import MigrationPlan
from vllm_esp.kernels.attention import PagedKVCache
from vllm_esp.kernels.esp.group import InstanceGroup


def execute_migration(
    group: InstanceGroup, plan: MigrationPlan, caches: Sequence[PagedKVCache]
) -> int:
    """Run this instance's side of ``plan`` over all layers; returns tokens sent + received."""
    if not caches:
        raise ValueError("migration needs the caches of every layer")
    me, device = group.instance_id, group.device
    geometry = (caches[0].num_kv_heads, caches[0].head_size)
    num_moved = 0
    for chunk in plan.chunks:
        if me not in (chunk.src, chunk.dst):
            continue
        if me == chunk.src:
            slots = torch.tensor(chunk.src_slots, dtype=torch.int64, device=device)
            layers = [cache.gather_slots(slots) for cache in caches]
            buf = torch.stack([torch.stack((k, v)) for k, v, _ in layers])
            # Positions travel with the KV, read from the source cache itself.
            group.exchange([(chunk.dst, buf), (chunk.dst, layers[0][2])], []).wait()
        else:
            buf = torch.empty(
                (len(caches), 2, chunk.num_tokens, *geometry), dtype=caches[0].dtype, device=device
            )
            positions = torch.empty((chunk.num_tokens,), dtype=torch.int64, device=device)
            group.exchange([], [(chunk.src, buf), (chunk.src, positions)]).wait()
            slots = torch.tensor(chunk.dst_slots, dtype=torch.int64, device=device)
            for layer, cache in enumerate(caches):
                cache.write(slots, buf[layer, 0], buf[layer, 1], positions)
        num_moved += chunk.num_tokens
    return num_moved
