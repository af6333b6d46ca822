"""Execution: runs one direction of one call of a transform for one rank.

A ``Spec`` is everything fixed when a Transform is built (layouts, plans, options); an ``Engine``
holds one Spec and the little state its calls share (call numbers, buffers). ``Engine.start``
packs and posts one call and returns a ``Call`` whose ``finish`` waits, unpacks and returns the
output; ``run`` is both. Every variant goes through them: ``t(x)``, ``out=``/``out_rows=``,
``async_op``, the identity shortcut, and simulation (which differs only in its transport).

Geometry: a local tensor is viewed as ``[rows, outer, width]`` column units. Without column
splitting a column unit is the whole row (``outer`` = elements per row, ``width`` = 1); with it,
``outer`` is the product of the middle dims and ``width`` the local size of the last dim.

Prepared executions (``Exec``: one rank plan made concrete for a geometry, an optional destination
row map and a device, with every kernel table prepared by its backend) are cached in one bounded
cache. Per call there is no table work: pack, post, wait, unpack.

Overlap: each message is packed and sent in turn (while one is on the wire the next is packed; a
payload that fits rides in its header's message, see validate.py); local copies run while messages
are in flight; each arriving message is unpacked as soon as its sender's header agrees. On GPU,
NCCL needs a rank's sends and receives in one group, so there the headers are checked first and
the payloads posted together.

Zero-copy: a message that is one contiguous block of the source is sent as a view of it, and one
that lands as one contiguous block of the destination (when nothing accumulates) is received
straight into it; on host transports a big message travels in pieces, each one run of both
tensors (``Message.parts``); only the other messages go through pooled pack / receive buffers.
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

from hpcomm import comm, validate
from hpcomm.layout import Layout, runs_from_rows, split_at
from hpcomm.plan import Plan, RankPlan, Segments
from hpcomm.segments import Backend, Prepared, get_backend
from hpcomm.validate import failure as fail

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

    # derived once from the plans (layouts compare by value, which a call need not redo)
    @cached_property
    def identity(self) -> bool:
        return self.src == self.dst

    @cached_property
    def crosses(self) -> tuple[bool, bool]:
        """(forward, backward): does anything leave any rank? The adjoint's messages are the
        forward's reversed; grad None has no backward."""
        forward = self.plan.crosses_wire()
        if self.grad is None:
            return forward, False
        return forward, (self.grad_plan or self.plan).crosses_wire()

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
    return (src.fingerprint() * 31 + dst.fingerprint() * 7 + validate.digest(repr(options))) & ((1 << 63) - 1)


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
    """One peer's message: its size; for a buffered one, its place in the pooled buffer and its
    prepared pack/unpack table (buffer offsets relative to the message start); and ``parts``,
    (offset, numel) of each piece it travels as on its own: pieces of the tensor itself when it
    has no table (sent from the input, received into the output), else of its buffer place.
    No parts: it is one message, packed (or unpacked) at ``buf_offset``."""

    peer: int
    numel: int
    parts: tuple[tuple[int, int], ...]
    buf_offset: int
    table: Prepared | None

    def own(self, itemsize: int) -> bool:
        """Whether it travels on its own by choice (its receiver then asks no room for it):
        in pieces, or one big block of the tensor, which copying into or out of a header's
        message would cost more than a message of its own."""
        return len(self.parts) > 1 or (self.table is None and self.numel * itemsize >= comm.IN_PLACE_MIN)


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
    send_numel: int  # pack buffer: messages that are not views, each after a header's room
    recv_numel: int  # receive buffer: messages not received in place
    local: Prepared | None
    backend: Backend


def _messages(segments: Sequence[tuple[int, Segments]], outer: int, width: int, tensor_is_src: bool,
              row_map: tuple[np.ndarray, np.ndarray] | None, direct_ok: bool, piece_min: int,
              theirs: Callable[[int], Segments], backend: Backend, device: torch.device, gap: int = 0
              ) -> tuple[tuple[Message, ...], int]:
    """``direct_ok``: a message may live in the tensor itself; ``piece_min``: a message whose
    pieces average this many elements travels in pieces (0: never); ``theirs(peer)``: the peer's
    segments of the message; ``gap``: elements left free before each buffered message (room for
    its header)."""
    out, pos = [], gap
    tensor_col = 0 if tensor_is_src else 1
    for peer, seg in segments:
        numel, table = _table(seg, outer, width, tensor_is_src, row_map)
        dense = (table[:, 2] == 1) | (table[:, 4 + tensor_col] == table[:, 3])
        # Pieces: cut wherever either side's segments (runs of its tensor, in message order) end,
        # so both sides cut alike and every piece is one run on both
        units = seg.num_rows * seg.num_cols
        cuts = np.zeros(1, _I64)  # where the pieces start, in elements of the message
        if piece_min and numel >= 2 * piece_min:
            other = theirs(peer)
            ends = np.concatenate([np.cumsum(units)[:-1], np.cumsum(other.num_rows * other.num_cols)[:-1]])
            cuts = np.unique(np.concatenate([[0], ends])).astype(_I64) * outer
        if 1 < len(cuts) <= comm.MAX_PIECES and numel >= piece_min * len(cuts):
            sizes = np.diff(np.append(cuts, numel))
            if direct_ok and row_map is None and dense.all():  # each piece straight from / into the tensor
                starts = (np.cumsum(units) - units) * outer
                mine = np.searchsorted(starts, cuts, "right") - 1  # the segment each piece is in
                offsets = table[mine, tensor_col] + (cuts - starts[mine])
                out.append(Message(peer, numel, tuple(zip(offsets.tolist(), sizes.tolist())), 0, None))
                continue
            parts = tuple(zip(cuts.tolist(), sizes.tolist()))
        else:
            # one block of the tensor: every segment dense, each as far from the first in the
            # tensor as in the message (segments apart on the other side may be adjacent here)
            shift = table[:, tensor_col] - table[:, 1 - tensor_col]
            if direct_ok and dense.all() and (shift == shift[0]).all():
                out.append(Message(peer, numel, ((int(shift[0]), numel),), 0, None))
                continue
            parts = ()
        out.append(Message(peer, numel, parts, pos, backend.prepare(torch.from_numpy(table), device)))
        pos += numel + gap
    return tuple(out), pos if pos > gap else 0


def _prepare(plan: RankPlan, outer: int, w_in: int, w_out: int, row_map: RowMap | None,
             zero_copy: bool, peers: Callable[[int], RankPlan] | None, backend: Backend,
             device: torch.device, itemsize: int) -> Exec:
    """``itemsize``: of the wire dtype; each buffered send has a header's room before it, so it can
    go out in its header's message without a copy. ``peers``: the other ranks' plans, when big
    messages may travel in pieces (host transports: see comm.IN_PLACE_MIN)."""
    rmap = None if row_map is None else (np.asarray(row_map[0], _I64), np.asarray(row_map[1], _I64))
    piece_min = max(1, comm.IN_PLACE_MIN // itemsize) if peers else 0
    sends, send_numel = _messages(plan.sends, outer, w_in, True, None, zero_copy, piece_min,
                                  lambda p: dict(peers(p).recvs)[plan.rank], backend, device,  # type: ignore[misc]
                                  comm.HEADER_BYTES // itemsize)
    recvs, recv_numel = _messages(plan.recvs, outer, w_out, False, rmap, zero_copy and not plan.accumulate,
                                  piece_min, lambda p: dict(peers(p).sends)[plan.rank], backend, device)  # type: ignore[misc]
    src, dst = plan.local
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


def _place(m: Message, tensor: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """A one-piece message's place (in the tensor, or the buffer); a buffered message's place."""
    if m.table is None:
        return tensor[m.parts[0][0]:m.parts[0][0] + m.numel]
    return buf[m.buf_offset:m.buf_offset + m.numel]


def _pieces(m: Message, tensor: torch.Tensor, buf: torch.Tensor | None) -> list[torch.Tensor]:
    """What travels: the message's pieces, or the message whole."""
    if len(m.parts) < 2:
        return [_place(m, tensor, buf)]  # type: ignore[arg-type]
    base = tensor if m.table is None else buf[m.buf_offset:m.buf_offset + m.numel]  # type: ignore[index]
    return [base[o:o + n] for o, n in m.parts]


class Call:
    """One direction of one call in flight on one rank; ``finish`` completes it."""

    def __init__(self, engine: Engine, exe: Exec | None, x_flat: torch.Tensor, out: torch.Tensor,
                 send_buf: torch.Tensor | None, recv_buf: torch.Tensor | None, what: str,
                 transport: Any = None, tags: dict[int, int] | None = None, deadline: Any = None) -> None:
        self.engine, self.exe, self.x_flat, self.out = engine, exe, x_flat, out
        self.send_buf, self.recv_buf, self.what = send_buf, recv_buf, what
        self.transport, self.tags, self.deadline = transport, tags or {}, deadline  # for late receives
        self.round: validate.Round | None = None  # the headers, when the call crosses the wire
        self.checked = True  # every header checked (or none to check)
        self.sends: list[comm.Pending] = []
        self.recvs: dict[int, list[comm.Pending]] = {}  # (the rest arrive in their headers' messages)
        self.inline: list[torch.Tensor] = []  # header messages carrying a payload (pooled)
        self.sent_inline: set[int] = set()  # peers this rank's payload rode to in its header
        self.later: set[int] = set()  # peers whose payload may ride in their header: see finish

    def finish(self) -> torch.Tensor:
        exe = self.exe
        if exe is None:  # the output is the input (identity) or has no rows
            return self.out
        out_flat = self.out.detach().view(-1)
        done = False
        try:
            if exe.plan.accumulate:  # contributions added in the plan's order, each as it arrives
                by_peer = {m.peer: m for m in exe.recvs}
                for r in exe.plan.order:
                    if r == exe.plan.rank:
                        self._apply(exe.local, self.x_flat, out_flat, True)
                    elif r in by_peer:
                        self._deliver(by_peer[r], out_flat, True)
            else:
                for m in exe.recvs:
                    self._deliver(m, out_flat, False)
            if not self.checked:  # every header is here: the same verdict on every rank
                self.check()
            for s in self.sends:
                s.wait()
            if self.round is not None:
                self.round.release()
            done = True
        finally:
            self.release(done)
        return self.out

    def _deliver(self, m: Message, out_flat: torch.Tensor, accumulate: bool) -> None:
        """Wait for one message and unpack it (a payload that rode in its header's message is
        unpacked from there)."""
        round = self.round
        if not self.checked:  # each payload only once its sender's header agrees
            if not round.agrees(m.peer):  # type: ignore[union-attr]
                self.check()  # raises, as every rank does
            if m.peer in self.later and not round.carried(m.peer):  # type: ignore[union-attr]
                # it could have ridden in its header but did not (its sender knew no receive's
                # room, or chose to send it on its own)
                self.post(m, _pieces(m, out_flat, self.recv_buf), receive=True)
        if m.peer in self.recvs:
            for pending in self.recvs[m.peer]:
                pending.wait()
            src = out_flat if m.table is None else _place(m, out_flat, self.recv_buf)  # type: ignore[arg-type]
        else:
            src = self.round.inline(m.peer, out_flat.dtype if self.recv_buf is None else self.recv_buf.dtype,  # type: ignore[union-attr]
                                    m.numel)
            if m.table is None:  # lands as one block
                _place(m, out_flat, self.recv_buf).copy_(src)  # type: ignore[arg-type]
        self._apply(m.table, src, out_flat, accumulate)

    def check(self) -> None:
        """Raise, on every rank alike, if any rank's header differs (the headers all arrived while
        this rank packed and sent)."""
        exe, round = self.exe, self.round
        assert exe is not None and round is not None
        problems = round.problems([m.peer for m in exe.sends] + [m.peer for m in exe.recvs])
        if problems:
            raise ValueError(f"rank {exe.plan.rank}: {self.what} refused: " + "; ".join(problems))
        self.checked = True

    def release(self, done: bool) -> None:
        """Give the buffers back. After a failure, first let the payloads both sides agreed on
        finish moving (so no buffer is reused under them); a receive no peer will fill, or one
        that failed, keeps its buffer for good (a late sender would write into it; gloo must
        never see a posted receive dropped)."""
        keep = False
        if not done:
            if self.round is not None:
                keep |= not self.round.settle()
            for pending in self.sends:
                keep |= not _settle(pending)
            for peer, pendings in self.recvs.items():
                agreed = self.round is None or self.round.verdict(peer)
                keep |= not (agreed and all([_settle(p) for p in pendings]))
        if keep:
            comm.keep(self.send_buf, self.recv_buf, self.inline, self.sends, self.recvs, self.round)
            return
        for buf in (self.send_buf, self.recv_buf, *self.inline):
            if buf is not None:
                self.engine.pool.give(buf)

    def post(self, m: Message, pieces: list[torch.Tensor], receive: bool) -> None:
        """Post one message: each piece under a tag of its own (comm.piece_tag)."""
        for i, piece in enumerate(pieces):
            one = [(m.peer, piece)]
            sent, got = self.transport.post([] if receive else one, one if receive else [],
                                            comm.piece_tag(self.tags[m.peer], i), self.what, self.deadline)
            self.sends += sent
            if receive:
                self.recvs.setdefault(m.peer, []).extend(got)

    def _apply(self, table: Prepared | None, src: torch.Tensor | None, dst: torch.Tensor,
               accumulate: bool) -> None:
        if table is not None and src is not None:
            self.exe.backend.apply(table, src, dst, accumulate)  # type: ignore[union-attr]


def _settle(pending: comm.Pending) -> bool:
    try:
        pending.wait()
        return True
    except comm.TransformError:
        return False


class Engine:
    """Runs a Spec's calls for this process (or, through ``simulated``, for a whole world)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.pool = BufferPool()
        self.calls = [0, 0]  # calls made so far per direction: part of every header
        self.transport = comm.P2P(spec.group, spec.timeout)
        self._mean: Engine | None = None  # validation's reference route under "replicated"

    # geometry and checks ---------------------------------------------------------------------

    def output_shape(self, x: torch.Tensor, rank: int, backward: bool) -> tuple[int, ...]:
        return self.spec.geometry(rank, backward, x.shape[1:])[4]

    def local_error(self, x: Any, rank: int, backward: bool) -> Exception | None:
        """The input checks a rank can make alone (rows, dims, device); None if it passes."""
        what = "gradient" if backward else "input"
        if not isinstance(x, torch.Tensor):
            return fail(TypeError(f"rank {rank}: {what} must be a torch.Tensor, got {type(x).__name__}"), 5)
        if x.dim() == 0:
            return fail(ValueError(f"rank {rank}: {what} is a zero-dim tensor; it needs a row dim"), 5)
        if x.device.type == "meta":
            return fail(ValueError(f"rank {rank}: {what} is a meta tensor (no data to move); pass a CPU or "
                                   f"CUDA tensor"), 2)
        plan = self.spec.rank_plan(rank, backward)
        if x.shape[0] != plan.in_rows:
            return fail(ValueError(f"rank {rank}: {what} has {x.shape[0]} rows, but the layout gives this "
                                   f"rank {plan.in_rows}"), 3)
        if self.spec.plan.col_mode:
            if x.dim() < 2:
                return fail(ValueError(f"rank {rank}: {what} of shape {tuple(x.shape)} has no column dim, "
                                       f"but the layouts split columns"), 4)
            if x.shape[-1] != plan.in_cols:
                return fail(ValueError(f"rank {rank}: {what} has last dim {x.shape[-1]}, but the layout gives "
                                  f"this rank {plan.in_cols} columns"), 4)
        wire = self.spec.wire_dtype
        if wire is not None and (x.dtype.is_floating_point != wire.is_floating_point or x.is_complex()):
            return TypeError(f"rank {rank}: wire_dtype {wire} does not fit a {x.dtype} {what}")
        return None

    def check_world(self, rank: int) -> None:
        """Ranks the layouts name must exist: otherwise messages go to no one and hang."""
        size = dist.get_world_size(self.spec.group)
        outside = [r for r in self.spec.ranks if r >= size]
        if outside:
            raise ValueError(f"rank {rank}: the transform's layouts name ranks {outside}, but the "
                             f"process group has only {size} ranks (0..{size - 1})")

    # running ---------------------------------------------------------------------------------

    def run(self, x: torch.Tensor, rank: int, backward: bool, out: torch.Tensor | None = None,
            rows: torch.Tensor | None = None) -> torch.Tensor:
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
            validate.agree(spec.fingerprint, spec.ranks, rank, grad, spec.trailing(grad), True, None, self.transport,
                           extra=int(differ))
        return result

    def start(self, x: torch.Tensor, rank: int, backward: bool, out: torch.Tensor | None = None,
              rows: torch.Tensor | None = None, transport: Any = None,
              error: Exception | None = None) -> Call:
        """Check, pack and post one call. ``error``: this rank's input check already failed; it
        still tells its peers (so they raise at once, naming it), then raises."""
        spec = self.spec
        what = f"transform {'backward' if backward else 'forward'}"
        if error is None:
            error = self.local_error(x, rank, backward)
        seq = self.calls[backward]
        self.calls[backward] += 1
        transport = transport or self.transport
        simulated = isinstance(transport, comm.Simulated)
        if not simulated:  # here, not in Transform: compiled calls reach the engine directly
            self.check_world(rank)
        crosses = spec.crosses[backward] and not simulated
        if spec.validate and not simulated:
            trailing = spec.trailing(x) if error is None else ()
            validate.agree(spec.fingerprint, spec.ranks, rank, x, trailing, backward, error, transport)
        # Every call that crosses the wire counts, refused ones too: both sides of a pair count alike.
        # (A simulated world's messages cross too, without counting.)
        tags = transport.payload_tags([r for r in spec.ranks if r != rank] if crosses or simulated else [])
        if error is not None:
            if crosses:
                deadline = transport.deadline()
                on = torch.device("cpu") if transport.host_ok() else torch.device("cuda", torch.cuda.current_device())
                told = validate.Round(rank, list(tags), transport, what, deadline, on, transport.host_ok())
                told.send(validate.header(spec.fingerprint, backward, seq, None, (),
                                           failed=getattr(error, "hpcomm_reason", 1)), {}, {})
                if told.settle():
                    told.release()
                else:  # peers that never came: this rank's own error is the one to report
                    comm.keep(told)
            raise error
        plan, outer, w_in, w_out, out_shape = spec.geometry(rank, backward, x.shape[1:])
        if backward and spec.grad == "mean":
            x = x * _mean_scale(spec, rank, x)
        x_flat = x.detach().contiguous().view(-1)
        if out is None:
            if spec.identity and not backward:
                return Call(self, None, x_flat, x, None, None, what)
            out = x_flat.new_empty(out_shape)
        data = out.detach()
        wire = spec.wire_dtype or x.dtype
        backend = get_backend(spec.backend if wire == x.dtype else "torch", x.device)
        row_map = None
        if rows is not None:
            starts, lengths = runs_from_rows(rows.cpu().numpy().astype(np.int64))
            row_map = (tuple(starts.tolist()), tuple(lengths.tolist()))
        zero_copy = spec.zero_copy and wire == x.dtype
        # Host messages: gloo copies each through the kernel anyway, so big ones travel as pieces
        # sent from and received into the tensors rather than packed (NCCL: packed, one group)
        eager = x.device.type == "cpu" and transport.host_ok()  # (tests force the NCCL way on gloo)
        # (the rank plan is one Plan's: the peers' plans it is cut against follow from it)
        key = (plan, outer, w_in, w_out, row_map, zero_copy, eager, backend.name, x.device, wire.itemsize)
        peers = (lambda p: spec.rank_plan(p, backward)) if eager else None
        exe: Exec = EXECS.get(key, lambda: _prepare(plan, outer, w_in, w_out, row_map, zero_copy, peers,
                                                     backend, x.device, wire.itemsize))
        deadline = transport.deadline()  # every wait of this call, headers included
        if exe.plan.zero_fill:  # only the destination rows: the rest of a caller's out is theirs
            data.zero_() if rows is None else data.index_fill_(0, rows, 0)
        out_flat = data.view(-1)
        send_buf = self.pool.take(exe.send_numel, wire, x.device) if exe.send_numel else None
        recv_buf = self.pool.take(exe.recv_numel, wire, x.device) if exe.recv_numel else None
        call = Call(self, exe, x_flat, out, send_buf, recv_buf, what, transport, tags, deadline)
        if simulated:
            transport.rank = rank
        # The header protocol (validate.Round): each peer gets one header message, carrying the
        # payload when the receive the peer posted for it has room (a repeated call's payloads
        # do). A payload on its own (too big for the room, or a big block of its tensor, or in
        # pieces: Message.own) is sent only once its receiver's header agrees, so it is exactly
        # the size the receive expects; on the host that receive is posted at once when the
        # payload cannot ride in the header, else once the header says it did not. Sends go
        # out one by one, each packed while the previous one is on the wire. NCCL needs a rank's
        # sends and receives in one group, so there the headers are checked first.
        try:
            round: validate.Round | None = None
            if crosses:
                on = torch.device("cpu") if transport.host_ok() else x.device
                round = call.round = validate.Round(rank, list(tags), transport, what, deadline, on,
                                                    eager)
                call.checked = False
                size = wire.itemsize
                by_peer = {m.peer: m for m in exe.sends}

                def pack(peer: int) -> torch.Tensor:  # header room, then the payload packed behind it
                    m = by_peer[peer]
                    if m.table is not None:  # the pack buffer has the room before it
                        self._pack(m, x_flat, send_buf, backend)
                        start = m.buf_offset * size - comm.HEADER_BYTES
                        return send_buf.view(torch.uint8)[start:start + comm.HEADER_BYTES + m.numel * size]  # type: ignore[union-attr]
                    message = self.pool.take(comm.HEADER_BYTES + m.numel * size, torch.uint8, x.device)
                    call.inline.append(message)
                    message[comm.HEADER_BYTES:].view(wire).copy_(_place(m, x_flat, send_buf))  # type: ignore[arg-type]
                    return message

                own = {m.peer for m in exe.sends if m.own(size)}
                call.sent_inline = {m.peer for m in exe.sends
                                    if m.numel * size <= round.send_room(m.peer) and m.peer not in own}
                sends, expects = {m.peer: m.numel for m in exe.sends}, {m.peer: m.numel for m in exe.recvs}
                pairs = {p: (sends.get(p, 0), expects.get(p, 0), tag) for p, tag in tags.items()}
                room = {m.peer: 0 if m.own(size) else m.numel * size for m in exe.recvs}
                round.send(validate.header(spec.fingerprint, backward, seq, x, spec.trailing(x)), pairs, room,
                           [m.peer for m in exe.sends if m.peer in call.sent_inline], pack, own)
                # (a message in pieces never rides: its sender sends it on its own)
                call.later = {m.peer for m in exe.recvs
                              if m.numel * size <= round.recv_room(m.peer) and len(m.parts) < 2}
            if eager:
                for m in exe.recvs:
                    if m.peer not in call.later:
                        call.post(m, _pieces(m, out_flat, recv_buf), receive=True)
            batch: list[tuple[int, torch.Tensor]] = []  # NCCL: every payload in one group
            waiting: list[tuple[Message, list[torch.Tensor]]] = []  # packed, its receiver's header not yet here
            for m in exe.sends:
                if m.peer in call.sent_inline:
                    continue
                if m.table is not None:
                    self._pack(m, x_flat, send_buf, backend)
                pieces = _pieces(m, x_flat, send_buf)
                if not eager:
                    batch += [(m.peer, piece) for piece in pieces]  # (one: pieces are host-only)
                elif round is not None and not round.arrived(m.peer):
                    waiting.append((m, pieces))
                elif round is None or round.agrees(m.peer):
                    call.post(m, pieces, receive=False)
            if not eager:
                if round is not None:
                    call.check()
                recv_list = [(m.peer, _place(m, out_flat, recv_buf)) for m in exe.recvs]  # type: ignore[arg-type]
                sent, got = transport.post(batch, recv_list, tags, what, deadline)
                call.sends, call.recvs = sent, {p.peer: [p] for p in got}
            # the local copies run while messages fly (and give late headers time to come)
            if not exe.plan.accumulate and exe.local is not None:
                backend.apply(exe.local, x_flat, out_flat, False)
            for m, pieces in waiting:  # each as its receiver's header comes
                if round.agrees(m.peer):  # type: ignore[union-attr]
                    call.post(m, pieces, receive=False)
        except BaseException:
            call.release(False)
            raise
        return call

    @staticmethod
    def _pack(m: Message, x_flat: torch.Tensor, buf: torch.Tensor | None, backend: Backend) -> None:
        """Pack a buffered message into its place in the pack buffer."""
        backend.apply(m.table, x_flat, _place(m, x_flat, buf), False)  # type: ignore[arg-type]


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
    calls = {r: engine.start(tensors[r], r, backward, None if out is None else out[r], transport=transport)
             for r in engine.spec.ranks}
    transport.deliver()
    return {r: c.finish() for r, c in calls.items()}
