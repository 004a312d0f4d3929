"""Decode-phase KV migration planning (torch-free).

A migration moves the last ``n`` local tokens of a request from one instance
to the end of its shard on another, in chunks of at most
``max_chunk_tokens`` (LoongServe's ``max_mig_len``) so the transfer buffer
stays bounded::

    src shard of r (local order)     dst shard of r
    [ kept ............ | c2 | c1 ]  [ existing ... | c1 | c2 ]
                          ^^^^^^^ last n = |c1| + |c2| tokens

Chunks are planned against the directory one after another, so a later
chunk may reuse blocks an earlier one freed; workers therefore execute the
chunks of a ``MigrationPlan`` in order, reading a chunk's source slots before
writing any later chunk's destination slots.

``plan_consolidation`` applies it to emptying the least-used instance into
the fullest ones that have room, so that instance can leave its decode
groups and serve a prefill. ``vllm_esp/kernels/esp/migrate.py`` executes
the plans (ESP plan and kernel tests); the engine's ESP scheduler moves
whole blocks instead (``BlockMove`` in ``step_plan.py``, proposed by the
elastic policy's ``consolidate``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_esp.core.esp.directory import DistributedKVDirectory, TokenRange


@dataclass(frozen=True)
class MigrationChunk:
    """One bounded transfer: ``src_slots[k]`` on ``src`` goes to ``dst_slots[k]`` on ``dst``."""

    req_id: str
    src: int
    dst: int
    src_slots: tuple[int, ...]
    dst_slots: tuple[int, ...]
    position_ranges: tuple[TokenRange, ...]
    """Global positions of the moved tokens, in slot order."""

    @property
    def num_tokens(self) -> int:
        return len(self.src_slots)


@dataclass(frozen=True)
class MigrationPlan:
    """Ordered chunks; every worker walks them in this order."""

    chunks: tuple[MigrationChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


Move = tuple[str, int, int, int]
"""``(req_id, src, dst, num_tokens)``: move the last ``num_tokens`` local tokens."""


def plan_migration(
    directory: DistributedKVDirectory, moves: Sequence[Move], max_chunk_tokens: int
) -> MigrationPlan:
    """Apply ``moves`` to the directory and return the chunked plan.

    All-or-nothing: the moves are first tried on a copy, so on
    ``ESPCapacityError``/``ValueError`` the directory is unchanged.
    """
    if max_chunk_tokens <= 0:
        raise ValueError(f"max_chunk_tokens must be positive, got {max_chunk_tokens}")
    _apply(copy.deepcopy(directory), moves, max_chunk_tokens)
    return MigrationPlan(_apply(directory, moves, max_chunk_tokens))


def _apply(
    directory: DistributedKVDirectory, moves: Sequence[Move], max_chunk_tokens: int
) -> tuple[MigrationChunk, ...]:
    chunks = []
    for req_id, src, dst, num_tokens in moves:
        remaining = num_tokens
        while remaining > 0:
            n = min(remaining, max_chunk_tokens)
            src_slots, dst_slots, ranges = directory.migrate_tail(req_id, src, dst, n)
            chunks.append(
                MigrationChunk(req_id, src, dst, tuple(src_slots), tuple(dst_slots), tuple(ranges))
            )
            remaining -= n
    return tuple(chunks)


def plan_consolidation(
    directory: DistributedKVDirectory, instances: Sequence[int], max_chunk_tokens: int
) -> tuple[int, MigrationPlan] | None:
    """Empty the least-used of ``instances`` into the fullest others, if it all fits.

    Returns ``(freed_instance, plan)``, with the freed instance unregistered
    from the moved requests, or ``None`` (directory unchanged) when fewer than
    two instances hold KV or the others lack room. Destinations are filled
    fullest first, as in LoongServe's ``_minimize_decoding_occupied_instances``.
    """
    holders = [i for i in instances if directory.num_used_tokens(i) > 0]
    if len(holders) < 2:
        return None
    src = min(holders, key=lambda i: (directory.num_used_tokens(i), i))
    dsts = sorted(
        (i for i in instances if i != src), key=lambda i: (-directory.num_used_tokens(i), i)
    )
    trial = copy.deepcopy(directory)
    moves: list[Move] = []
    for req_id in sorted(trial.req_ids):
        remaining = trial.num_local_tokens(req_id, src)
        for dst in dsts:
            take = min(remaining, trial.num_appendable_tokens(req_id, dst))
            if take > 0:
                trial.migrate_tail(req_id, src, dst, take)
                moves.append((req_id, src, dst, take))
                remaining -= take
            if remaining == 0:
                break
        if remaining:
            return None
    # The trial run succeeded on an identical copy, so this cannot raise.
    plan = plan_migration(directory, moves, max_chunk_tokens)
    for req_id in directory.req_ids:
        if src in directory.instances(req_id):
            directory.unregister(req_id, src)
    return src, plan
