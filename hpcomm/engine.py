"""Execution of one rank's plan: segment tables for a concrete tensor geometry, pack, unpack and
local copy through a kernel backend. The transport (who moves the buffers) is the caller's.

Geometry: a local tensor is viewed as ``[rows, outer, width]`` column units. Without column
splitting a column unit is the whole row (``outer`` = elements per row, ``width`` = 1); with it,
``outer`` is the product of the middle dims and ``width`` the local size of the last dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from hpcomm.plan import RankPlan, Segments
from hpcomm.segments import copy_segments

_I64 = np.int64


def _blocks(seg: Segments, outer: int, width: int, collapse: np.ndarray):
    """Element offset, line count, line length and line stride of each segment in a local tensor
    of geometry [rows, outer, width]. Collapsed segments (full width) are one line per row."""
    row_elems = outer * width
    offset = seg.row * row_elems + np.where(collapse, 0, seg.col)
    lines = np.where(collapse, seg.num_rows, seg.num_rows * outer)
    line_len = np.where(collapse, row_elems, seg.num_cols)
    stride = np.where(collapse, row_elems, width)
    return offset, lines, line_len, stride


def _table(src_off, dst_off, lines, line_len, src_stride, dst_stride) -> torch.Tensor:
    cols = np.stack([src_off, dst_off, lines, line_len, src_stride, dst_stride], 1).astype(_I64)
    return torch.from_numpy(cols.reshape(-1, 6))


def _dense(lines, line_len, start: int):
    """Offsets of blocks laid back to back in a buffer, from ``start``; returns (offsets, end)."""
    sizes = lines * line_len
    offs = start + np.cumsum(sizes) - sizes
    return offs, start + int(sizes.sum())


def _buffer_tables(messages, outer: int, width: int, tensor_is_src: bool):
    """One table per message between a local tensor and a flat buffer holding all messages back to
    back; returns ([(peer, offset, numel, table)], total numel)."""
    out, pos = [], 0
    for peer, seg in messages:
        collapse = seg.num_cols == width
        t_off, lines, line_len, t_stride = _blocks(seg, outer, width, collapse)
        b_off, end = _dense(lines, line_len, pos)
        table = (_table(t_off, b_off, lines, line_len, t_stride, line_len) if tensor_is_src else
                 _table(b_off, t_off, lines, line_len, line_len, t_stride))
        out.append((peer, pos, end - pos, table))
        pos = end
    return out, pos


@dataclass(frozen=True, eq=False)
class Exec:
    """A rank plan made concrete for one geometry: buffer sizes, per-peer buffer slices and
    segment tables (int64, CPU)."""

    plan: RankPlan
    outer: int
    send: tuple  # ((peer, offset, numel, pack table), ...)
    recv: tuple  # ((peer, offset, numel, unpack table), ...)
    send_numel: int
    recv_numel: int
    pack_table: torch.Tensor
    local_table: torch.Tensor
    steps: tuple  # ((table, from_recv_buffer), ...) in application order

    @property
    def send_splits(self):
        return [(p, o, n) for p, o, n, _ in self.send]

    @property
    def recv_splits(self):
        return [(p, o, n) for p, o, n, _ in self.recv]


@lru_cache(maxsize=1024)
def materialize(plan: RankPlan, outer: int, w_in: int, w_out: int) -> Exec:
    send, send_numel = _buffer_tables(plan.sends, outer, w_in, tensor_is_src=True)
    recv, recv_numel = _buffer_tables(plan.recvs, outer, w_out, tensor_is_src=False)
    src, dst = plan.local
    collapse = (src.num_cols == w_in) & (dst.num_cols == w_out)
    s_off, lines, line_len, s_stride = _blocks(src, outer, w_in, collapse)
    d_off, _, _, d_stride = _blocks(dst, outer, w_out, collapse)
    local_table = _table(s_off, d_off, lines, line_len, s_stride, d_stride)
    pack_table = torch.cat([t for *_, t in send] + [torch.zeros(0, 6, dtype=torch.int64)])
    if plan.accumulate:
        by_peer = {p: t for p, _, _, t in recv}
        steps = tuple((local_table, False) if r == plan.rank else (by_peer[r], True) for r in plan.order)
    else:
        merged = torch.cat([t for *_, t in recv] + [torch.zeros(0, 6, dtype=torch.int64)])
        steps = ((local_table, False), (merged, True))
    return Exec(plan, outer, tuple(send), tuple(recv), send_numel, recv_numel, pack_table,
                local_table, steps)


class DeviceTables:
    """Segment tables moved to the data's device once and reused (CUDA kernels read them there)."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return table
        key = (id(table), device)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not table:
            hit = (table, table.to(device, non_blocking=True))
            self._cache[key] = hit
        return hit[1]


_device_tables = DeviceTables()


def pack(exe: Exec, x_flat: torch.Tensor, backend: str, send_buf: torch.Tensor | None = None) -> torch.Tensor:
    """Gather every outgoing message of this rank into one flat send buffer."""
    if send_buf is None:
        send_buf = x_flat.new_empty(exe.send_numel)
    if exe.send_numel:
        copy_segments(x_flat, send_buf, _device_tables.get(exe.pack_table, x_flat.device), False, backend)
    return send_buf


def unpack(exe: Exec, x_flat: torch.Tensor, recv_buf: torch.Tensor, out_flat: torch.Tensor,
           backend: str) -> torch.Tensor:
    """Local copies and received messages into the destination, in the plan's order."""
    if exe.plan.zero_fill:
        out_flat.zero_()
    for table, from_recv in exe.steps:
        if len(table):
            copy_segments(recv_buf if from_recv else x_flat, out_flat,
                          _device_tables.get(table, out_flat.device), exe.plan.accumulate, backend)
    return out_flat
