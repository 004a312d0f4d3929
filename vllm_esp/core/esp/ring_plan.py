"""Prefill planning for elastic sequence parallelism: stripes, retention, ring schedule.

Torch-free. A caller builds a ``RingPrefillPlan`` (which tokens each
instance keeps, and in which blocks) against a ``DistributedKVDirectory``;
every instance derives its own ``RingRankSchedule`` (pure index arithmetic)
from it and ``vllm_esp/kernels/esp/ring_prefill.py`` executes the ring.
Its callers are the ESP plan and kernel tests and ``benchmarks/esp_core.py``;
the engine's served path computes prefills with the queries-to-KV step of
``step_plan.py`` instead.

Striped layout
--------------
In a group of ``N`` instances (logical rank = position in ``group``), token
``t`` of every request lives on logical rank ``t mod N`` at local row
``t // N`` and keeps its true global position ``t``::

    N = 3, one request of L = 8 tokens
    position t      0  1  2  3  4  5  6  7
    rank t mod 3    0  1  2  0  1  2  0  1
    row  t // 3     0  0  0  1  1  1  2  2

    rank 0 holds 0 3 6     ceil((8 - 0) / 3) = 3 rows
    rank 1 holds 1 4 7     ceil((8 - 1) / 3) = 3 rows   <- holds t = L-1: samples token 1
    rank 2 holds 2 5       ceil((8 - 2) / 3) = 2 rows

A rank's *block* is its rows of every request, request-major. Attention
between a query at ``r + m*N`` and a key at ``o + n*N`` is causal on those
global positions, and striping makes every hop carry about the same work.

Ring
----
At hop ``s`` logical rank ``r`` holds the block that originated on rank
``(r - s) mod N``; it forwards it to ``r + 1`` and receives the next one from
``r - 1`` (sizes are known from the plan, so no header travels)::

              hop 0   hop 1   hop 2
    rank 0     B0      B2      B1
    rank 1     B1      B0      B2
    rank 2     B2      B1      B0

Proactive scale-down
--------------------
A ``RetentionPlan`` gives, per rank and request, the global ranges
``[b, e)`` that rank keeps. While block ``B_o`` passes through rank ``r``,
``r`` copies the rows whose positions fall in its ranges. Rows of block
``o`` have positions ``o + i*N``, so the rows inside ``[b, e)`` are exactly::

    i in [ ceil((b - o) / N), ceil((e - o) / N) )   clamped to [0, rows of o)

Every block visits every rank once, so each kept token is copied exactly
once and nothing moves beyond the ring's own traffic. Within a shard the
kept tokens are laid out range after range, each range in position order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_esp.core.esp.directory import (
    DistributedKVDirectory,
    ESPCapacityError,
    TokenRange,
    cdiv,
    check_tiling,
)

# --------------------------------------------------------------------- stripes


def num_stripe_rows(num_tokens: int, rank: int, num_ranks: int) -> int:
    """Rows of a ``num_tokens`` request on logical ``rank``: ``ceil((L - r) / N)``."""
    return max(0, cdiv(num_tokens - rank, num_ranks))


def stripe_rows_in_range(
    origin: int, num_ranks: int, num_tokens: int, begin: int, end: int
) -> tuple[int, int]:
    """Rows ``[i0, i1)`` of ``origin``'s stripe whose positions lie in ``[begin, end)``."""
    num_rows = num_stripe_rows(num_tokens, origin, num_ranks)
    i0 = min(max(cdiv(begin - origin, num_ranks), 0), num_rows)
    i1 = min(max(cdiv(end - origin, num_ranks), 0), num_rows)
    return i0, max(i0, i1)


@dataclass(frozen=True)
class StripeLayout:
    """Token-to-rank map of one prefill batch striped over ``num_ranks`` ranks."""

    num_ranks: int
    num_prompt_tokens: tuple[int, ...]

    def num_rows(self, rank: int, req_index: int) -> int:
        return num_stripe_rows(self.num_prompt_tokens[req_index], rank, self.num_ranks)

    def positions(self, rank: int, req_index: int) -> range:
        return range(rank, self.num_prompt_tokens[req_index], self.num_ranks)

    def cu_rows(self, rank: int) -> tuple[int, ...]:
        """Per-request row offsets of ``rank``'s block (``cu_seqlens``, len = reqs + 1)."""
        offsets = [0]
        for j in range(len(self.num_prompt_tokens)):
            offsets.append(offsets[-1] + self.num_rows(rank, j))
        return tuple(offsets)

    def num_block_rows(self, rank: int) -> int:
        return self.cu_rows(rank)[-1]

    def owner_rank(self, position: int) -> int:
        return position % self.num_ranks

    def last_token_rank(self, req_index: int) -> int:
        """The rank holding the last prompt token, which produces the first output token."""
        return (self.num_prompt_tokens[req_index] - 1) % self.num_ranks


# ------------------------------------------------------------------- retention


@dataclass(frozen=True)
class RetentionPlan:
    """Which global token ranges each group member keeps after a ring prefill.

    ``kept[rank][req]`` lists ranges ``[b, e)`` for logical ``rank`` (index in
    ``group``) and request index ``req``, in the local order they are stored.
    Each request's ranges tile ``[0, num_prompt_tokens[req])`` exactly once.
    """

    group: tuple[int, ...]
    req_ids: tuple[str, ...]
    num_prompt_tokens: tuple[int, ...]
    kept: tuple[tuple[tuple[TokenRange, ...], ...], ...]

    def __post_init__(self) -> None:
        if not self.group or len(set(self.group)) != len(self.group):
            raise ValueError(f"group must list distinct instances, got {self.group}")
        if len(self.req_ids) != len(self.num_prompt_tokens) or len(set(self.req_ids)) != len(
            self.req_ids
        ):
            raise ValueError("req_ids must be distinct and match num_prompt_tokens")
        if len(self.kept) != len(self.group) or any(
            len(per_req) != len(self.req_ids) for per_req in self.kept
        ):
            raise ValueError("kept must be indexed [logical rank][request]")
        for j, req_id in enumerate(self.req_ids):
            if self.num_prompt_tokens[j] <= 0:
                raise ValueError(f"request {req_id!r} has no prompt tokens")
            check_tiling(
                req_id, [r for per_req in self.kept for r in per_req[j]], self.num_prompt_tokens[j]
            )

    @property
    def num_ranks(self) -> int:
        return len(self.group)

    @property
    def stripes(self) -> StripeLayout:
        return StripeLayout(self.num_ranks, self.num_prompt_tokens)

    def num_kept_tokens(self, rank: int, req_index: int) -> int:
        return sum(e - b for b, e in self.kept[rank][req_index])

    def num_required_blocks(self, rank: int, block_size: int) -> int:
        return sum(
            cdiv(self.num_kept_tokens(rank, j), block_size) for j in range(len(self.req_ids))
        )

    def retaining_group(self) -> tuple[int, ...]:
        """Instances that keep at least one token; the others leave the group."""
        return tuple(
            inst
            for r, inst in enumerate(self.group)
            if any(self.kept[r][j] for j in range(len(self.req_ids)))
        )

    def placement(self) -> dict[str, dict[int, tuple[TokenRange, ...]]]:
        """``{req: {instance: ranges}}`` for ``DistributedKVDirectory.allocate_prefill``."""
        return {
            req_id: {inst: self.kept[r][j] for r, inst in enumerate(self.group) if self.kept[r][j]}
            for j, req_id in enumerate(self.req_ids)
        }


def pack_fullest_first(
    req_ids: Sequence[str],
    num_prompt_tokens: Sequence[int],
    group: Sequence[int],
    *,
    num_used_tokens: Mapping[int, int],
    num_free_blocks: Mapping[int, int],
    block_size: int,
) -> RetentionPlan:
    """LoongServe's scale-down plan: pack the batch into the fullest instances first.

    Instances are visited by used tokens, descending (ties: group order).
    Requests are walked in batch order and cut into contiguous ranges at
    instance boundaries, so the new KV occupies as few instances as
    possible. Block-granular: a range of ``n`` tokens costs ``cdiv(n, bs)``
    blocks of the instance that keeps it.

    Raises ``ESPCapacityError`` if the group's free blocks cannot hold the batch.
    """
    order = sorted(range(len(group)), key=lambda r: (-num_used_tokens[group[r]], r))
    free = [num_free_blocks[group[r]] for r in range(len(group))]
    kept: list[list[list[TokenRange]]] = [[[] for _ in req_ids] for _ in group]
    cursor_rank = 0
    for j, num_tokens in enumerate(num_prompt_tokens):
        begin = 0
        while begin < num_tokens:
            while cursor_rank < len(order) and free[order[cursor_rank]] == 0:
                cursor_rank += 1
            if cursor_rank == len(order):
                total = sum(num_prompt_tokens)
                free_tokens = sum(num_free_blocks[i] for i in group) * block_size
                largest = max(num_free_blocks[i] for i in group) * block_size
                raise ESPCapacityError(
                    f"prefill of {total} tokens ({len(req_ids)} request(s)) does not fit in "
                    f"group {tuple(group)}: {free_tokens} free token slots in total, at most "
                    f"{largest} on one instance (block size {block_size})"
                )
            rank = order[cursor_rank]
            take = min(num_tokens - begin, free[rank] * block_size)
            kept[rank][j].append((begin, begin + take))
            free[rank] -= cdiv(take, block_size)
            begin += take
    return RetentionPlan(
        tuple(group),
        tuple(req_ids),
        tuple(num_prompt_tokens),
        tuple(tuple(tuple(rs) for rs in per_req) for per_req in kept),
    )


def plan_retention(
    directory: DistributedKVDirectory,
    req_ids: Sequence[str],
    num_prompt_tokens: Sequence[int],
    group: Sequence[int],
) -> RetentionPlan:
    """``pack_fullest_first`` over the directory's current usage."""
    return pack_fullest_first(
        req_ids,
        num_prompt_tokens,
        group,
        num_used_tokens={i: directory.num_used_tokens(i) for i in group},
        num_free_blocks={i: directory.num_free_blocks(i) for i in group},
        block_size=directory.block_size,
    )


# ----------------------------------------------------------------- ring prefill


@dataclass(frozen=True)
class RingPrefillPlan:
    """Everything the workers of one ring prefill need: retention plus block tables.

    ``block_tables[rank][req]`` are the blocks the instance at logical
    ``rank`` stores its kept tokens of request ``req`` in (empty if none).
    """

    retention: RetentionPlan
    block_tables: tuple[tuple[tuple[int, ...], ...], ...]
    block_size: int

    @property
    def group(self) -> tuple[int, ...]:
        return self.retention.group


def schedule_ring_prefill(
    directory: DistributedKVDirectory,
    req_ids: Sequence[str],
    num_prompt_tokens: Sequence[int],
    group: Sequence[int],
    retention: RetentionPlan | None = None,
) -> RingPrefillPlan:
    """Plan (fullest-first unless ``retention`` is given) and allocate a ring prefill.

    On ``ESPCapacityError`` the directory is left unchanged.
    """
    if retention is None:
        retention = plan_retention(directory, req_ids, num_prompt_tokens, group)
    elif (retention.group, retention.req_ids, retention.num_prompt_tokens) != (
        tuple(group),
        tuple(req_ids),
        tuple(num_prompt_tokens),
    ):
        raise ValueError("retention plan was made for a different batch or group")
    directory.allocate_prefill(dict(zip(req_ids, num_prompt_tokens)), retention.placement())
    block_tables = tuple(
        tuple(
            directory.shard(req_id, inst).block_ids if retention.kept[r][j] else ()
            for j, req_id in enumerate(req_ids)
        )
        for r, inst in enumerate(retention.group)
    )
    return RingPrefillPlan(retention, block_tables, directory.block_size)


@dataclass(frozen=True)
class RingHop:
    """What one rank does with the block it holds at one hop."""

    origin_rank: int
    cu_seqlens_k: tuple[int, ...]
    keep_rows: tuple[int, ...]
    """Rows of the held block this rank retains ..."""
    keep_slots: tuple[int, ...]
    """... and the local KV-pool slots they go to (same order)."""


@dataclass(frozen=True)
class RingRankSchedule:
    """One rank's view of a ring prefill, derived from a ``RingPrefillPlan``."""

    logical_rank: int
    num_ranks: int
    send_to: int
    """Instance id of the next rank (receives this rank's held block)."""
    recv_from: int
    block_rows: tuple[int, ...]
    """Rows of each origin rank's block, indexed by origin logical rank."""
    cu_seqlens_q: tuple[int, ...]
    q_positions: tuple[int, ...]
    hops: tuple[RingHop, ...]
    last_token_rows: tuple[tuple[int, int], ...]
    """``(req_index, local row)`` of the requests whose last prompt token is here."""


def build_ring_schedule(plan: RingPrefillPlan, logical_rank: int) -> RingRankSchedule:
    """Pure index arithmetic: the hops, retained rows and slots of one rank."""
    retention = plan.retention
    stripes = retention.stripes
    n, r, bs = retention.num_ranks, logical_rank, plan.block_size
    lens = retention.num_prompt_tokens
    hops = []
    for s in range(n):
        origin = (r - s) % n
        cu_k = stripes.cu_rows(origin)
        keep_rows: list[int] = []
        keep_slots: list[int] = []
        for j, ranges in enumerate(retention.kept[r]):
            table = plan.block_tables[r][j]
            local_offset = 0  # local index of the current range's first token
            for begin, end in ranges:
                i0, i1 = stripe_rows_in_range(origin, n, lens[j], begin, end)
                for i in range(i0, i1):
                    local = local_offset + origin + i * n - begin
                    keep_rows.append(cu_k[j] + i)
                    keep_slots.append(table[local // bs] * bs + local % bs)
                local_offset += end - begin
        hops.append(RingHop(origin, cu_k, tuple(keep_rows), tuple(keep_slots)))
    last_rows = tuple(
        (j, stripes.cu_rows(r)[j] + stripes.num_rows(r, j) - 1)
        for j in range(len(lens))
        if stripes.last_token_rank(j) == r
    )
    return RingRankSchedule(
        logical_rank=r,
        num_ranks=n,
        send_to=retention.group[(r + 1) % n],
        recv_from=retention.group[(r - 1) % n],
        block_rows=tuple(stripes.num_block_rows(o) for o in range(n)),
        cu_seqlens_q=stripes.cu_rows(r),
        q_positions=tuple(p for j in range(len(lens)) for p in stripes.positions(r, j)),
        hops=tuple(hops),
        last_token_rows=last_rows,
    )
