"""Step 4 of LoongServe's scheduler: the elastic scaling plan.

* **scale-down** (:func:`pack_retain`, ``_get_batch_prefill_migration_plan``):
  a prefill batch computes on all its instances but keeps its new KV on
  the fullest instances with room, filled in turn, so the KV after the
  prefill occupies as few instances as the holes allow;
* **multi-master decode** (:func:`plan_decode_group`,
  ``_schedule_decode_batch_list``): a group's instances, fullest first,
  master contiguous slices of its requests,
  ``mini_batch = min(remaining, room, max(remaining // instances_left,
  min_comp_bound))``; the requests are ordered by their home instance (the
  one holding most of their KV) in that order, so a slice is mostly
  mastered where its KV is;
* **scale-up**: a request whose home is full, or whose slice is beyond its
  home's share, gets a master elsewhere in the group without moving KV;
  spare idle instances join the group when its memory falls short of its
  next tokens, and while ``remaining // instances_left > min_comp_bound``
  (the FFN of one master is compute-bound past that batch size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vllm_esp.core.esp.cluster import Batch, DecodeItem
from vllm_esp.core.esp.loong.allocation import Workspace

__all__ = ["DecodePlan", "pack_retain", "plan_decode_group"]


def pack_retain(
    ws: Workspace, lengths: Sequence[int], instances: Sequence[int]
) -> list[tuple[tuple[int, int], ...]]:
    """Each prompt's ``retain`` on ``instances``, fullest with room first.

    Reserves the tokens in ``ws``. The prompts must fit the instances' free tokens.
    """
    order = sorted((i for i in instances if ws.free(i) > 0), key=lambda i: (-ws.used[i], i))
    retains: list[tuple[tuple[int, int], ...]] = []
    k = 0
    for length in lengths:
        retain: list[tuple[int, int]] = []
        left = length
        while left > 0:
            if k >= len(order):
                raise ValueError(f"prompts of {sum(lengths)} tokens do not fit {instances}")
            inst = order[k]
            take = min(left, ws.free(inst))
            if take <= 0:
                k += 1
                continue
            retain.append((inst, take))
            ws.used[inst] += take
            left -= take
        retains.append(tuple(retain))
    return retains


@dataclass(frozen=True)
class DecodePlan:
    """One group's decode batch (None: nothing fits) and what it left out."""

    batch: Batch | None
    #: Requests with no room for their next token in the group.
    unplaced: tuple[str, ...]
    #: Spare instances the group took (scale-up).
    added: tuple[int, ...]


def plan_decode_group(
    ws: Workspace,
    req_ids: Sequence[str],
    instances: Sequence[int],
    spares: Sequence[int],
    *,
    num_steps: int,
    min_comp_bound: int,
) -> DecodePlan:
    """The group's decode batch of ``num_steps`` steps (1 if that does not fit all).

    ``spares``: idle instances the group may take, in order of preference.
    Reserves the masters' new tokens in ``ws``; the caller removes
    ``added`` from its spares.
    """
    tries = (num_steps, 1) if num_steps > 1 else (1,)
    for steps in tries:
        masters, need, added = _assign(ws, req_ids, instances, spares, steps, min_comp_bound)
        if len(masters) == len(req_ids) or steps == 1:
            break
    if not masters:
        return DecodePlan(None, tuple(req_ids), ())
    used, kv = ws.used, ws.kv
    group = set(masters.values())
    for r, master in masters.items():
        group.update(kv[r])
        used[master] += need[r]
    decodes = tuple(DecodeItem(r, master) for r, master in masters.items())
    batch = Batch(tuple(sorted(group)), decodes=decodes, num_steps=steps)
    unplaced = () if len(masters) == len(req_ids) else tuple(r for r in req_ids if r not in masters)
    return DecodePlan(batch, unplaced, tuple(i for i in added if i in group))


def _home(kv: dict[int, int]) -> int:
    if len(kv) == 1:
        return next(iter(kv))
    return max(kv.items(), key=lambda it: (it[1], -it[0]))[0]


def _assign(
    ws: Workspace,
    req_ids: Sequence[str],
    instances: Sequence[int],
    spares: Sequence[int],
    steps: int,
    min_comp_bound: int,
) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """Masters of the requests (LoongServe's mini-batch cut), their new
    tokens, and the spares used."""
    need = {r: min(steps, ws.reqs[r].num_remaining_output_tokens) for r in req_ids}
    insts = sorted(instances, key=lambda i: (-ws.used[i], i))
    free = {i: ws.free(i) for i in insts}
    added: list[int] = []
    next_spare = 0

    def take_spare() -> None:
        nonlocal next_spare
        spare = spares[next_spare]
        next_spare += 1
        insts.append(spare)
        free[spare] = ws.free(spare)
        added.append(spare)

    # Memory scale-up: enough room for every next token.
    room, total_need = sum(free.values()), sum(need.values())
    while room < total_need and next_spare < len(spares):
        take_spare()
        room += free[insts[-1]]
    pos = {i: k for k, i in enumerate(insts)}
    if len(instances) == 1:
        order = list(req_ids)
    else:  # stable: the caller's order within one home
        kv = ws.kv
        order = sorted(req_ids, key=lambda r: pos[_home(kv[r])])
    masters: dict[str, int] = {}
    start = 0
    idx = 0
    while idx < len(insts) and start < len(order):
        inst = insts[idx]
        if free[inst] > 0:
            remaining = len(order) - start
            num_left = len(insts) - idx
            # Compute scale-up: a master past the bound is compute-bound.
            while remaining // num_left > min_comp_bound and next_spare < len(spares):
                take_spare()
                num_left += 1
            bound = min(remaining, max(remaining // num_left, min_comp_bound))
            count = 0
            while count < bound and start < len(order) and need[order[start]] <= free[inst]:
                masters[order[start]] = inst
                free[inst] -= need[order[start]]
                start += 1
                count += 1
        idx += 1
    # What the contiguous cut left (a request needing more than a hole): any room.
    for r in order[start:]:
        best = max(insts, key=lambda i: (free[i], -i))
        if free[best] >= need[r]:
            masters[r] = best
            free[best] -= need[r]
    return masters, need, added
