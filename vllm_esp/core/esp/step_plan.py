"""The per-step ESP plan (plain data, torch-free) and each instance's share of it.

The engine has ONE global block space of ``N * blocks_per_instance`` blocks;
global block ``g`` lives on instance ``g // blocks_per_instance`` at local
block ``g % blocks_per_instance``. vLLM's own ``KVCacheManager`` hands out
global ids, so a request's block table says, block by block, which instance
stores which of its tokens::

    blocks_per_instance = 4, block_size = 2
    block table [5, 6, 1, 9]  ->  instance [1, 1, 0, 2]
    positions    0 1 | 2 3 | 4 5 | 6 7
    stored on    1 1 | 1 1 | 0 0 | 2 2      (KV spans instances 0, 1, 2)

Per step the scheduler emits an :class:`ESPStepPlan`: for every scheduled
request the new tokens, their block table and which instances *compute*
them (token ``k`` of the step on ``compute[k % len(compute)]``: a token
stripe, so the causal work is balanced). A token computed on one instance
and stored on another is shipped there (scale-down during prefill: compute
on many, keep KV on few). Attention then runs where the KV is: a query goes
to every instance holding KV of its request, each returns a partial
``(out, lse)`` over its local blocks, and the query's instance merges them.

A prefill chunk computed on several instances (DoP > 1) is LoongServe's
striped ring instead: its queries stay where they were computed, the
step's new K/V stripes rotate around the compute group, and each instance
attends its own queries to every stripe as it passes (:class:`RingShare`).
The instance that stores a token keeps it as its stripe passes (proactive
scale-down: no extra bytes move); only the context computed in earlier
steps is attended where it is stored, by the queries-to-KV path::

    chunk [start, end) on group (a, b), start > 0:
      ring       queries x new keys [start, end)     stripes rotate a -> b -> a
      queries    queries x prior keys [0, start)     to the instances storing them
      merge      both partials by log-sum-exp

:func:`local_batch` turns the plan into exactly what one instance does, and
two instances derive matching send/receive counts from the same plan.

The plan also carries the hostage bound it was made under:
:meth:`ESPStepPlan.check_invariants` asserts that while decodes wait, no
prefill chunk's estimated time, shared by its compute instances, exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_esp.core.esp.placement import PrefillTime

__all__ = [
    "BlockMove",
    "ESPStepPlan",
    "LocalBatch",
    "PeerQueries",
    "RequestStep",
    "RingShare",
    "SamplingSpec",
    "blocks_per_instance",
    "instance_of",
    "local_batch",
    "local_block",
]


def blocks_per_instance(num_blocks: int, num_instances: int) -> int:
    """Blocks each instance allocates so ``num_blocks`` global ids fit (ceil)."""
    if num_instances < 1 or num_blocks < 0:
        raise ValueError(f"bad geometry: {num_blocks} blocks on {num_instances} instances")
    return -(-num_blocks // num_instances)


def instance_of(block_id: int, num_local_blocks: int) -> int:
    """Instance holding global block ``block_id``."""
    return block_id // num_local_blocks


def local_block(block_id: int, num_local_blocks: int) -> int:
    """Index of global block ``block_id`` in its instance's pool."""
    return block_id % num_local_blocks


@dataclass(frozen=True)
class SamplingSpec:
    """What the sampling instance needs (greedy when ``temperature == 0``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    #: Per-request seed; the generator is re-seeded with ``seed + step`` so
    #: the draw does not depend on which instance samples.
    seed: int | None = None


@dataclass(frozen=True)
class RequestStep:
    """One scheduled request in one step."""

    req_id: str
    #: Position of the first token computed this step.
    start: int
    #: Token ids at positions ``start .. start + len(token_ids) - 1``.
    token_ids: tuple[int, ...]
    #: Global block table covering at least ``[0, end)``.
    block_ids: tuple[int, ...]
    #: Instances computing this step's tokens, token ``k`` on
    #: ``compute[k % len(compute)]``.
    compute: tuple[int, ...]
    #: Set iff the step's last token yields a sampled token.
    sample: SamplingSpec | None = None
    #: Output tokens so far (offsets the seeded generator).
    num_output_tokens: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    def compute_instance(self, k: int) -> int:
        return self.compute[k % len(self.compute)]


@dataclass(frozen=True)
class BlockMove:
    """Copy global block ``src`` into global block ``dst`` (all layers) before the step."""

    src: int
    dst: int


@dataclass(frozen=True)
class ESPStepPlan:
    """Everything the N instances do in one engine step."""

    step: int
    num_instances: int
    blocks_per_instance: int
    block_size: int
    requests: tuple[RequestStep, ...]
    #: Migrations carried out before the forward (consolidation).
    moves: tuple[BlockMove, ...] = ()
    #: Requests finished or aborted since the last step (sampler state drop).
    finished_req_ids: tuple[str, ...] = ()
    #: Decoding requests resident when the step was planned (scheduled in it
    #: or paused): each waits for the whole step.
    num_waiting_decodes: int = 0
    #: The hostage bound the step was planned under (s; None: no bound).
    max_decode_stall_s: float | None = None
    #: A ring chunk of at least this many tokens also rotates the context
    #: of earlier steps that its compute instances store (None: never; see
    #: :meth:`rotates_context`).
    ring_context_min_tokens: int | None = None

    def rotates_context(self, req: RequestStep) -> bool:
        """Whether ``req``'s ring carries its earlier context as well.

        Attending that context where it is stored puts all of it on the
        instances that store it (with scale-down, often one); rotating it
        splits it evenly over the group for one copy of that KV per member
        and layer, which pays once the chunk has enough queries to share it.
        """
        return (
            len(req.compute) > 1
            and req.start > 0
            and self.ring_context_min_tokens is not None
            and len(req.token_ids) >= self.ring_context_min_tokens
        )

    def storage_instance(self, req: RequestStep, position: int) -> int:
        return instance_of(req.block_ids[position // self.block_size], self.blocks_per_instance)

    def holders(self, req: RequestStep, end: int | None = None) -> tuple[int, ...]:
        """Instances storing any KV of ``req`` in ``[0, end)`` (default: the
        step's end), ascending."""
        num_blocks = -(-(req.end if end is None else end) // self.block_size)
        return tuple(
            sorted({instance_of(b, self.blocks_per_instance) for b in req.block_ids[:num_blocks]})
        )

    def instances_per_request(self) -> dict[str, int]:
        """Size of each request's group this step (KV holders plus compute)."""
        return {r.req_id: len(set(self.holders(r)) | set(r.compute)) for r in self.requests}

    def stall_s(self, req: RequestStep, prefill_time: PrefillTime) -> float:
        """Estimated time of ``req``'s step on each of its compute instances."""
        return prefill_time(len(req.token_ids), req.start) / len(req.compute)

    def check_invariants(self, prefill_time: PrefillTime) -> None:
        """The hostage bound: while decodes wait, every chunk of more than one
        token keeps its share within ``max_decode_stall_s`` (a one-token step
        costs what a decode of that context costs, and always runs)."""
        bound = self.max_decode_stall_s
        if bound is None or self.num_waiting_decodes == 0:
            return
        for req in self.requests:
            if len(req.token_ids) > 1:
                stall = self.stall_s(req, prefill_time)
                # The planner compared time <= dop * bound; allow its rounding.
                assert stall <= bound * (1 + 1e-9), (
                    f"step {self.step}: {req.req_id}'s chunk of {len(req.token_ids)} tokens "
                    f"on {len(req.compute)} instance(s) makes {self.num_waiting_decodes} "
                    f"decode(s) wait {stall * 1e3:.3f} ms > bound {bound * 1e3:.3f} ms"
                )


@dataclass
class PeerQueries:
    """Queries one instance receives from a peer, grouped per request.

    The rows arrive in the sender's row order, which is request-major, so
    ``cu_seqlens`` splits them into requests with local KV on the receiver.
    """

    num_rows: int = 0
    positions: list[int] = field(default_factory=list)
    cu_seqlens: list[int] = field(default_factory=lambda: [0])
    block_tables: list[list[int]] = field(default_factory=list)
    kv_lens: list[int] = field(default_factory=list)


@dataclass
class RingShare:
    """One instance's part of a striped ring over one compute group.

    Every request of the step computed on exactly this ``group`` rides the
    ring. Logical rank ``r`` (index in ``group``) computes the request's
    step tokens ``k`` with ``k % n == r``; its *block* is those rows of
    every ring request, request-major. At hop ``s`` rank ``r`` holds the
    block of origin ``(r - s) % n``, forwards it to ``group[r + 1]`` and
    receives the next one from ``group[r - 1]``::

              hop 0   hop 1            (n = 2)
    rank 0     B0      B1
    rank 1     B1      B0

    A request whose ring rotates its context (``ESPStepPlan.rotates_context``)
    adds to each origin's block the context of earlier steps that origin
    stores; context stored outside the group is still attended where it is.
    Sizes and positions are derived from the plan on both sides, so only
    K/V travel.
    """

    group: tuple[int, ...]
    rank: int
    #: This instance's rows (batch rows) of the ring's requests, request-major.
    rows: list[int] = field(default_factory=list)
    #: Per origin rank: global positions of its block's rows.
    block_positions: list[list[int]] = field(default_factory=list)
    #: Per origin rank: per-request row offsets of its block (``cu_seqlens``).
    block_cu_rows: list[list[int]] = field(default_factory=list)
    #: Per origin rank: block rows stored on this instance, and their local
    #: slots (never this rank's own block: its rows are ``store_rows``).
    keep_rows: list[list[int]] = field(default_factory=list)
    keep_slots: list[list[int]] = field(default_factory=list)
    #: Per origin rank: positions of the earlier-step context it stores and
    #: rotates with its block (rotating requests only), request-major, and
    #: their per-request offsets.
    context_positions: list[list[int]] = field(default_factory=list)
    context_cu_rows: list[list[int]] = field(default_factory=list)
    #: Local slots of this instance's rotated context, in that order.
    context_slots: list[int] = field(default_factory=list)
    #: Some ring row also has queries-to-KV partials (context of earlier
    #: steps stored outside the group, or not rotated).
    has_prior: bool = False

    @property
    def num_ranks(self) -> int:
        return len(self.group)

    @property
    def send_to(self) -> int:
        return self.group[(self.rank + 1) % self.num_ranks]

    @property
    def recv_from(self) -> int:
        return self.group[(self.rank - 1) % self.num_ranks]

    def origin(self, hop: int) -> int:
        """Origin rank of the block held at ``hop``."""
        return (self.rank - hop) % self.num_ranks


@dataclass
class LocalBatch:
    """One instance's share of an :class:`ESPStepPlan` (all lists; torch-free)."""

    instance: int
    #: Rows computed here, request-major: token ids and positions.
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    #: Rows whose KV stays here, and their local slots.
    store_rows: list[int] = field(default_factory=list)
    store_slots: list[int] = field(default_factory=list)
    #: peer -> rows shipped there (KV computed here, stored there).
    ship_out: dict[int, list[int]] = field(default_factory=dict)
    #: peer -> (local slots, positions) of KV computed there, stored here.
    ship_in: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    #: Own rows attending to local KV, grouped per request.
    own: PeerQueries = field(default_factory=PeerQueries)
    own_rows: list[int] = field(default_factory=list)
    #: peer -> own rows whose request has KV there (queries sent out).
    query_out: dict[int, list[int]] = field(default_factory=dict)
    #: peer -> queries received, to attend against local KV.
    query_in: dict[int, PeerQueries] = field(default_factory=dict)
    #: (req_id, row, spec, num_output_tokens) of the rows that sample here.
    sample_rows: list[tuple[str, int, SamplingSpec, int]] = field(default_factory=list)
    #: Rings this instance is in, in plan order (every member runs them in it).
    rings: list[RingShare] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)


def _local_kv(
    plan: ESPStepPlan, req: RequestStep, instance: int, end: int
) -> tuple[list[int], int]:
    """Local block table and KV length of ``req`` on ``instance`` over ``[0, end)``."""
    bs, nb = plan.block_size, plan.blocks_per_instance
    num_blocks = -(-end // bs)
    table: list[int] = []
    kv_len = 0
    for idx, block in enumerate(req.block_ids[:num_blocks]):
        if instance_of(block, nb) != instance:
            continue
        table.append(local_block(block, nb))
        # Only the last block of [0, end) can be partial, and it is the last
        # local block when local: local tables keep the global order.
        kv_len += min(bs, end - idx * bs)
    return table, kv_len


def local_batch(plan: ESPStepPlan, instance: int) -> LocalBatch:
    """What ``instance`` computes, stores, ships and attends in this step.

    Every instance runs this on the same plan, so the rows ``i`` ships or
    sends to ``j`` are, in order, the rows ``j`` expects from ``i``.
    """
    if not 0 <= instance < plan.num_instances:
        raise ValueError(f"instance {instance} outside 0..{plan.num_instances - 1}")
    out = LocalBatch(instance=instance)
    rings: dict[tuple[int, ...], RingShare] = {}
    for req in plan.requests:
        if len(req.block_ids) * plan.block_size < req.end:
            raise ValueError(
                f"request {req.req_id}: {len(req.block_ids)} blocks cannot hold {req.end} tokens"
            )
        rows_of = _compute_and_store(out, plan, req)
        ring = len(req.compute) > 1
        if ring and instance in req.compute:
            share = rings.get(req.compute)
            if share is None:
                share = rings[req.compute] = _new_ring(req.compute, instance)
                out.rings.append(share)
            _join_ring(share, plan, req, rows_of.get(instance, []))
        # Ring requests attend where KV is only for the context of earlier
        # steps (stored outside the group, when the ring rotates it); the
        # step's own keys reach every query around the ring.
        rotated = set(req.compute) if plan.rotates_context(req) else set()
        _attend_where_stored(out, plan, req, rows_of, req.start if ring else req.end, skip=rotated)
        if req.sample is not None:
            last = len(req.token_ids) - 1
            if req.compute_instance(last) == instance:
                out.sample_rows.append(
                    (req.req_id, rows_of[instance][-1], req.sample, req.num_output_tokens)
                )
    return out


def _compute_and_store(
    out: LocalBatch, plan: ESPStepPlan, req: RequestStep
) -> dict[int, list[int]]:
    """Add ``req``'s rows computed here and the KV stored or shipped here.

    Returns, per computing instance, its rows of ``req`` in step order
    (batch rows here, -1 elsewhere). A ring member keeps the stripes of
    its ring peers as they pass, so only KV stored outside the compute
    group is shipped.
    """
    bs, nb, me = plan.block_size, plan.blocks_per_instance, out.instance
    ring = set(req.compute) if len(req.compute) > 1 else set()
    rows_of: dict[int, list[int]] = {}
    for k, token in enumerate(req.token_ids):
        pos = req.start + k
        comp = req.compute_instance(k)
        store = instance_of(req.block_ids[pos // bs], nb)
        slot = local_block(req.block_ids[pos // bs], nb) * bs + pos % bs
        if comp == me:
            row = len(out.input_ids)
            out.input_ids.append(token)
            out.positions.append(pos)
            rows_of.setdefault(comp, []).append(row)
            if store == me:
                out.store_rows.append(row)
                out.store_slots.append(slot)
            elif store not in ring:
                out.ship_out.setdefault(store, []).append(row)
        else:
            rows_of.setdefault(comp, []).append(-1)  # a peer's row
            if store == me and me not in ring:
                slots, positions = out.ship_in.setdefault(comp, ([], []))
                slots.append(slot)
                positions.append(pos)
    return rows_of


def _new_ring(group: tuple[int, ...], instance: int) -> RingShare:
    n = len(group)
    return RingShare(
        group=group,
        rank=group.index(instance),
        block_positions=[[] for _ in range(n)],
        block_cu_rows=[[0] for _ in range(n)],
        keep_rows=[[] for _ in range(n)],
        keep_slots=[[] for _ in range(n)],
        context_positions=[[] for _ in range(n)],
        context_cu_rows=[[0] for _ in range(n)],
    )


def _join_ring(share: RingShare, plan: ESPStepPlan, req: RequestStep, my_rows: list[int]) -> None:
    """Add ``req``'s stripes to every origin's block of ``share``."""
    bs, nb, n = plan.block_size, plan.blocks_per_instance, share.num_ranks
    share.rows.extend(my_rows)
    rotates = plan.rotates_context(req)
    outside = set(plan.holders(req, req.start)) - set(share.group) if req.start else set()
    share.has_prior = share.has_prior or (req.start > 0 and (not rotates or bool(outside)))
    rank_of = {inst: r for r, inst in enumerate(share.group)}
    for idx in range(-(-req.start // bs)) if rotates else ():
        block = req.block_ids[idx]
        origin = rank_of.get(instance_of(block, nb))
        if origin is None:
            continue  # stored outside the group: attended where it is
        in_block = range(idx * bs, min(req.start, (idx + 1) * bs))
        share.context_positions[origin].extend(in_block)
        if origin == share.rank:
            base = local_block(block, nb) * bs - idx * bs
            share.context_slots.extend(base + pos for pos in in_block)
    for origin in range(n):
        share.context_cu_rows[origin].append(len(share.context_positions[origin]))
    for origin in range(n):
        positions = share.block_positions[origin]
        for k in range(origin, len(req.token_ids), n):
            pos = req.start + k
            block = req.block_ids[pos // bs]
            if origin != share.rank and instance_of(block, nb) == share.group[share.rank]:
                share.keep_rows[origin].append(len(positions))
                share.keep_slots[origin].append(local_block(block, nb) * bs + pos % bs)
            positions.append(pos)
        share.block_cu_rows[origin].append(len(positions))


def _attend_where_stored(
    out: LocalBatch,
    plan: ESPStepPlan,
    req: RequestStep,
    rows_of: dict[int, list[int]],
    end: int,
    skip: set[int],
) -> None:
    """Queries of ``req`` to the instances storing its KV over ``[0, end)``,
    except those in ``skip`` (their share reaches the queries otherwise)."""
    me = out.instance
    holders = [h for h in plan.holders(req, end) if h not in skip] if end > 0 else []
    table_here, kv_len_here = _local_kv(plan, req, me, end) if me in holders else ([], 0)
    for comp, rows in rows_of.items():
        if comp == me:
            if me in holders:
                out.own_rows.extend(rows)
                _append_group(out.own, [out.positions[r] for r in rows], table_here, kv_len_here)
            for peer in holders:
                if peer != me:
                    out.query_out.setdefault(peer, []).extend(rows)
        elif me in holders:
            positions = [
                req.start + k for k in range(len(req.token_ids)) if req.compute_instance(k) == comp
            ]
            _append_group(
                out.query_in.setdefault(comp, PeerQueries()), positions, table_here, kv_len_here
            )


def _append_group(group: PeerQueries, positions: list[int], table: list[int], kv_len: int) -> None:
    group.num_rows += len(positions)
    group.positions.extend(positions)
    group.cu_seqlens.append(group.num_rows)
    group.block_tables.append(list(table))
    group.kv_lens.append(kv_len)
