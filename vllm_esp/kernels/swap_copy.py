"""Worker side of the host KV swap: coarse copies between the engine's
paged KV cache and a host pool. The host-swap copies of both the vLLM
connector (``vllm_esp/integration/swap/connector.py``) and the ESP instances
(``vllm_esp/integration/esp/host_swap.py``); the slot bookkeeping is
``vllm_esp/core/swap/book.py``.

Layout
------
vLLM gives the connector one tensor per attention layer. The *block
dimension* is the one indexed by block id: dim 0 on CPU
(``[num_blocks, num_kv_heads, block_size, 2 * head_size]``), dim 1 for
FlashAttention (``[2, num_blocks, block_size, num_kv_heads, head_size]``).
Each layer is split into *units* whose first dimension is the block
dimension (one unit per layer on CPU; K and V on FlashAttention), and each
unit is viewed as a matrix with one row per block. The host pool holds, per
unit, a matrix of the same row width with one row per host slot::

    device unit (rows = blocks)                        host unit (rows = slots)
    ┌──────────────┐                                   ┌──────────────┐ 0
    │ ...          │     swap-out: one gather          │ ...          │
    │ block 7      │──┐  index_select(dev, 0, [7,3,9], ├──────────────┤ 4  ─┐
    │ block 3      │──┼─► out=host[4:7])  ───────────► │ slots 4,5,6  │     │ one host run
    │ block 9      │──┘  swap-in: one scatter          ├──────────────┤ 7  ─┘
    │ ...          │◄─── index_copy_(dev, 0, [7,3,9],  │ ...          │
    └──────────────┘     host[4:7])                    └──────────────┘

So a step moves all blocks of all its requests with one op per unit per
contiguous host run (:func:`vllm_esp.core.swap.book.host_runs`), never one
copy per block per layer.

Rows are reinterpreted as ``complex128`` (or ``float64``) when the row
width allows: a bitwise copy either way, but PyTorch's CPU
``index_copy_`` moves 16-byte elements at memcpy speed and 2-byte bf16
elements at about 0.4 of it.

CUDA: the pool is pinned; copies run on a side stream. A swap-out gathers
on the device and sends one contiguous DMA per run into pinned memory; a
swap-in sends the run's contiguous host rows in one DMA and scatters on the
device. The side stream waits for the compute stream before a swap-out (the
victim's last step must have written its KV), and the compute stream waits
for a swap-out's event before it may write a freed block (same step if the
scheduler says a freed block is reused now, else at the next step) and for
a swap-in's event before the forward. Prefetches are only recorded; the
request runs after ``event.query()`` says they landed. CPU: synchronous.

Between engines
---------------
ESP instances (``vllm_esp/integration/esp/host_swap.py``) each hold a pool
like this one, and a slot swapped out on one instance may be loaded on
another. :meth:`SwapCopyEngine.read_slots` packs the host rows of some
slots, unit after unit, into one flat ``uint8`` buffer (each unit's rows
start on a 16-byte boundary, so they keep their wide element type), and
the receiving engine, built over caches of the same shapes, scatters that
buffer into its device blocks with :meth:`SwapCopyEngine.write_blocks`:
one op per unit each side, one tensor on the wire.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_esp.core.swap.book import BlockCopy, host_runs

__all__ = ["SwapCopyEngine", "find_block_dim"]


def find_block_dim(shape: Sequence[int], stride: Sequence[int], num_blocks: int) -> tuple[int, int]:
    """``(dim, rows_per_block)`` of the block dimension of a KV tensor.

    The block dimension has ``num_blocks`` entries, or a multiple of it when
    the attention kernel splits each block into smaller kernel blocks. Among
    several candidates the one with the largest stride wins (the block
    dimension is outside the per-block data).
    """
    exact = [d for d, n in enumerate(shape) if n == num_blocks]
    if exact:
        return max(exact, key=lambda d: stride[d]), 1
    multiple = [
        d for d, n in enumerate(shape) if num_blocks and n > num_blocks and n % num_blocks == 0
    ]
    if multiple:
        d = max(multiple, key=lambda d: stride[d])
        return d, shape[d] // num_blocks
    raise ValueError(f"no dimension of KV tensor {tuple(shape)} holds {num_blocks} blocks")


def _row_view(unit: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    """``unit`` as ``[num_rows, row]`` with the widest element type the row
    allows, or None if the rows are not contiguous."""
    try:
        rows = unit.view(num_rows, -1)
    except RuntimeError:
        return None
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        return None
    row_bytes = rows.shape[1] * rows.element_size()
    for wide in (torch.complex128, torch.float64):
        size = torch.empty((), dtype=wide).element_size()
        if row_bytes % size == 0 and rows.element_size() <= size:
            try:
                return rows.view(wide)
            except RuntimeError:
                continue
    return rows


#: A host run (first slot, number of blocks) and its device index tensor
#: per ``rows_per_block`` (see :class:`~vllm_esp.core.swap.book.HostRun`).
_Run = tuple[int, int, dict[int, torch.Tensor]]

#: Alignment of each unit's rows in a packed buffer: the widest row element
#: (``complex128``) may view them in place.
_PACK_ALIGN = 16


def _aligned(num_bytes: int) -> int:
    return -(-num_bytes // _PACK_ALIGN) * _PACK_ALIGN


@dataclass
class _Unit:
    """One block-major slice of a layer and its host mirror."""

    device: torch.Tensor
    host: torch.Tensor
    #: Rows of ``device``/``host`` per logical KV block.
    rows_per_block: int

    @property
    def block_bytes(self) -> int:
        return self.rows_per_block * self.device[0].numel() * self.device.element_size()


class SwapCopyEngine:
    """Executes the copies of :class:`~vllm_esp.core.swap.book.StepTransfers`."""

    def __init__(
        self,
        kv_caches: dict[str, torch.Tensor],
        num_device_blocks: int,
        num_host_blocks: int,
        pin_memory: bool | None = None,
    ) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors to swap")
        first = next(iter(kv_caches.values()))
        self.device = first.device
        self.is_cuda = self.device.type == "cuda"
        if pin_memory is None:
            pin_memory = self.is_cuda
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.units: list[_Unit] = []
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        for name, tensor in kv_caches.items():
            # Layers that share a KV tensor (KV sharing) are copied once.
            key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            if key in seen:
                continue
            seen.add(key)
            try:
                dim, ratio = find_block_dim(tensor.shape, tensor.stride(), num_device_blocks)
            except ValueError as e:
                raise ValueError(f"layer {name}: {e}") from None
            for outer in itertools.product(*(range(n) for n in tensor.shape[:dim])):
                self.units.append(self._make_unit(tensor[outer], ratio, pin_memory))
        self.block_bytes = sum(u.block_bytes for u in self.units)
        self._ratios = sorted({u.rows_per_block for u in self.units})
        self._stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None
        # CUDA bookkeeping: the last swap-out's event (the compute stream
        # waits for it before the next step writes freed blocks), pending
        # prefetches, and timing pairs not yet read.
        self._last_out_event: torch.cuda.Event | None = None
        self._prefetches: list[tuple[str, torch.cuda.Event]] = []
        self._done_prefetches: set[str] = set()
        self._timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = {"out": 0.0, "in": 0.0}

    def _make_unit(self, unit: torch.Tensor, ratio: int, pin_memory: bool) -> _Unit:
        nb = self.num_device_blocks
        rows = _row_view(unit, nb)  # a block's kernel blocks as one row
        per_block = 1
        if rows is None:
            rows = _row_view(unit, nb * ratio)
            per_block = ratio
        if rows is None:  # not viewable as rows: index the tensor as is
            rows, per_block = unit, ratio
        host = torch.empty(
            (self.num_host_blocks * per_block, *rows.shape[1:]),
            dtype=rows.dtype,
            device="cpu",
            pin_memory=pin_memory,
        )
        return _Unit(rows, host, per_block)

    # ------------------------------------------------------------ indices
    def _index(self, blocks: Sequence[int], per_block: int, on_device: bool) -> torch.Tensor:
        # numpy + from_numpy: ~3x cheaper than torch.tensor(list), which
        # matters for the small copies of short requests.
        ids = np.fromiter(blocks, dtype=np.int64, count=len(blocks))
        if per_block > 1:
            ids = np.add.outer(ids * per_block, np.arange(per_block, dtype=np.int64)).ravel()
        index = torch.from_numpy(ids)
        return index.to(self.device) if on_device and self.is_cuda else index

    def _indices(self, blocks: Sequence[int], on_device: bool = True) -> dict[int, torch.Tensor]:
        """Row indices of ``blocks`` (device blocks, or host slots with
        ``on_device=False``) per ``rows_per_block``."""
        return {r: self._index(blocks, r, on_device) for r in self._ratios}

    def _runs(self, copies: Sequence[BlockCopy]) -> list[_Run]:
        return [
            (run.host_start, len(run.device_blocks), self._indices(run.device_blocks))
            for run in host_runs(copies)
        ]

    # -------------------------------------------------------------- copies
    def _copy_out(self, runs: list[_Run]) -> None:
        for host_start, n, index in runs:
            for u in self.units:
                lo, hi = host_start * u.rows_per_block, (host_start + n) * u.rows_per_block
                idx = index[u.rows_per_block]
                if self.is_cuda:
                    u.host[lo:hi].copy_(u.device.index_select(0, idx), non_blocking=True)
                else:
                    torch.index_select(u.device, 0, idx, out=u.host[lo:hi])

    def _copy_in(self, runs: list[_Run]) -> None:
        for host_start, n, index in runs:
            for u in self.units:
                lo, hi = host_start * u.rows_per_block, (host_start + n) * u.rows_per_block
                src = u.host[lo:hi]
                if self.is_cuda:
                    src = src.to(self.device, non_blocking=True)
                u.device.index_copy_(0, index[u.rows_per_block], src)

    def _run(self, direction: str, copies: Sequence[BlockCopy]) -> torch.cuda.Event | None:
        """Issue one direction's copies; CUDA: on the side stream, returns
        the completion event; CPU: synchronously, returns None."""
        if not self.is_cuda:
            start = time.perf_counter()
            runs = self._runs(copies)
            (self._copy_out if direction == "out" else self._copy_in)(runs)
            self._seconds[direction] += time.perf_counter() - start
            return None
        self._collect_timings()  # bounded for owners that never take_seconds
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            begin.record(self._stream)
            runs = self._runs(copies)
            (self._copy_out if direction == "out" else self._copy_in)(runs)
            end.record(self._stream)
        self._timings.append((direction, begin, end))
        return end

    def swap_out(self, copies: Sequence[BlockCopy], blocks_reused_now: bool) -> None:
        """Device -> host; call before freed blocks can be written."""
        if self.is_cuda:
            compute = torch.cuda.current_stream(self.device)
            if self._last_out_event is not None:
                # Blocks freed by earlier steps' swap-outs may be written
                # from this step on.
                compute.wait_event(self._last_out_event)
                self._last_out_event = None
            if copies:
                # The victims' last steps must have written their KV.
                assert self._stream is not None
                self._stream.wait_stream(compute)
        if not copies:
            return
        event = self._run("out", copies)
        if event is not None:
            if blocks_reused_now:
                torch.cuda.current_stream(self.device).wait_event(event)
            else:
                self._last_out_event = event

    def swap_in(self, copies: Sequence[BlockCopy]) -> None:
        """Host -> device for requests that run this step (before the forward)."""
        if not copies:
            return
        event = self._run("in", copies)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def prefetch(self, copies: Sequence[BlockCopy]) -> None:
        """Host -> device for requests that run later; one event each, so
        each is reported as soon as its own copy has landed."""
        for copy in copies:
            event = self._run("in", (copy,))
            if event is None:
                self._done_prefetches.add(copy.request_id)
            else:
                self._prefetches.append((copy.request_id, event))

    def finished_prefetches(self) -> set[str]:
        """Requests whose prefetch has landed since the last call."""
        done, self._done_prefetches = self._done_prefetches, set()
        pending = []
        for request_id, event in self._prefetches:
            if event.query():
                done.add(request_id)
            else:
                pending.append((request_id, event))
        self._prefetches = pending
        return done

    def _collect_timings(self) -> None:
        """Add the times of completed CUDA copies to the totals."""
        pending = []
        for direction, begin, end in self._timings:
            if end.query():
                self._seconds[direction] += begin.elapsed_time(end) / 1e3
            else:
                pending.append((direction, begin, end))
        self._timings = pending

    def take_seconds(self) -> dict[str, float]:
        """Copy time per direction ("out", "in") since the last call (CUDA:
        of the copies that have completed)."""
        self._collect_timings()
        out, self._seconds = self._seconds, {"out": 0.0, "in": 0.0}
        return out

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    # ------------------------------------------------------ between engines
    def packed_bytes(self, num_blocks: int) -> int:
        """Size of a :meth:`read_slots` buffer of ``num_blocks`` blocks."""
        return sum(_aligned(num_blocks * u.block_bytes) for u in self.units)

    def _segments(self, packed: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
        """Each unit's rows of ``num_blocks`` blocks inside ``packed``, in the
        unit's host row shape and element type (views, no copy)."""
        if packed.dtype != torch.uint8 or packed.numel() != self.packed_bytes(num_blocks):
            raise ValueError(
                f"packed buffer {packed.dtype} [{packed.numel()}] does not hold "
                f"{num_blocks} blocks of this engine ({self.packed_bytes(num_blocks)} bytes)"
            )
        views, offset = [], 0
        for u in self.units:
            num_bytes = num_blocks * u.block_bytes
            rows = packed[offset : offset + num_bytes].view(u.host.dtype)
            views.append(rows.view(num_blocks * u.rows_per_block, *u.host.shape[1:]))
            offset += _aligned(num_bytes)
        return views

    def read_slots(self, slots: Sequence[int]) -> torch.Tensor:
        """The host rows of ``slots``, in order, packed into one flat
        ``uint8`` host tensor (pinned on CUDA) for :meth:`write_blocks` of
        an engine over caches of the same shapes."""
        self.synchronize()  # CUDA: swap-outs in flight may still write these rows
        packed = torch.empty(
            self.packed_bytes(len(slots)), dtype=torch.uint8, pin_memory=self.is_cuda
        )
        index = self._indices(slots, on_device=False)
        for u, rows in zip(self.units, self._segments(packed, len(slots)), strict=True):
            torch.index_select(u.host, 0, index[u.rows_per_block], out=rows)
        return packed

    def write_blocks(self, device_blocks: Sequence[int], packed: torch.Tensor) -> None:
        """Scatter a :meth:`read_slots` buffer (on the host or this engine's
        device) into ``device_blocks``, in order, on the current stream."""
        views = self._segments(packed.to(self.device, non_blocking=True), len(device_blocks))
        index = self._indices(device_blocks)
        for u, rows in zip(self.units, views, strict=True):
            u.device.index_copy_(0, index[u.rows_per_block], rows)

    # ----------------------------------------------------------- benchmark
    def measure(self, num_blocks: int, repeats: int = 5) -> dict[str, float]:
        """Median copy times of ``num_blocks`` blocks each way, against a
        plain ``copy_`` of the same bytes between the same memories.

        The swap moves device blocks ``0 .. num_blocks`` in shuffled order
        (a gather/scatter, as after churn) to and from host slots
        ``0 .. num_blocks``; the reference copies the same block range of
        each unit contiguously (``reference_s``). ``reference_flat_s`` is one
        memcpy of the same byte count between two initialised buffers (a
        never-written ``torch.empty`` would read the kernel's zero page and
        flatter the reference). Overwrites those blocks and slots: only for
        an idle engine (benchmarks).
        """
        if not 0 < num_blocks <= min(self.num_host_blocks, self.num_device_blocks):
            raise ValueError(f"cannot measure {num_blocks} blocks with this pool")
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        copy = BlockCopy("measure", tuple(order), tuple(range(num_blocks)))
        nbytes = self.block_bytes * num_blocks
        src = torch.ones(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.zeros(nbytes, dtype=torch.uint8, device="cpu", pin_memory=self.is_cuda)

        def plain() -> None:
            for u in self.units:
                n = num_blocks * u.rows_per_block
                u.host[:n].copy_(u.device[:n], non_blocking=self.is_cuda)

        fns = {
            "swap_out_s": lambda: self._run("out", (copy,)),
            "swap_in_s": lambda: self._run("in", (copy,)),
            "reference_s": plain,
            "reference_flat_s": lambda: dst.copy_(src, non_blocking=self.is_cuda),
        }
        saved = self._seconds
        self._seconds = {"out": 0.0, "in": 0.0}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(repeats + 1):  # round-robin: load changes hit all alike
            for key, fn in fns.items():
                if self.is_cuda:
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                fn()
                if self.is_cuda:
                    torch.cuda.synchronize(self.device)
                if i:  # the first round warms up
                    times[key].append(time.perf_counter() - start)
        result = {"bytes": float(nbytes)}
        result.update({k: sorted(v)[len(v) // 2] for k, v in times.items()})
        self.synchronize()
        self._timings.clear()
        self._seconds = saved
        return result
