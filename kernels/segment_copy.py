"""Triton kernel family of the segment-table contract (hpcomm/segments.py); registers backend "triton".

Work items are (segment, line, PIECE-wide column piece), numbered across the table through the
prefix sums of the per-segment item counts (``chunk_ends``, as in csrc/include/segment_index.h); a
1-D grid of programs strides over them and finds each item's segment by binary search, so a table of
a million short rows and one of a single huge run both spread evenly. A segment whose lines abut in
both buffers counts as a single line, so contiguous runs are cut into pieces too.

Everything sized by the table (the checks, chunk_ends, the grid, the block width) is computed once in
prepare, on the host, and moved to the device then; apply only launches. The block width is chosen
from the longest line rather than autotuned: autotuning runs the in-place kernel several times on its
first call (wrong sums with accumulate) and synchronises, which the hot path and graph capture forbid.

On CPU tensors it runs under the Triton interpreter, which triton reads from TRITON_INTERPRET when
``@triton.jit`` is applied; the kernel is therefore built on first use, for whichever mode is on at
that time, rather than when this module is imported (the backend registry may import it early).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from triton import knobs

from hpcomm.segments import Backend, register_backend

# Copies move raw bits, so each element size maps to one integer type and float8, bool and
# anything else of that size share a kernel.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Accumulate is defined where torch's add_ is (float8 has none); bool adds as a logical or.
_ACCUMULATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
                      torch.int16, torch.int32, torch.int64, torch.bool)
# Elements per work item along a line; BLOCK is the step within it.
_PIECE = 8192
# (BLOCK, num_warps) by the longest line of the table, smallest that covers it; the last for longer.
_BLOCKS = ((256, 2), (1024, 4), (4096, 8))
_BLOCK_INTERPRETED = 64
_MAX_PROGRAMS = 8192
# The interpreter runs programs one by one in Python: a few still cover the striding.
_MAX_PROGRAMS_INTERPRETED = 4


# Pointer and size parameters stay unannotated: triton specializes on annotations.
def _segment_kernel(src, dst, table, chunk_ends, num_segments, PIECE: tl.constexpr,  # type: ignore[no-untyped-def]
                    ACCUMULATE: tl.constexpr, ROUND_VIA_FLOAT: tl.constexpr, IS_BF16_BITS: tl.constexpr,
                    IS_BOOL: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.load(chunk_ends + num_segments - 1)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    for item in range(tl.program_id(0).to(tl.int64), total, tl.num_programs(0)):
        lo = total * 0  # int64 in both modes, as the loop-carried type must not change
        hi = lo + num_segments
        while lo < hi:
            mid = (lo + hi) // 2
            owns = tl.load(chunk_ends + mid) > item
            hi = tl.where(owns, mid, hi)
            lo = tl.where(owns, lo, mid + 1)
        first = tl.where(lo > 0, tl.load(chunk_ends + tl.maximum(lo - 1, 0)), 0)
        row = table + lo * 6
        num_lines = tl.load(row + 2)
        line_len = tl.load(row + 3)
        src_stride = tl.load(row + 4)
        dst_stride = tl.load(row + 5)
        contiguous = (num_lines == 1) | ((src_stride == line_len) & (dst_stride == line_len))
        line_len = tl.where(contiguous, line_len * num_lines, line_len)
        # Spelled out: tl.cdiv is itself @triton.jit, bound to the mode in force when triton was imported.
        pieces = (line_len + PIECE - 1) // PIECE
        line = (item - first) // pieces
        piece_begin = (item - first - line * pieces) * PIECE
        piece_end = tl.minimum(piece_begin + PIECE, line_len)
        src_line = src + tl.load(row) + line * src_stride
        dst_line = dst + tl.load(row + 1) + line * dst_stride
        for step in range(0, piece_end - piece_begin, BLOCK):
            col = piece_begin + step + cols
            mask = col < piece_end
            s = tl.load(src_line + col, mask=mask)
            if ACCUMULATE:
                d = tl.load(dst_line + col, mask=mask)
                if IS_BF16_BITS:
                    # Add in float, round to nearest even like c10::BFloat16 (NaN to 0x7FC0), in bits:
                    # the interpreter's float-to-bfloat16 cast truncates. Inline, because a helper
                    # would need @triton.jit in the mode chosen at first use.
                    sum_ = ((d.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True) +
                            (s.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True))
                    bits = sum_.to(tl.uint32, bitcast=True)
                    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
                    s = tl.where(sum_ != sum_, 0x7FC0, rounded).to(tl.uint16).to(tl.int16, bitcast=True)
                elif ROUND_VIA_FLOAT:
                    s = (d.to(tl.float32) + s.to(tl.float32)).to(d.dtype)
                elif IS_BOOL:
                    s = d | s
                else:
                    s = d + s
            tl.store(dst_line + col, s, mask=mask)


@functools.cache
def _kernel(interpret: bool) -> Any:
    del interpret  # the cache key: the mode triton.jit saw
    return triton.jit(_segment_kernel)


@dataclass(frozen=True)
class TritonTable:
    """A prepared table: table and chunk_ends on the device (int64 [n, 6] and [n]), the grid size and
    the block shape; grid 0 when every segment is empty."""

    table: torch.Tensor
    chunk_ends: torch.Tensor
    grid: int
    block: int
    num_warps: int
    interpret: bool


class TritonBackend(Backend):
    """Triton kernels: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (set before triton is
    imported: the interpreter is chosen when a kernel is built)."""

    name = "triton"
    device_types = ("cuda", "cpu")

    def unusable_reason(self, device: torch.device) -> str | None:
        if device.type == "cpu" and not knobs.runtime.interpret:
            return ("backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1 "
                    "(set it before importing triton)")
        return super().unusable_reason(device)

    def _prepare(self, rows: torch.Tensor, device: torch.device) -> Any:
        lines, line_len = rows[:, 2], rows[:, 3]
        # a segment whose lines abut in both buffers is one line, cut into pieces like any other
        contiguous = (lines == 1) | ((rows[:, 4] == line_len) & (rows[:, 5] == line_len))
        line_len = torch.where(contiguous, line_len * lines, line_len)
        lines = torch.where(contiguous, 1, lines)
        chunk_ends = torch.cumsum(lines * ((line_len + _PIECE - 1) // _PIECE), 0)
        interpret = bool(knobs.runtime.interpret)
        max_programs = _MAX_PROGRAMS_INTERPRETED if interpret else _MAX_PROGRAMS
        longest = int(line_len.max())
        block, num_warps = next((b for b in _BLOCKS if b[0] >= longest), _BLOCKS[-1])
        if interpret:
            block = _BLOCK_INTERPRETED
        return TritonTable(rows.to(device), chunk_ends.to(device), min(int(chunk_ends[-1]), max_programs),
                           block, num_warps, interpret)

    def _launch(self, data: Any, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        """src [>= src_extent], dst [>= dst_extent]: flat contiguous, one dtype, the prepared device."""
        if src.dtype != dst.dtype:
            raise TypeError(f"src and dst must share a dtype, got {src.dtype} and {dst.dtype}")
        if accumulate and src.dtype not in _ACCUMULATE_DTYPES:
            raise TypeError(f"accumulate is not defined for {src.dtype} (torch has no add for it); copy is")
        if not accumulate and src.element_size() not in _BITS_DTYPE:
            raise TypeError(f"the triton backend does not copy {src.dtype}")
        if data.grid == 0:
            return
        if accumulate:
            # bool adds as bytes, bfloat16 as bits (see the kernel).
            bits = {torch.bool: torch.uint8, torch.bfloat16: torch.int16}.get(src.dtype, src.dtype)
        else:
            bits = _BITS_DTYPE[src.element_size()]
        _kernel(data.interpret)[(data.grid,)](
            src.view(bits), dst.view(bits), data.table, data.chunk_ends, data.table.shape[0], PIECE=_PIECE,
            ACCUMULATE=accumulate, ROUND_VIA_FLOAT=src.dtype == torch.float16,
            IS_BF16_BITS=src.dtype == torch.bfloat16, IS_BOOL=src.dtype == torch.bool, BLOCK=data.block,
            num_warps=data.num_warps)


register_backend(TritonBackend())
