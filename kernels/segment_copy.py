"""Triton kernel family of the segment-table contract (hpcomm/segments.py); registers backend "triton".

Work items are (segment, line, PIECE-wide column piece), numbered across the table through the
prefix sums of the per-segment item counts (``chunk_ends``, as in csrc/include/segment_index.h); a
1-D grid of programs strides over them and finds each item's segment by binary search, so a table of
a million short rows and one of a single huge run both spread evenly. A segment whose lines abut in
both buffers counts as a single line, so contiguous runs are cut into pieces too.

On CPU tensors it runs under the Triton interpreter, which triton reads from TRITON_INTERPRET when
``@triton.jit`` is applied; the kernel is therefore built on first use, for whichever mode is on at
that time, rather than when this module is imported (the backend registry imports it early).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton import knobs

from hpcomm.segments import register_backend

# Copies move raw bits, so each element size maps to one integer type and float8, bool and
# anything else of that size share a kernel.
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Accumulate is defined where torch's add_ is (float8 has none); bool adds as a logical or.
_ACCUMULATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
                      torch.int16, torch.int32, torch.int64, torch.bool)
# Elements per work item along a line; BLOCK (autotuned) is the step within it.
_PIECE = 8192
_MAX_PROGRAMS = 8192
# The interpreter runs programs one by one in Python: a few still cover the striding.
_MAX_PROGRAMS_INTERPRETED = 4


def _segment_kernel(src, dst, table, chunk_ends, num_segments, line_bucket, PIECE: tl.constexpr,
                    ACCUMULATE: tl.constexpr, ROUND_VIA_FLOAT: tl.constexpr, IS_BF16_BITS: tl.constexpr,
                    IS_BOOL: tl.constexpr, BLOCK: tl.constexpr):
    # line_bucket only keys the autotuner (next power of two of the longest line).
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


def _autotune_configs() -> list[triton.Config]:
    if knobs.runtime.interpret:
        return [triton.Config({"BLOCK": 64})]
    return [triton.Config({"BLOCK": block}, num_warps=warps)
            for block, warps in ((256, 2), (1024, 4), (4096, 8))]


@functools.cache
def _kernel(interpret: bool):
    del interpret  # the cache key: the mode triton.jit saw
    return triton.autotune(configs=_autotune_configs(), key=["line_bucket", "ACCUMULATE"])(
        triton.jit(_segment_kernel))


def _check_table(t: torch.Tensor, src_numel: int, dst_numel: int) -> None:
    negative = (t < 0).any(dim=1)
    if negative.any():
        i = int(negative.nonzero()[0])
        raise ValueError(f"segment {i} has a negative entry: {tuple(t[i].tolist())}")
    live = (t[:, 2] > 0) & (t[:, 3] > 0)
    for buf, offset_col, stride_col, numel in (("src", 0, 4, src_numel), ("dst", 1, 5, dst_numel)):
        end = t[:, offset_col] + (t[:, 2] - 1) * t[:, stride_col] + t[:, 3]
        outside = live & (end > numel)
        if outside.any():
            i = int(outside.nonzero()[0])
            raise IndexError(f"segment {i} goes past the end of {buf} ({numel} elements)")


def copy_segments_triton(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor,
                         accumulate: bool = False) -> None:
    """Apply a segment table in place. src [src_numel], dst [dst_numel]: flat contiguous, one dtype,
    one device; table: int64 [num_segments, 6] on any device (read on the host to size the grid)."""
    if src.dim() != 1 or dst.dim() != 1 or not src.is_contiguous() or not dst.is_contiguous():
        raise ValueError(f"src and dst must be flat contiguous 1-D tensors, got {tuple(src.shape)} and "
                         f"{tuple(dst.shape)}")
    if src.dtype != dst.dtype:
        raise TypeError(f"src and dst must share a dtype, got {src.dtype} and {dst.dtype}")
    if src.device != dst.device:
        raise ValueError(f"src and dst must be on one device, got {src.device} and {dst.device}")
    if table.dtype != torch.int64:
        raise TypeError(f"table must be int64, got {table.dtype}")
    if table.dim() != 2 or table.shape[1] != 6:
        raise ValueError(f"table must be [num_segments, 6], got {tuple(table.shape)}")
    if accumulate and src.dtype not in _ACCUMULATE_DTYPES:
        raise TypeError(f"accumulate is not defined for {src.dtype} (torch has no add for it); copy is")
    if not accumulate and src.element_size() not in _BITS_DTYPE:
        raise TypeError(f"the triton backend does not copy {src.dtype}")
    if src.device.type == "cpu" and not knobs.runtime.interpret:
        raise RuntimeError("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    num_segments = table.shape[0]
    if num_segments == 0:
        return
    t = table.cpu().contiguous()
    _check_table(t, src.numel(), dst.numel())
    lines, line_len = t[:, 2], t[:, 3]
    contiguous = (lines == 1) | ((t[:, 4] == line_len) & (t[:, 5] == line_len))
    line_len = torch.where(contiguous, line_len * lines, line_len)
    lines = torch.where(contiguous, 1, lines)
    chunk_ends = torch.cumsum(lines * ((line_len + _PIECE - 1) // _PIECE), 0)
    total = int(chunk_ends[-1])
    if total == 0:
        return
    max_programs = _MAX_PROGRAMS_INTERPRETED if knobs.runtime.interpret else _MAX_PROGRAMS
    if accumulate:
        # bool adds as bytes, bfloat16 as bits (see the kernel).
        bits = {torch.bool: torch.uint8, torch.bfloat16: torch.int16}.get(src.dtype, src.dtype)
    else:
        bits = _BITS_DTYPE[src.element_size()]
    _kernel(knobs.runtime.interpret)[(min(total, max_programs),)](
        src.view(bits), dst.view(bits), t.to(src.device), chunk_ends.to(src.device), num_segments,
        triton.next_power_of_2(max(1, int(line_len.max()))), PIECE=_PIECE, ACCUMULATE=accumulate,
        ROUND_VIA_FLOAT=src.dtype == torch.float16, IS_BF16_BITS=src.dtype == torch.bfloat16,
        IS_BOOL=src.dtype == torch.bool)


register_backend("triton", copy_segments_triton)
