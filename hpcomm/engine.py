"""Execution: runs one direction of one call of a transform for one rank.

A ``Spec`` is everything fixed when a Transform is built (layouts, plans, options); an ``Engine``
holds one Spec and the little state its calls share (call numbers, buffers). ``Engine.start``
checks, packs and posts one call and returns a ``Call`` whose ``finish`` waits, unpacks and
returns the output; ``run`` is both. Every variant goes through them: ``t(x)``, ``out=`` /
``out_rows=``, ``async_op``, the identity shortcut, and simulation; the host (gloo) and device
(NCCL) paths differ only in their transport (hpcomm.comm), and the per-call protocol with the data
peers is hpcomm.protocol's.

Geometry: a local tensor is viewed as ``[rows, outer, width]`` column units. Without column
splitting a column unit is the whole row (``outer`` = elements per row, ``width`` = 1); with it,
``outer`` is the product of the middle dims and ``width`` the local size of the last dim.

Prepared executions (``Exec``: one rank plan made concrete for a geometry, an optional destination
row map and a device, with every kernel table prepared by its backend) are cached in one bounded
cache. Per call there is no table work and no host read of device memory: pack, post, wait, unpack.

Overlap: the headers go out first; the sends are packed and the local copies run while they fly.

Zero-copy: a message that is one contiguous block of the source is sent as a view of it, and one
that lands as one contiguous block of the destination (when nothing accumulates) is received
straight into it; only the other messages go through pooled pack / receive buffers.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hpcomm import comm, protocol, validate
from hpcomm.layout import Layout, runs_from_rows, split_at
from hpcomm.plan import Plan, RankPlan, Segments
from hpcomm.segments import Backend, Prepared, get_backend
from hpcomm.protocol import failure as fail

_I64 = np.int64
GRAD_MODES = ("replicated", "sum", "mean", "adjoint", None)

RowMap = tuple[tuple[int, ...], tuple[int, ...]]  # runs (starts, lengths) of output rows


# -- what a transform is, fixed at construction ---------------------------------------------------


@dataclass(frozen=True, eq=False)
class Spec:
    """A transform's layouts, plans and options; immutable."""

    src: Layout
    dst: Layout
    plan: Plan
    grad_plan: Plan | None  # None: the transpose of ``plan`` (adjoint), or no backward (grad None)
    grad: str | None
    group: dist.ProcessGroup | None
    backend: str
    wire_dtype: torch.dtype | None
    timeout: float | None
    zero_copy: bool
    validate: bool  # the full cross-rank check before every call (debugging)
    fingerprint: int  # equal across processes for equal layouts and options
    ranks: tuple[int, ...]  # every rank of src and dst, in first-appearance order
    name: str | None = None  # the user's name for it, in every error
    loopback: bool = False  # a rank's own rows go through the transport too (one-GPU self-check)

    # derived once from the plans (layouts compare by value, which a call need not redo)
    @cached_property
    def identity(self) -> bool:
        return self.src == self.dst

    @property
    def label(self) -> str:
        """How errors name the transform."""
        return protocol.transform_name(self.fingerprint)

    def trailing(self, x: torch.Tensor) -> tuple[int, ...]:
        """The trailing dims every rank must agree on (the split last dim excluded)."""
        return tuple(x.shape[1:-1] if self.plan.col_mode else x.shape[1:])

    def rank_plan(self, rank: int, backward: bool) -> RankPlan:
        if not backward:
            return self.plan.rank_plan(rank)
        if self.grad_plan is None:
            return _transposed(self.plan.rank_plan(rank))
        return self.grad_plan.rank_plan(rank)

    def geometry(self, rank: int, backward: bool, trailing: Sequence[int]
                 ) -> tuple[RankPlan, int, int, int, tuple[int, ...]]:
        """(rank plan, outer, input width, output width, output shape) for an input whose
        trailing dims are ``trailing``."""
        plan = self.rank_plan(rank, backward)
        trailing = tuple(trailing)
        if self.plan.col_mode:
            outer = math.prod(trailing[:-1])
            return plan, outer, plan.in_cols, plan.out_cols, (plan.out_rows, *trailing[:-1], plan.out_cols)
        return plan, math.prod(trailing), 1, 1, (plan.out_rows, *trailing)


def grad_plan(src: Layout, dst: Layout, grad: str | None) -> Plan | None:
    """The plan gradients take from ``dst`` back to ``src``. Every source holder of a row (a
    replica, or a holder of a partial sum) receives the row's full gradient; rows no destination
    read get zeros. "replicated" reads one destination holder per row (the local one when there is
    one), "sum" and "mean" add every holder's (mean scales first)."""
    if grad in ("adjoint", None):
        return None
    return Plan(dst.as_partial() if grad in ("sum", "mean") else dst, src.as_partial(False), fill_missing=True)


def fingerprint(src: Layout, dst: Layout, options: tuple[Any, ...]) -> int:
    return (src.fingerprint() * 31 + dst.fingerprint() * 7 + protocol.digest(repr(options))) & ((1 << 63) - 1)


# -- prepared executions ---------------------------------------------------------------------------


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


def _remap(seg: Segments, row_map: tuple[np.ndarray, np.ndarray]) -> tuple[Segments, np.ndarray, np.ndarray]:
    """Send local rows through ``row_map`` (runs (starts, lengths) of the real rows, in local
    order): the mapped segments, and for each piece its segment index and first row within it."""
    starts, lengths = row_map
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(_I64)
    idx, ps, pe, bins = split_at(seg.row, seg.row + seg.num_rows, bounds)
    mapped = Segments(starts[bins] + (ps - bounds[bins]), pe - ps, seg.col[idx], seg.num_cols[idx])
    return mapped, idx, ps - seg.row[idx]


@dataclass(frozen=True, eq=False)
class Message:
    """One peer's message: its size, and where it lives: ``offset`` in the tensor itself when it
    has no table (one block, sent from the input or received into the output), else in the pooled
    buffer, with its prepared pack/unpack table (buffer offsets relative to the message start)."""

    peer: int
    numel: int
    offset: int
    table: Prepared | None


def _table(seg: Segments, outer: int, width: int, tensor_is_src: bool,
           row_map: tuple[np.ndarray, np.ndarray] | None) -> tuple[int, np.ndarray]:
    """Size and segment table of one message against the local tensor."""
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
    return numel, table.astype(_I64).reshape(-1, 6)


@dataclass(frozen=True, eq=False)
class Exec:
    """A rank plan made concrete for one geometry, row map and device."""

    plan: RankPlan
    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]
    send_numel: int  # pack buffer: the messages that are not views of the input
    recv_numel: int  # receive buffer: the messages not received in place
    local: Prepared | None
    backend: Backend


def _messages(segments: Sequence[tuple[int, Segments]], outer: int, width: int, tensor_is_src: bool,
              row_map: tuple[np.ndarray, np.ndarray] | None, direct_ok: bool, backend: Backend,
              device: torch.device) -> tuple[tuple[Message, ...], int]:
    """Each peer's message and the buffer room the buffered ones take; ``direct_ok``: a message
    may live in the tensor itself."""
    out, pos = [], 0
    tensor_col = 0 if tensor_is_src else 1
    for peer, seg in segments:
        numel, table = _table(seg, outer, width, tensor_is_src, row_map)
        # one block of the tensor: every segment dense, each as far from the first in the tensor
        # as in the message (segments apart on the other side may be adjacent here)
        dense = (table[:, 2] == 1) | (table[:, 4 + tensor_col] == table[:, 3])
        shift = table[:, tensor_col] - table[:, 1 - tensor_col]
        if direct_ok and dense.all() and (shift == shift[0]).all():
            out.append(Message(peer, numel, int(shift[0]), None))
            continue
        out.append(Message(peer, numel, pos, backend.prepare(torch.from_numpy(table), device)))
        pos += numel
    return tuple(out), pos


def _prepare(plan: RankPlan, outer: int, w_in: int, w_out: int, row_map: RowMap | None,
             zero_copy: bool, loopback: bool, backend: Backend, device: torch.device) -> Exec:
    """``loopback``: the rank's own rows travel as a message to itself instead of a local copy."""
    rmap = None if row_map is None else (np.asarray(row_map[0], _I64), np.asarray(row_map[1], _I64))
    src, dst = plan.local
    to_self = loopback and len(src.row) > 0
    own = [(plan.rank, src)] if to_self else []
    sends, send_numel = _messages([*plan.sends, *own], outer, w_in, True, None, zero_copy, backend, device)
    recvs, recv_numel = _messages([*plan.recvs, *([(plan.rank, dst)] if to_self else [])], outer, w_out, False,
                                  rmap, zero_copy and not plan.accumulate, backend, device)
    if to_self:
        return Exec(plan, sends, recvs, send_numel, recv_numel, None, backend)
    if rmap is not None:
        dst, idx, shift = _remap(dst, rmap)
        src = Segments(src.row[idx] + shift, dst.num_rows, src.col[idx], src.num_cols[idx])
    collapse = (src.num_cols == w_in) & (dst.num_cols == w_out)
    s_off, lines, line_len, s_stride = _blocks(src, outer, w_in, collapse)
    d_off, _, _, d_stride = _blocks(dst, outer, w_out, collapse)
    local = np.stack([s_off, d_off, lines, line_len, s_stride, d_stride], 1).astype(_I64).reshape(-1, 6)
    prepared = backend.prepare(torch.from_numpy(local), device) if len(local) else None
    return Exec(plan, sends, recvs, send_numel, recv_numel, prepared, backend)


class _Bounded:
    """A bounded LRU cache: the one place prepared executions live (oldest dropped first)."""

    def __init__(self, capacity: int) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self.capacity = capacity

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        hit = self._items.get(key)
        if hit is None:
            hit = self._items[key] = make()
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return hit

    def __len__(self) -> int:
        return len(self._items)


EXECS = _Bounded(1024)


@lru_cache(maxsize=1024)
def _transposed(plan: RankPlan) -> RankPlan:
    return plan.transpose()


def _mean_scale(spec: Spec, rank: int, grad: torch.Tensor) -> torch.Tensor:
    """1 / (number of destination ranks holding each element), broadcastable against ``grad``."""
    def make() -> torch.Tensor:
        counts = spec.plan.holder_counts(rank)
        scale = torch.from_numpy(1.0 / np.maximum(counts, 1)).to(grad.dtype).to(grad.device)
        if spec.plan.col_mode:
            return scale.view(scale.shape[0], *([1] * (grad.dim() - 2)), scale.shape[1])
        return scale.view(-1, *([1] * (grad.dim() - 1)))
    return EXECS.get(("mean", spec, rank, grad.dtype, grad.device, grad.dim()), make)


# -- running a call -------------------------------------------------------------------------------


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


def _place(m: Message, tensor: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """Where a message lives: in the tensor (no table), or at its place in the buffer."""
    if m.table is None:
        return tensor[m.offset:m.offset + m.numel]
    return buf[m.offset:m.offset + m.numel]  # type: ignore[index]


@dataclass(frozen=True, eq=False)
class OutRows:
    """``out_rows`` made ready once per caller's object: the runs of the rows (on the host: the
    prepared execution depends on them) and the rows as an index on the output's device."""

    runs: RowMap
    index: torch.Tensor

    @staticmethod
    def of(rows: np.ndarray, device: torch.device) -> OutRows:
        starts, lengths = runs_from_rows(rows.astype(np.int64))
        return OutRows((tuple(starts.tolist()), tuple(lengths.tolist())),
                       torch.from_numpy(rows.astype(np.int64)).to(device))


class Call:
    """One direction of one call in flight on one rank; ``finish`` completes it."""

    def __init__(self, engine: Engine, exe: Exec | None, x_flat: torch.Tensor, out: torch.Tensor,
                 send_buf: torch.Tensor | None = None, recv_buf: torch.Tensor | None = None,
                 exchange: protocol.Exchange | None = None) -> None:
        self.engine, self.exe, self.x_flat, self.out = engine, exe, x_flat, out
        self.send_buf, self.recv_buf, self.exchange = send_buf, recv_buf, exchange
        self.sends: list[comm.Pending] = []
        self.recvs: dict[int, comm.Pending] = {}

    def post(self, rows: OutRows | None, transport: comm.P2P | comm.Simulated, rank: int, what: str) -> None:
        """Pack, copy locally and post (packing overlaps the headers in flight); raises if a pair
        of this rank disagrees, after posting the payloads of the pairs that agree."""
        exe, x_flat, exchange = self.exe, self.x_flat, self.exchange
        assert exe is not None
        data = self.out.detach()
        if exe.plan.zero_fill:  # only the destination rows: the rest of a caller's out is theirs
            data.zero_() if rows is None else data.index_fill_(0, rows.index, 0)
        out_flat = data.view(-1)
        for m in exe.sends:
            if m.table is not None:
                exe.backend.apply(m.table, x_flat, _place(m, x_flat, self.send_buf), False)
        if not exe.plan.accumulate and exe.local is not None:
            exe.backend.apply(exe.local, x_flat, out_flat, False)
        sends = [(m.peer, _place(m, x_flat, self.send_buf)) for m in exe.sends]
        recvs = [(m.peer, _place(m, out_flat, self.recv_buf)) for m in exe.recvs]
        if exchange is None:  # a simulated world, or nothing to exchange
            if isinstance(transport, comm.Simulated):
                transport.rank = rank
            self.sends, got = transport.post(sends, recvs, what, transport.deadline())
            self.recvs = {p: g for (p, _), g in zip(recvs, got)}
            return
        self.sends, self.recvs = exchange.post(sends, recvs)
        problems = exchange.problems()
        if problems:
            raise exchange.error(problems)

    def finish(self) -> torch.Tensor:
        exe = self.exe
        if exe is None:  # the output is the input (identity)
            return self.out
        out_flat = self.out.detach().view(-1)
        done = False
        try:
            if exe.plan.accumulate:  # contributions added in the plan's order, each as it arrives
                by_peer = {m.peer: m for m in exe.recvs}
                for r in exe.plan.order:
                    if r in by_peer:
                        self._deliver(by_peer[r], out_flat, True)
                    elif r == exe.plan.rank and exe.local is not None:
                        exe.backend.apply(exe.local, self.x_flat, out_flat, True)
            else:
                for m in exe.recvs:
                    self._deliver(m, out_flat, False)
            for pending in self.sends:
                pending.wait()
            if self.exchange is not None:
                self.exchange.sent()
            done = True
        finally:
            self.release(done)
        return self.out

    def _deliver(self, m: Message, out_flat: torch.Tensor, accumulate: bool) -> None:
        """Wait for one message and unpack it (one received in place is already there)."""
        self.recvs[m.peer].wait()
        if m.table is not None:
            backend = self.exe.backend  # type: ignore[union-attr]
            backend.apply(m.table, _place(m, out_flat, self.recv_buf), out_flat, accumulate)

    def release(self, done: bool) -> None:
        """Give the buffers back. After a failure, keep them and everything posted for good
        instead: a message still posted may yet move (a peer that agreed sends its payload, a late
        peer its header), and neither gloo nor NCCL may see a posted buffer freed. Waiting for
        them would hold this rank's error back, by up to a timeout."""
        if not done:
            comm.keep(self.send_buf, self.recv_buf, self.sends, self.recvs, self.exchange)
            return
        for buf in (self.send_buf, self.recv_buf):
            if buf is not None:
                self.engine.pool.give(buf)


class Engine:
    """Runs a Spec's calls for this process (or, through ``simulated``, for a whole world)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.pool = BufferPool()
        self.calls = [0, 0]  # calls made so far per direction: part of every header
        self._transports: dict[bool, comm.P2P] = {}
        self._mean: Engine | None = None  # validation's reference route under "replicated"

    def transport(self, device: torch.device) -> comm.P2P:
        """The device path (grouped payloads) for CUDA tensors, or for CPU ones under
        HPCOMM_EMULATE_NCCL=1; the host path otherwise."""
        grouped = device.type == "cuda" or comm.emulating_nccl()
        if grouped not in self._transports:
            self._transports[grouped] = comm.P2P(self.spec.group, self.spec.timeout, grouped)
        return self._transports[grouped]

    # geometry and checks ---------------------------------------------------------------------

    def output_shape(self, x: torch.Tensor, rank: int, backward: bool) -> tuple[int, ...]:
        return self.spec.geometry(rank, backward, x.shape[1:])[4]

    def local_error(self, x: Any, rank: int, backward: bool) -> Exception | None:
        """The input checks a rank can make alone (rows, dims, device); None if it passes."""
        what = "gradient" if backward else "input"
        this = f"rank {rank}: {self.spec.label}"
        if not isinstance(x, torch.Tensor):
            return fail(TypeError(f"{this}: {what} must be a torch.Tensor, got {type(x).__name__}"), 5)
        if x.dim() == 0:
            return fail(ValueError(f"{this}: {what} is a zero-dim tensor; it needs a row dim"), 5)
        if x.device.type == "meta":
            return fail(ValueError(f"{this}: {what} is a meta tensor (no data to move); pass a CPU or "
                                   f"CUDA tensor"), 2)
        plan = self.spec.rank_plan(rank, backward)
        if x.shape[0] != plan.in_rows:
            return fail(ValueError(f"{this}: {what} has {x.shape[0]} rows, but the layout gives this "
                                   f"rank {plan.in_rows}"), 3)
        if self.spec.plan.col_mode:
            if x.dim() < 2:
                return fail(ValueError(f"{this}: {what} of shape {tuple(x.shape)} has no column dim, "
                                       f"but the layouts split columns"), 4)
            if x.shape[-1] != plan.in_cols:
                return fail(ValueError(f"{this}: {what} has last dim {x.shape[-1]}, but the layout gives "
                                       f"this rank {plan.in_cols} columns"), 4)
        wire = self.spec.wire_dtype
        if wire is not None and (x.dtype.is_floating_point != wire.is_floating_point or x.is_complex()):
            return TypeError(f"{this}: wire_dtype {wire} does not fit a {x.dtype} {what}")
        return None

    def check_world(self, rank: int) -> None:
        """Ranks the layouts name must exist: otherwise messages go to no one and hang."""
        size = dist.get_world_size(self.spec.group)
        outside = [r for r in self.spec.ranks if r >= size]
        if outside:
            raise ValueError(f"rank {rank}: {self.spec.label}: the layouts name ranks {outside}, but the "
                             f"process group has only {size} ranks (0..{size - 1})")

    # running ---------------------------------------------------------------------------------

    def run(self, x: torch.Tensor, rank: int, backward: bool, out: torch.Tensor | None = None,
            rows: OutRows | None = None) -> torch.Tensor:
        return self.start(x, rank, backward, out, rows).finish()

    def backward(self, grad: torch.Tensor, rank: int) -> torch.Tensor:
        """The gradient's call; with validation under "replicated", also checks that destination
        replicas hold equal gradients (the convention's premise) against the "mean" route."""
        result = self.run(grad, rank, True)
        spec = self.spec
        if spec.validate and spec.grad == "replicated":
            if self._mean is None:
                mean_plan = grad_plan(spec.src, spec.dst, "mean")
                self._mean = Engine(replace(spec, grad="mean", grad_plan=mean_plan, validate=False,
                                            fingerprint=spec.fingerprint ^ 1))
            mean = self._mean.run(grad, rank, True)
            tol = 1e-5 if grad.dtype == torch.float64 else 1e-2 if grad.element_size() < 4 else 1e-4
            differ = not torch.allclose(result, mean, rtol=tol, atol=tol)
            validate.agree(spec.fingerprint, spec.ranks, rank, grad, spec.trailing(grad), True, None,
                           self.transport(grad.device), extra=int(differ))
        return result

    def start(self, x: torch.Tensor, rank: int, backward: bool, out: torch.Tensor | None = None,
              rows: OutRows | None = None, simulated: comm.Simulated | None = None,
              error: Exception | None = None) -> Call:
        """Check, pack and post one call. ``error``: this rank's input check already failed; it
        still tells its data peers (so they raise at once, naming it), then raises."""
        spec = self.spec
        what = f"{spec.label} {'backward' if backward else 'forward'}"
        error = error or self.local_error(x, rank, backward)
        seq = self.calls[backward]
        self.calls[backward] += 1
        p2p = None if simulated else self.transport(x.device if error is None else torch.device("cpu"))
        if p2p is not None:  # here, not in Transform: compiled calls reach the engine directly
            self.check_world(rank)
            if spec.validate:
                trailing = spec.trailing(x) if error is None else ()
                validate.agree(spec.fingerprint, spec.ranks, rank, x, trailing, backward, error, p2p)
        if error is not None:
            if p2p is not None:
                self._refuse(rank, backward, seq, error, p2p, what)
            raise error
        if backward and spec.grad == "mean":
            x = x * _mean_scale(spec, rank, x)
        x_flat = x.detach().contiguous().view(-1)
        if out is None and spec.identity and not backward and not spec.loopback:
            return Call(self, None, x_flat, x)
        exe, wire, out_shape = self._exec(x, rank, backward, rows)
        exchange = None
        if p2p is not None and (exe.sends or exe.recvs):  # the headers fly while this rank packs
            exchange = protocol.Exchange(
                p2p, rank, protocol.call_fields(spec.fingerprint, backward, seq, x, spec.trailing(x)),
                {m.peer: m.numel for m in exe.sends}, {m.peer: m.numel for m in exe.recvs}, what,
                p2p.deadline())
        call = Call(self, exe, x_flat, x_flat.new_empty(out_shape) if out is None else out,
                    self.pool.take(exe.send_numel, wire, x.device) if exe.send_numel else None,
                    self.pool.take(exe.recv_numel, wire, x.device) if exe.recv_numel else None, exchange)
        try:
            call.post(rows, simulated or p2p, rank, what)  # type: ignore[arg-type]  # (one is set)
        except BaseException:
            call.release(False)
            raise
        return call

    def _exec(self, x: torch.Tensor, rank: int, backward: bool, rows: OutRows | None
              ) -> tuple[Exec, torch.dtype, tuple[int, ...]]:
        """The call's prepared execution (from the cache), its wire dtype and its output shape."""
        spec = self.spec
        plan, outer, w_in, w_out, out_shape = spec.geometry(rank, backward, x.shape[1:])
        wire = spec.wire_dtype or x.dtype
        backend = get_backend(spec.backend if wire == x.dtype else "torch", x.device)
        zero_copy = spec.zero_copy and wire == x.dtype
        row_map = None if rows is None else rows.runs
        key = (plan, outer, w_in, w_out, row_map, zero_copy, spec.loopback, backend.name, x.device)
        return EXECS.get(key, lambda: _prepare(plan, outer, w_in, w_out, row_map, zero_copy, spec.loopback,
                                                backend, x.device)), wire, out_shape

    def _refuse(self, rank: int, backward: bool, seq: int, error: Exception, transport: comm.P2P,
                what: str) -> None:
        """Tell every data peer that this rank's own check failed (they raise, naming it)."""
        plan = self.spec.rank_plan(rank, backward)
        sends = {p: -1 for p, _ in plan.sends}
        expects = {p: -1 for p, _ in plan.recvs}
        if sends or expects:
            fields = protocol.call_fields(self.spec.fingerprint, backward, seq, None, ())
            told = protocol.Exchange(transport, rank, fields, sends, expects, what, transport.deadline(),
                                     failed=getattr(error, "hpcomm_reason", 1))
            comm.keep(told)  # its headers are still in flight: see Call.release


# -- the registry the custom ops read -----------------------------------------------------------

_engines: "weakref.WeakValueDictionary[int, Engine]" = weakref.WeakValueDictionary()
_next_handle = itertools.count(1)


def register(engine: Engine) -> int:
    """An integer handle for an Engine, which the custom ops carry through a graph as data."""
    handle = next(_next_handle)
    _engines[handle] = engine
    return handle


def lookup(handle: int) -> Engine:
    try:
        return _engines[handle]
    except KeyError:
        raise RuntimeError(f"hpcomm transform handle {handle} is not alive (its Transform was freed)") from None


def simulate(engine: Engine, tensors: dict[int, torch.Tensor], backward: bool,
             out: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Every rank's call in this process: the same path, an in-process transport."""
    transport = comm.Simulated()
    calls = {r: engine.start(tensors[r], r, backward, None if out is None else out[r], simulated=transport)
             for r in engine.spec.ranks}
    transport.deliver()
    return {r: c.finish() for r, c in calls.items()}
