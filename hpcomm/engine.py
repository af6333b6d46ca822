"""Execution of one rank's plan: segment tables for a concrete tensor geometry, pack, unpack and
local copy through a kernel backend. The transport (who moves the messages) is the caller's.

Geometry: a local tensor is viewed as ``[rows, outer, width]`` column units. Without column
splitting a column unit is the whole row (``outer`` = elements per row, ``width`` = 1); with it,
``outer`` is the product of the middle dims and ``width`` the local size of the last dim.

Zero-copy: a message that is one contiguous block of the source is sent as a view of it, and one
that lands as one contiguous block of the destination (when nothing accumulates) is received
straight into it; only the other messages go through the pooled pack / receive buffers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np
import torch

from hpcomm.layout import split_at
from hpcomm.plan import RankPlan, Segments
from hpcomm.segments import copy_segments

_I64 = np.int64
_NO_TABLE = np.zeros((0, 6), _I64)

RowMap = tuple[np.ndarray, np.ndarray]  # runs (starts, lengths), int64


def _blocks(seg: Segments, outer: int, width: int, collapse: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Element offset, line count, line length and line stride of each segment in a local tensor
    of geometry [rows, outer, width]. Collapsed segments (full width) are one line per row."""
    row_elems = outer * width
    offset = seg.row * row_elems + np.where(collapse, 0, seg.col)
    lines = np.where(collapse, seg.num_rows, seg.num_rows * outer)
    line_len = np.where(collapse, row_elems, seg.num_cols)
    stride = np.where(collapse, row_elems, width)
    return offset, lines, line_len, stride


def _remap(seg: Segments, row_map: RowMap) -> tuple[Segments, np.ndarray, np.ndarray]:
    """Send local rows through ``row_map`` (runs (starts, lengths) of the real rows, in local
    order): the mapped segments, and for each piece its segment index and first row within it."""
    starts, lengths = row_map
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(_I64)
    idx, ps, pe, bins = split_at(seg.row, seg.row + seg.num_rows, bounds)
    mapped = Segments(starts[bins] + (ps - bounds[bins]), pe - ps, seg.col[idx], seg.num_cols[idx])
    return mapped, idx, ps - seg.row[idx]


@dataclass(frozen=True, eq=False)
class Message:
    """One peer's message: its size, its segment table against the local tensor (buffer column
    relative to the message start), and, when zero-copy applies, its element offset in the tensor."""

    peer: int
    numel: int
    table: np.ndarray
    view_offset: int | None


def _message(seg: Segments, outer: int, width: int, tensor_is_src: bool, row_map: RowMap | None,
             direct_ok: bool) -> tuple[int, np.ndarray, int | None]:
    per_row = outer * seg.num_cols
    sizes = seg.num_rows * per_row
    buf_off = np.cumsum(sizes) - sizes
    numel = int(sizes.sum())
    if row_map is not None:
        seg, idx, shift = _remap(seg, row_map)
        buf_off = buf_off[idx] + shift * per_row[idx]
    collapse = seg.num_cols == width
    t_off, lines, line_len, t_stride = _blocks(seg, outer, width, collapse)
    if tensor_is_src:
        table = np.stack([t_off, buf_off, lines, line_len, t_stride, line_len], 1)
    else:
        table = np.stack([buf_off, t_off, lines, line_len, line_len, t_stride], 1)
    contiguous = len(table) == 1 and (lines[0] == 1 or t_stride[0] == line_len[0])
    return numel, table.astype(_I64).reshape(-1, 6), int(t_off[0]) if direct_ok and contiguous else None


@dataclass(frozen=True, eq=False)
class Exec:
    """A rank plan made concrete for one geometry (and optionally a destination row map)."""

    plan: RankPlan
    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]
    send_numel: int  # pack buffer: messages that are not views, back to back
    recv_numel: int  # receive buffer: messages not received in place
    pack_table: torch.Tensor
    steps: tuple[tuple[torch.Tensor, bool], ...]  # (table, reads the receive buffer), in order


def _rebase(messages: Iterable[Message], column: int
            ) -> tuple[dict[int, int], dict[int, np.ndarray], int]:
    """Offsets of buffered messages back to back, and their tables shifted there."""
    offsets, tables, pos = {}, {}, 0
    for m in messages:
        if m.view_offset is None:
            table = m.table.copy()
            table[:, column] += pos
            offsets[m.peer], tables[m.peer] = pos, table
            pos += m.numel
    return offsets, tables, pos


@lru_cache(maxsize=1024)
def materialize(plan: RankPlan, outer: int, w_in: int, w_out: int,
                row_map: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                zero_copy: bool = True) -> Exec:
    """row_map: runs (tuple of starts, tuple of lengths) of the output rows that the destination
    shard's local rows land on (``out_rows``), or None for an output of exactly the shard."""
    rmap = None if row_map is None else (np.asarray(row_map[0], _I64), np.asarray(row_map[1], _I64))
    sends = tuple(Message(p, *_message(s, outer, w_in, True, None, zero_copy))
                  for p, s in plan.sends)
    recvs = tuple(Message(p, *_message(s, outer, w_out, False, rmap, zero_copy and not plan.accumulate))
                  for p, s in plan.recvs)
    _, pack_tables, send_numel = _rebase(sends, 1)
    recv_offsets, unpack_tables, recv_numel = _rebase(recvs, 0)
    src, dst = plan.local
    if rmap is not None:
        dst, idx, shift = _remap(dst, rmap)
        src = Segments(src.row[idx] + shift, dst.num_rows, src.col[idx], src.num_cols[idx])
    collapse = (src.num_cols == w_in) & (dst.num_cols == w_out)
    s_off, lines, line_len, s_stride = _blocks(src, outer, w_in, collapse)
    d_off, _, _, d_stride = _blocks(dst, outer, w_out, collapse)
    local = np.stack([s_off, d_off, lines, line_len, s_stride, d_stride], 1).astype(_I64).reshape(-1, 6)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    if plan.accumulate:
        steps = tuple((as_tensor(local), False) if r == plan.rank else
                      (as_tensor(unpack_tables.get(r, _NO_TABLE)), True) for r in plan.order)
    else:
        merged = np.concatenate([unpack_tables[m.peer] for m in recvs if m.peer in unpack_tables]
                                + [_NO_TABLE])
        steps = ((as_tensor(local), False), (as_tensor(merged), True))
    pack_table = np.concatenate([pack_tables[m.peer] for m in sends if m.peer in pack_tables] + [_NO_TABLE])
    return Exec(plan, sends, recvs, send_numel, recv_numel, as_tensor(pack_table),
                tuple(s for s in steps if len(s[0])))


class DeviceTables:
    """Segment tables moved to the data's device once and reused (CUDA kernels read them there)."""

    def __init__(self, capacity: int = 4096) -> None:
        # bounded like materialize's cache: tables of plans no longer used drop out, oldest first
        self._cache: OrderedDict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._capacity = capacity

    def get(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return table
        key = (id(table), device)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not table:
            hit = (table, table.to(device, non_blocking=True))
            self._cache[key] = hit
            if len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return hit[1]


_device_tables = DeviceTables()


class BufferPool:
    """Reuses pack / receive buffers across calls: a buffer is handed out again only after the
    call that took it has given it back (an async call still in flight keeps its own)."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        bucket = self._free.get((numel, dtype, device))
        return bucket.pop() if bucket else torch.empty(numel, dtype=dtype, device=device)

    def give(self, buf: torch.Tensor) -> None:
        bucket = self._free.setdefault((buf.numel(), buf.dtype, buf.device), [])
        if len(bucket) < 2:
            bucket.append(buf)


def _apply(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor, accumulate: bool,
           backend: str) -> None:
    copy_segments(src, dst, _device_tables.get(table, dst.device), accumulate, backend)


def post_messages(exe: Exec, x_flat: torch.Tensor, out_flat: torch.Tensor, send_buf: torch.Tensor,
                  recv_buf: torch.Tensor, backend: str
                  ) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]]:
    """Pack what is not sent as a view, and return the (peer, tensor) lists to send and to receive
    into. A plan with ``zero_fill`` needs its destination rows zeroed before this (the caller
    knows which rows of its output those are)."""
    if len(exe.pack_table):
        _apply(x_flat, send_buf, exe.pack_table, False, backend)
    return _places(exe.sends, x_flat, send_buf), _places(exe.recvs, out_flat, recv_buf)


def _places(messages: Iterable[Message], tensor: torch.Tensor, buf: torch.Tensor
            ) -> list[tuple[int, torch.Tensor]]:
    """Where each message lives: a view of the tensor (zero-copy), or its slice of the buffer."""
    out, pos = [], 0
    for m in messages:
        if m.view_offset is not None:
            out.append((m.peer, tensor[m.view_offset:m.view_offset + m.numel]))
        else:
            out.append((m.peer, buf[pos:pos + m.numel]))
            pos += m.numel
    return out


def finish(exe: Exec, x_flat: torch.Tensor, recv_buf: torch.Tensor, out_flat: torch.Tensor,
           backend: str) -> None:
    """Local copies and buffered messages into the destination, in the plan's order."""
    for table, from_recv in exe.steps:
        _apply(recv_buf if from_recv else x_flat, out_flat, table, exe.plan.accumulate, backend)
