"""Transform: the autograd-aware boundary communicator between two layouts."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, overload

import numpy as np
import torch
import torch.distributed as dist

from hpcomm import comm, engine, ops
from hpcomm.layout import Layout, runs_from_rows
from hpcomm.plan import Plan, RankPlan, get_plan
from hpcomm.segments import resolve_backend

GRAD_MODES = ("sum", "mean", "adjoint")
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
_DEVICE_TYPES = ["cpu", "cuda", "meta", "xpu", "mps"]


@dataclass
class _Job:
    """One rank's transform in flight: buffers, posted messages, and where the result goes."""

    exe: engine.Exec | None  # None for a whole-row collective (no pack, no unpack)
    x_flat: torch.Tensor
    out: torch.Tensor
    backend: str
    send_buf: torch.Tensor
    recv_buf: torch.Tensor
    sends: list[tuple[int, torch.Tensor]]
    recvs: list[tuple[int, torch.Tensor]]
    transport: str  # "grouped", "all_to_all", "all_gather" or "broadcast"
    rows: torch.Tensor | None  # out_rows, when a whole-row collective staged the shard


class Transform:
    """Moves a tensor from layout ``src`` to layout ``dst``; its gradient goes back.

    Call ``t(x)`` on every rank of ``src`` or ``dst`` with the rank's local shard ``x``
    ``[rows, *trailing]`` (zero rows, with the dtype and the full logical trailing shape, on
    destination-only ranks); it returns the rank's destination shard ``[dst rows, *trailing]``
    (zero rows on source-only ranks; the last dim is the rank's column range when the layouts
    split columns). Backward is collective like forward.

    grad: how gradients flow back.
      - "sum" (default): a destination row held by several ranks contributes the sum of their
        gradients; every source replica receives the row's full gradient; every holder of a partial
        source receives the full gradient.
      - "mean": as "sum", but an element's destination gradients are averaged over the ranks
        holding it (for replicas that all compute the same gradient, e.g. after a TP all-reduce).
      - "adjoint": the exact transpose of forward: only the source replica a destination read
        from receives that gradient (the others get zero), so <T x, y> = <x, T^T y>.
    backend: "auto" | "torch" | "cpp" | "cuda" | "triton": the pack/unpack/local-copy kernels.
    group: the process group carrying the transfer (default: the world); it must contain every
      rank of src and dst. Ranks are global ranks.
    wire_dtype: dtype on the wire (e.g. torch.bfloat16 for fp32 activations): pack converts to it
      and unpack back, in the same pass; rows copied locally keep full precision.
    validate: before each call, participants exchange a fingerprint (layouts, direction, dtype,
      trailing shape, device type, local-input check) and every rank raises the same error if they
      disagree. Default: off, unless the environment sets HPCOMM_VALIDATE=1.
    timeout: seconds a call waits for its peers before raising on this rank (default: the process
      group's timeout).
    zero_copy: send contiguous messages as views and receive in place (on by default).
    collectives: "auto": when the transform's ranks are exactly the group's members, a forward
      that is exactly an all-gather or a broadcast issues that collective, and every other call one
      all_to_all_single (all-to-all-v); "off" always uses grouped send/recv. All paths move the
      same bytes and give bitwise-identical results (partial sums are never reduced by a
      collective: its summation order is not the plan's, so determinism would be lost).
    """

    _lower: tuple[str, str] | None  # (forward, backward) transport, decided on first use

    def __init__(self, src: Layout, dst: Layout, group: dist.ProcessGroup | None = None,
                 backend: str = "auto", grad: str = "sum",
                 wire_dtype: torch.dtype | None = None, validate: bool | None = None,
                 timeout: float | None = None, zero_copy: bool = True, collectives: str = "auto") -> None:
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {grad!r}; expected one of {', '.join(GRAD_MODES)}")
        if backend not in ("auto", "torch", "cpp", "cuda", "triton"):
            raise ValueError(f"unknown backend {backend!r}; expected auto, torch, cpp, cuda or triton")
        if wire_dtype is not None and not isinstance(wire_dtype, torch.dtype):
            raise TypeError(f"wire_dtype must be a torch.dtype, got {wire_dtype!r}")
        if collectives not in ("auto", "off"):
            raise ValueError(f"unknown collectives mode {collectives!r}; expected auto or off")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.src, self.dst, self.group, self.backend, self.grad = src, dst, group, backend, grad
        self.wire_dtype, self.timeout, self.zero_copy = wire_dtype, timeout, zero_copy
        self.collectives, self._lower = collectives, None
        self.validate = os.environ.get("HPCOMM_VALIDATE") == "1" if validate is None else validate
        self.plan = get_plan(src, dst)
        self._identity = src == dst  # compared once: equal layouts compare their whole runs
        self._grad_plan = None if grad == "adjoint" else get_plan(dst.as_partial(), src.as_partial(False),
                                                                  fill_missing=True)
        self.ranks = tuple(dict.fromkeys(src.ranks + dst.ranks))
        self._anchor = torch.zeros(0, requires_grad=True)
        self._pool = engine.BufferPool()
        self._fingerprint: int | None = None
        self._transposed: dict[int, RankPlan] = {}
        self._scales: dict[tuple[int, torch.dtype, torch.device, int], torch.Tensor] = {}
        self._handle = ops.register_transform(self)

    def __repr__(self) -> str:
        return f"Transform({self.src!r} -> {self.dst!r}, grad={self.grad!r})"

    # -- user API -----------------------------------------------------------------------------------

    @overload
    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = ...,
                 out_rows: torch.Tensor | Sequence[int] | None = ...,
                 async_op: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = ...,
                 out_rows: torch.Tensor | Sequence[int] | None = ...,
                 async_op: Literal[True]) -> _Pending: ...

    @overload
    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = ...,
                 out_rows: torch.Tensor | Sequence[int] | None = ...,
                 async_op: bool = ...) -> torch.Tensor | _Pending: ...

    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = None,
                 out_rows: torch.Tensor | Sequence[int] | None = None,
                 async_op: bool = False) -> torch.Tensor | _Pending:
        """Forward on this rank. ``out``: a caller-given destination, either exactly the shard's
        shape, or with ``out_rows`` (local row positions, one per destination row) a larger tensor
        whose rows ``out_rows`` receive the shard; it is written in place and returned. With
        ``async_op`` the call returns a handle at once; its ``wait()`` returns the result (compute
        in between overlaps the transfer; do not modify ``x`` or ``out`` until then)."""
        if not isinstance(x, torch.Tensor) and hasattr(x, "__dlpack__"):
            return self._call_array(x, out, out_rows)
        if torch.compiler.is_compiling() and out is None and not async_op:
            # Dynamo would trace the host-side checks and cached numpy plans instead of calling
            # them; the op's fake implementation runs the same checks at trace time
            anchor = self._anchor if torch.is_grad_enabled() else self._anchor.detach()
            return ops.transform(x, anchor, self._handle)
        rank = self._rank()
        error = self._local_error(x, rank, backward=False)
        if error is None and out is not None:
            error = self._out_error(x, rank, out, out_rows)
        elif error is None and out_rows is not None:
            error = ValueError(f"rank {rank}: out_rows needs out (the tensor the rows index)")
        if self.validate:
            self._agree(x, rank, backward=False, error=error)
        if error is not None:
            raise error
        anchor = self._anchor if torch.is_grad_enabled() else self._anchor.detach()
        if out is None and not async_op:
            if self._identity:  # every rank returns its input, uncopied
                return _Alias.apply(x, anchor, self)
            return ops.transform(x, anchor, self._handle)
        job = self._start(x, rank, False, out, out_rows, transport=self._transport(False))
        handle = self._post(job, "transform")
        rows = None if out_rows is None else torch.as_tensor(out_rows, device=job.out.device)

        def wait() -> torch.Tensor:
            handle.wait()
            return _Into.apply(x, anchor, job.out, self, rows, lambda: self._complete(job))

        return _Pending(wait) if async_op else wait()

    def _call_array(self, x: Any, out: Any, out_rows: torch.Tensor | Sequence[int] | None) -> Any:
        """DLPack arrays (cupy on GPU, numpy on CPU): the same transform, zero-copy in and out, with
        an array of the caller's library back (no autograd: arrays have none)."""
        library = sys.modules[type(x).__module__.split(".")[0]]
        with torch.no_grad():
            y = self(torch.from_dlpack(x), out=None if out is None else torch.from_dlpack(out),
                     out_rows=out_rows)
        return out if out is not None else library.from_dlpack(y)

    def simulate(self, inputs: Mapping[int, torch.Tensor],
                 out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Forward for the whole world in one process: {rank: x} -> {rank: y}, every rank of src
        and dst (``out``: optional {rank: preallocated y}). Same plan and kernels as the
        distributed path; only the transport differs."""
        return self._simulate(inputs, backward=False, out=out)

    def simulate_backward(self, grads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Backward for the whole world in one process: {rank: grad of y} -> {rank: grad of x}."""
        return self._simulate(grads, backward=True)

    def stats(self, rank: int | None = None, like: torch.Tensor | None = None) -> dict[str, int]:
        """What ``rank`` (default: this rank) sends, receives and copies locally in forward, from
        the plan: row x column units, and bytes when ``like`` (a tensor with the trailing shape and
        dtype of the data, e.g. the input) is given."""
        rank = self._rank() if rank is None else rank
        stats = self.plan.rank_plan(rank).stats()
        if like is not None:
            trailing = like.shape[1:]
            per_unit = math.prod(trailing[:-1]) if self.plan.col_mode else math.prod(trailing)
            for key in ("sent", "received", "copied"):
                stats[f"bytes_{key}"] = stats[key] * per_unit * like.element_size()
        return stats

    # -- checks ---------------------------------------------------------------------------------------

    def _rank(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("Transform called outside a process group: initialize "
                               "torch.distributed, or use simulate()")
        rank = dist.get_rank()
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} is neither in src nor in dst of this transform")
        return rank

    def _rank_plan(self, rank: int, backward: bool) -> RankPlan:
        if not backward:
            return self.plan.rank_plan(rank)
        if self._grad_plan is None:
            if rank not in self._transposed:  # cached: the engine's tables are keyed by the plan
                self._transposed[rank] = self.plan.rank_plan(rank).transpose()
            return self._transposed[rank]
        return self._grad_plan.rank_plan(rank)

    def _geometry(self, x: torch.Tensor, rank: int, backward: bool
                  ) -> tuple[RankPlan, int, int, int, tuple[int, ...]]:
        """(rank plan, outer, input width, output width, output shape) for a checked input."""
        plan = self._rank_plan(rank, backward)
        trailing = tuple(x.shape[1:])
        if self.plan.col_mode:
            outer = math.prod(trailing[:-1])
            return plan, outer, plan.in_cols, plan.out_cols, (plan.out_rows, *trailing[:-1], plan.out_cols)
        return plan, math.prod(trailing), 1, 1, (plan.out_rows, *trailing)

    def _output_shape(self, x: torch.Tensor, backward: bool) -> tuple[int, ...]:
        return self._geometry(x, self._rank(), backward)[4]

    def _local_error(self, x: torch.Tensor, rank: int, backward: bool) -> Exception | None:
        what = "gradient" if backward else "input"
        if not isinstance(x, torch.Tensor):
            return TypeError(f"rank {rank}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            return ValueError(f"rank {rank}: {what} is a zero-dim tensor; it needs a row dim")
        plan = self._rank_plan(rank, backward)
        if x.shape[0] != plan.in_rows:
            return ValueError(f"rank {rank}: {what} has {x.shape[0]} rows, but the layout gives this "
                              f"rank {plan.in_rows}")
        if self.plan.col_mode:
            if x.dim() < 2:
                return ValueError(f"rank {rank}: {what} of shape {tuple(x.shape)} has no column dim, "
                                  f"but the layouts split columns")
            if x.shape[-1] != plan.in_cols:
                return ValueError(f"rank {rank}: {what} has last dim {x.shape[-1]}, but the layout "
                                  f"gives this rank {plan.in_cols} columns")
        return None

    def _check(self, x: torch.Tensor, rank: int, backward: bool) -> None:
        error = self._local_error(x, rank, backward)
        if error is not None:
            raise error

    def _out_error(self, x: torch.Tensor, rank: int, out: torch.Tensor | None,
                   out_rows: torch.Tensor | Sequence[int] | None) -> Exception | None:
        shape = self._geometry(x, rank, False)[4]
        if not isinstance(out, torch.Tensor):
            return TypeError(f"rank {rank}: out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != x.dtype or out.device != x.device:
            return ValueError(f"rank {rank}: out is {out.dtype} on {out.device}, input is {x.dtype} "
                              f"on {x.device}")
        if not out.is_contiguous():
            return ValueError(f"rank {rank}: out must be contiguous")
        if out.numel() and x.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return ValueError(f"rank {rank}: out shares memory with the input; pass a separate tensor")
        if out_rows is None:
            if tuple(out.shape) != shape:
                return ValueError(f"rank {rank}: out has shape {tuple(out.shape)}, the destination "
                                  f"shard is {shape}")
            return None
        if out.dim() == 0 or tuple(out.shape[1:]) != shape[1:]:
            return ValueError(f"rank {rank}: out has trailing shape {tuple(out.shape[1:])}, the "
                              f"destination shard's is {shape[1:]}")
        rows = torch.as_tensor(out_rows)
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            return TypeError(f"rank {rank}: out_rows must be a 1-D integer tensor or sequence")
        if rows.numel() != shape[0]:
            return ValueError(f"rank {rank}: out_rows has {rows.numel()} entries, the destination "
                              f"shard has {shape[0]} rows")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out.shape[0]):
            bad = rows[(rows < 0) | (rows >= out.shape[0])][0]
            return ValueError(f"rank {rank}: out_rows entry {int(bad)} is out of range [0, {out.shape[0]})")
        if rows.unique().numel() != rows.numel():
            return ValueError(f"rank {rank}: out_rows has a repeated row")
        return None

    def _agree(self, x: torch.Tensor, rank: int, backward: bool, error: Exception | None) -> None:
        """Cross-rank validation: every participant raises the same error if any disagrees."""
        if self._fingerprint is None:
            # every option that changes what crosses the wire, or how, is part of the transform
            options = repr((self.grad, str(self.wire_dtype), self.collectives, self.zero_copy))
            self._fingerprint = (self.src.fingerprint() * 31 + self.dst.fingerprint() * 7
                                 + _digest(options)) & ((1 << 63) - 1)
        ok = error is None
        keep = -1 if self.plan.col_mode else None
        fields = [self._fingerprint, int(backward), int(not ok)]
        if ok:
            dims = list(x.shape[1:keep])
            # the whole trailing shape is compared through its digest; a few dims are shown
            fields += [_DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES),
                       _DEVICE_TYPES.index(x.device.type) if x.device.type in _DEVICE_TYPES else -1,
                       _digest(repr(dims)), len(dims), *dims[:_SHOWN_DIMS]]
        fields += [-1] * (_FINGERPRINT_LEN - len(fields))
        table = comm.agree(torch.tensor(fields, dtype=torch.int64), self.ranks, self.group,
                           self.timeout).tolist()
        problems = []
        keys = [tuple(row[:2]) for row in table]
        majority = max(keys, key=keys.count)  # name the odd ones out, not the leader
        agreeing = [r for r, key in zip(self.ranks, keys) if key == majority]
        for r, row, key in zip(self.ranks, table, keys):
            if key != majority:
                problems.append(f"rank {r} calls a different transform (or direction) than ranks "
                                f"{agreeing}")
            elif row[2]:
                problems.append(f"rank {r} failed its own input check")
        good = [(r, row) for r, row in zip(self.ranks, table) if not row[2]]
        for r, row in good[1:]:
            r0, row0 = good[0]
            if row[3] != row0[3]:
                problems.append(f"rank {r} passes {_dtype_name(row[3])}, rank {r0} passes "
                                f"{_dtype_name(row0[3])}")
            if row[4] != row0[4]:
                problems.append(f"rank {r} passes a {_DEVICE_TYPES[row[4]]} tensor, rank {r0} a "
                                f"{_DEVICE_TYPES[row0[4]]} tensor")
            if row[5] != row0[5]:
                problems.append(f"rank {r} passes trailing dims {_dims(row)}, rank {r0} passes "
                                f"{_dims(row0)}")
        if problems:
            detail = str(error) if error is not None else "; ".join(problems)
            raise ValueError(f"hpcomm validation failed on rank {rank}: {detail}"
                             + (f" (all problems: {'; '.join(problems)})" if error is not None else ""))

    # -- execution ------------------------------------------------------------------------------------

    def _transport(self, backward: bool) -> str:
        """How calls move data: "grouped" send/recv, or, when the transform's ranks are exactly the
        group's members (a collective needs all of them), "all_gather" or "broadcast" where the
        forward plan is exactly that, else one "all_to_all" (all-to-all-v). Every rank decides
        alike, from the layouts and the group alone."""
        if self._lower is None:
            members = sorted(dist.get_process_group_ranks(self.group or dist.group.WORLD))
            whole = self.collectives == "auto" and members == sorted(self.ranks) and len(members) > 1
            pattern = self.plan.pattern() if whole and self.wire_dtype is None else None
            mode = "all_to_all" if whole else "grouped"
            self._lower = (pattern or mode, mode)
        return self._lower[backward]

    def _materialize(self, x: torch.Tensor, rank: int, backward: bool,
                     row_map: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
                     buffered: bool = False) -> engine.Exec:
        plan, outer, w_in, w_out, _ = self._geometry(x, rank, backward)
        casts = self.wire_dtype is not None and self.wire_dtype != x.dtype
        zero_copy = self.zero_copy and not casts and not buffered  # a collective wants one buffer
        return engine.materialize(plan, outer, w_in, w_out, row_map, zero_copy)

    def _start(self, x: torch.Tensor, rank: int, backward: bool, out: torch.Tensor | None = None,
               out_rows: torch.Tensor | Sequence[int] | None = None,
               transport: str = "grouped") -> _Job:
        """Pack and lay out the messages of one call (nothing is sent yet)."""
        out_shape = self._geometry(x, rank, backward)[4]
        if backward and self.grad == "mean":
            x = x * self._mean_scale(rank, x)
        x_flat = x.detach().contiguous().view(-1)
        if out is None:
            out = x_flat.new_empty(out_shape)
        # the engine writes through a detached alias: autograd sees the call as one op (_Into)
        data = out.detach()
        rows = None if out_rows is None else torch.as_tensor(out_rows, device=out.device)
        if transport in ("all_gather", "broadcast"):
            # the collective writes whole rows in order: into out, or a shard-shaped staging tensor
            target = data if rows is None else data.new_empty(out_shape)
            if transport == "broadcast" and rank in self.src.ranks:
                if rank not in self.dst.ranks:  # a source-only root sends its input as it is
                    return _Job(None, x_flat, out, "", x_flat, x_flat, [], [], transport, None)
                target.copy_(x_flat.view(out_shape))
            return _Job(None, x_flat, out, "", x_flat, target.view(-1), [], [], transport, rows)
        row_map = None
        if rows is not None:
            starts, lengths = runs_from_rows(rows.cpu().numpy().astype(np.int64))
            row_map = (tuple(starts.tolist()), tuple(lengths.tolist()))
        exe = self._materialize(x, rank, backward, row_map, buffered=transport == "all_to_all")
        if exe.plan.zero_fill:  # only the destination rows: the rest of a caller's out is theirs
            data.zero_() if rows is None else data.index_fill_(0, rows, 0)
        wire = self.wire_dtype or x.dtype
        # with a wire dtype the buffers hold wire elements and pack / unpack convert in the same
        # pass; the torch kernels convert (the C++/CUDA/Triton ones move bits of one dtype)
        backend = resolve_backend(self.backend if wire == x.dtype else "torch", x.device)
        send_buf = self._pool.take(exe.send_numel, wire, x.device)
        recv_buf = self._pool.take(exe.recv_numel, wire, x.device)
        sends, recvs = engine.post_messages(exe, x_flat, data.view(-1), send_buf, recv_buf, backend)
        if transport == "all_to_all":  # the buffers hold the messages in peer (= group rank) order
            sends, recvs = [(None, send_buf)], [(None, recv_buf)]  # type: ignore[list-item]  # peers unused
        return _Job(exe, x_flat, out, backend, send_buf, recv_buf, sends, recvs, transport, None)

    def _post(self, job: _Job, what: str) -> comm.Handle:
        if job.transport == "grouped":
            return comm.exchange(job.sends, job.recvs, self.group, self.timeout, what)
        if job.transport == "all_gather":
            return comm.collective(dist.all_gather_into_tensor, (job.recv_buf, job.send_buf),
                                   self.group, self.timeout, what)
        if job.transport == "broadcast":
            return comm.collective(dist.broadcast, (job.recv_buf, self.src.ranks[0]), self.group,
                                   self.timeout, what)
        members = sorted(dist.get_process_group_ranks(self.group or dist.group.WORLD))
        # all_to_all: the job has an Exec (only the whole-row collectives have none)
        send_sizes = dict((m.peer, m.numel) for m in job.exe.sends)  # type: ignore[union-attr]
        recv_sizes = dict((m.peer, m.numel) for m in job.exe.recvs)  # type: ignore[union-attr]
        return comm.collective(dist.all_to_all_single,
                               (job.recvs[0][1], job.sends[0][1], [recv_sizes.get(r, 0) for r in members],
                                [send_sizes.get(r, 0) for r in members]), self.group, self.timeout, what)

    def _complete(self, job: _Job) -> torch.Tensor:
        if job.exe is None:  # a whole-row collective: only a staged result is left to place
            if job.rows is not None and job.out.numel():
                job.out.detach().index_copy_(0, job.rows, job.recv_buf.view(-1, *job.out.shape[1:]))
            return job.out
        engine.finish(job.exe, job.x_flat, job.recv_buf, job.out.detach().view(-1), job.backend)
        self._pool.give(job.send_buf)
        self._pool.give(job.recv_buf)
        return job.out

    def _run(self, x: torch.Tensor, backward: bool) -> torch.Tensor:
        rank = self._rank()
        job = self._start(x, rank, backward, transport=self._transport(backward))
        self._post(job, "transform backward" if backward else "transform").wait()
        return self._complete(job)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, backward=False)

    def _backward(self, grad: torch.Tensor) -> torch.Tensor:
        rank = self._rank()
        error = self._local_error(grad, rank, backward=True)
        if self.validate:
            self._agree(grad, rank, backward=True, error=error)
        if error is not None:
            raise error
        return self._run(grad, backward=True)

    def _simulate(self, tensors: Mapping[int, torch.Tensor], backward: bool,
                  out: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"simulate expects a dict {{rank: tensor}}, got {type(tensors).__name__}")
        missing = [r for r in self.ranks if r not in tensors]
        extra = [r for r in tensors if r not in self.ranks]
        if missing or extra:
            raise ValueError(f"simulate needs exactly the ranks {list(self.ranks)}; missing "
                             f"{missing}, unexpected {extra}")
        for r in self.ranks:
            self._check(tensors[r], r, backward)
            if out is not None:
                error = self._out_error(tensors[r], r, out.get(r), None)
                if error is not None:
                    raise error
        self._check_agreement(tensors)
        jobs = {r: self._start(tensors[r], r, backward, None if out is None else out[r])
                for r in self.ranks}
        comm.simulate_exchange({r: j.sends for r, j in jobs.items()},
                               {r: j.recvs for r, j in jobs.items()})
        return {r: self._complete(j) for r, j in jobs.items()}

    def _check_agreement(self, tensors: Mapping[int, torch.Tensor]) -> None:
        """Dtype, device type and the trailing shape (but the split last dim) agree across ranks."""
        first = self.ranks[0]
        ref = tensors[first]
        keep = -1 if self.plan.col_mode else None
        for r in self.ranks[1:]:
            x = tensors[r]
            if x.dtype != ref.dtype:
                raise ValueError(f"rank {r} passes dtype {x.dtype}, rank {first} passes {ref.dtype}")
            if x.device.type != ref.device.type:
                raise ValueError(f"rank {r} passes a {x.device.type} tensor, rank {first} a "
                                 f"{ref.device.type} tensor")
            if x.shape[1:keep] != ref.shape[1:keep]:
                raise ValueError(f"rank {r} passes trailing shape {tuple(x.shape[1:])}, rank {first} "
                                 f"passes {tuple(ref.shape[1:])}")

    def _mean_scale(self, rank: int, grad: torch.Tensor) -> torch.Tensor:
        """1 / (number of destination ranks holding each element) for ``rank``'s rows, broadcastable
        against its gradient."""
        key = (rank, grad.dtype, grad.device, grad.dim())
        if key not in self._scales:  # pure data of the plan: computed once per rank and geometry
            counts = _holder_counts(self.plan, rank)
            scale = torch.from_numpy(1.0 / np.maximum(counts, 1)).to(grad.dtype).to(grad.device)
            if self.plan.col_mode:
                scale = scale.view(scale.shape[0], *([1] * (grad.dim() - 2)), scale.shape[1])
            else:
                scale = scale.view(-1, *([1] * (grad.dim() - 1)))
            self._scales[key] = scale
        return self._scales[key]


_SHOWN_DIMS = 8
_FINGERPRINT_LEN = 7 + _SHOWN_DIMS


def _digest(text: str) -> int:
    """A 63-bit digest equal across processes (``hash`` of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _dims(row: list[int]) -> str:
    shown = row[7:7 + min(row[6], _SHOWN_DIMS)]
    return str(shown)[:-1] + (", ...]" if row[6] > _SHOWN_DIMS else "]")


def _dtype_name(index: int) -> str:
    return str(_DTYPES[index]) if 0 <= index < len(_DTYPES) else "another dtype"


class _Pending:
    """Handle of an ``async_op`` call: ``wait()`` finishes the transfer and returns the result."""

    _result: torch.Tensor | None

    def __init__(self, wait: Callable[[], torch.Tensor]) -> None:
        self._wait, self._result = wait, None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self._wait()
        return self._result


class _Into(torch.autograd.Function):
    """Autograd for results written into a caller's tensor (``out``, ``out_rows``, async): the
    gradient of the written rows goes back through the transform; the rest of ``out``'s gradient
    flows to whatever ``out`` was before (the overwritten rows get none)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, out: torch.Tensor, transform: Transform,
                rows: torch.Tensor | None, produce: Callable[[], torch.Tensor]) -> torch.Tensor:
        produce()
        ctx.mark_dirty(out)
        ctx.transform, ctx.rows = transform, rows
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor
                 ) -> tuple[torch.Tensor, None, torch.Tensor | None, None, None, None]:
        rows = ctx.rows
        grad_y = grad_out if rows is None else grad_out.index_select(0, rows)
        grad_x = ops.transform_backward(grad_y.contiguous(), ctx.transform._handle)
        grad_base = None if rows is None else grad_out.index_fill(0, rows, 0)
        return grad_x, None, grad_base, None, None, None


class _Alias(torch.autograd.Function):
    """An identity transform (src == dst): the result is the input itself, a view on every rank
    (no copy), and the gradient still takes the collective backward path (replicas may need each
    other's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, transform: Transform) -> torch.Tensor:
        ctx.transform = transform
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad_x = ops.transform_backward(grad.contiguous(), ctx.transform._handle)
        return grad_x, None, None


def _holder_counts(plan: Plan, rank: int) -> np.ndarray:
    """[local rows, local cols] (cols = 1 without column splits): how many destination ranks hold
    each element of ``rank``'s destination shard."""
    dst = plan.dst
    if rank not in dst.ranks:
        return np.zeros((0, plan.width(dst, rank)))
    index = dst.holder_index
    starts, lengths = dst.runs(rank)
    c0, c1 = plan.cols_of(dst, dst.index(rank))
    local_off = np.cumsum(lengths) - lengths
    ridx, ps, pe, bins = index.split(starts, starts + lengths)
    counts = np.zeros((int(lengths.sum()), c1 - c0))
    col = np.arange(c0, c1)
    for b in np.unique(bins).tolist():
        per_col = np.zeros(c1 - c0)
        for h in index.holders_of(b):
            h0, h1 = plan.cols_of(dst, h)
            per_col += (col >= h0) & (col < h1)
        for p in np.flatnonzero(bins == b).tolist():
            first = local_off[ridx[p]] + ps[p] - starts[ridx[p]]
            counts[first:first + pe[p] - ps[p]] = per_col
    return counts
