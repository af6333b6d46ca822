"""Transform: the autograd-aware boundary communicator between two layouts."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

from hpcomm import comm, engine, ops
from hpcomm.layout import Layout
from hpcomm.plan import Plan, RankPlan, get_plan
from hpcomm.segments import resolve_backend

GRAD_MODES = ("sum", "mean", "adjoint")


class Transform:
    """Moves a tensor from layout ``src`` to layout ``dst``; its gradient goes back.

    Call ``t(x)`` on every rank of ``src`` or ``dst`` with the rank's local shard ``x`` (zero rows,
    with the dtype and the full logical trailing shape, on destination-only ranks); it returns the
    rank's destination shard (zero rows on source-only ranks). Backward is collective like forward.

    grad: how gradients flow back.
      - "sum" (default): a destination row held by several ranks contributes the sum of their
        gradients; every source replica receives the row's full gradient; every holder of a partial
        source receives the full gradient.
      - "mean": as "sum", but a row's destination gradients are averaged over the ranks holding
        that element (for replicas that all compute the same gradient, e.g. after a TP all-reduce).
      - "adjoint": the exact transpose of forward: only the source replica a destination read
        from receives that gradient (the others get zero), so <T x, y> = <x, T^T y>.
    backend: "auto" | "torch" | "cpp" | "cuda" | "triton" (kernels for pack/unpack/local copy).
    group: the process group carrying the transfer (default: the world); it must contain every
    rank of src and dst. Ranks are global ranks.
    """

    def __init__(self, src: Layout, dst: Layout, group=None, backend: str = "auto", grad: str = "sum"):
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {grad!r}; expected one of {', '.join(GRAD_MODES)}")
        if backend not in ("auto", "torch", "cpp", "cuda", "triton"):
            raise ValueError(f"unknown backend {backend!r}; expected auto, torch, cpp, cuda or triton")
        self.src, self.dst, self.group, self.backend, self.grad = src, dst, group, backend, grad
        self.plan = get_plan(src, dst)
        self._grad_plan = None if grad == "adjoint" else get_plan(dst.as_partial(), src.as_partial(False),
                                                                  fill_missing=True)
        self.ranks = tuple(dict.fromkeys(src.ranks + dst.ranks))
        self._anchor = torch.zeros(0, requires_grad=True)
        self._handle = ops.register_transform(self)

    def __repr__(self) -> str:
        return f"Transform({self.src!r} -> {self.dst!r}, grad={self.grad!r})"

    # -- user API -----------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self._rank(), backward=False)
        anchor = self._anchor if torch.is_grad_enabled() else self._anchor.detach()
        return ops.transform(x, anchor, self._handle)

    def simulate(self, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Forward for the whole world in one process: {rank: x} -> {rank: y}, every rank of src
        and dst. Same plan and kernels as the distributed path; only the transport differs."""
        return self._simulate(inputs, backward=False)

    def simulate_backward(self, grads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Backward for the whole world in one process: {rank: grad of y} -> {rank: grad of x}."""
        return self._simulate(grads, backward=True)

    def stats(self, rank: int | None = None) -> dict:
        """Row x column units sent, received and copied locally by ``rank`` (default: this rank)
        in forward, from the plan (multiply by the elements per unit for element counts)."""
        return self.plan.rank_plan(self._rank() if rank is None else rank).stats()

    # -- internals ----------------------------------------------------------------------------------

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
            return self.plan.rank_plan(rank).transpose()
        return self._grad_plan.rank_plan(rank)

    def _geometry(self, x: torch.Tensor, rank: int, backward: bool):
        """(rank plan, outer, input width, output width, output shape) for a checked input."""
        plan = self._rank_plan(rank, backward)
        trailing = tuple(x.shape[1:])
        if self.plan.col_mode:
            outer = math.prod(trailing[:-1])
            out_shape = (plan.out_rows, *trailing[:-1], plan.out_cols)
            return plan, outer, plan.in_cols, plan.out_cols, out_shape
        return plan, math.prod(trailing), 1, 1, (plan.out_rows, *trailing)

    def _output_shape(self, x: torch.Tensor, backward: bool):
        return self._geometry(x, self._rank(), backward)[4]

    def _check(self, x, rank: int, backward: bool) -> None:
        what = "gradient" if backward else "input"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"rank {rank}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"rank {rank}: {what} is a zero-dim tensor; it needs a row dim")
        plan = self._rank_plan(rank, backward)
        if x.shape[0] != plan.in_rows:
            raise ValueError(f"rank {rank}: {what} has {x.shape[0]} rows, but the layout gives this "
                             f"rank {plan.in_rows}")
        if self.plan.col_mode:
            if x.dim() < 2:
                raise ValueError(f"rank {rank}: {what} of shape {tuple(x.shape)} has no column dim, "
                                 f"but the layouts split columns")
            if x.shape[-1] != plan.in_cols:
                raise ValueError(f"rank {rank}: {what} has last dim {x.shape[-1]}, but the layout "
                                 f"gives this rank {plan.in_cols} columns")

    def _run(self, x: torch.Tensor, rank: int, backward: bool, transport) -> torch.Tensor:
        plan, outer, w_in, w_out, out_shape = self._geometry(x, rank, backward)
        if backward and self.grad == "mean":
            x = x * self._mean_scale(rank, x)
        x_flat = x.contiguous().view(-1)
        exe = engine.materialize(plan, outer, w_in, w_out)
        backend = resolve_backend(self.backend, x.device)
        send_buf = engine.pack(exe, x_flat, backend)
        recv_buf = x_flat.new_empty(exe.recv_numel)
        transport(exe, send_buf, recv_buf)
        out = x_flat.new_empty(math.prod(out_shape))
        return engine.unpack(exe, x_flat, recv_buf, out, backend).view(out_shape)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self._rank(), False, self._dist_transport)

    def _backward(self, grad: torch.Tensor) -> torch.Tensor:
        rank = self._rank()
        self._check(grad, rank, backward=True)
        return self._run(grad, rank, True, self._dist_transport)

    def _dist_transport(self, exe, send_buf, recv_buf) -> None:
        comm.exchange(send_buf, exe.send_splits, recv_buf, exe.recv_splits, self.group).wait()

    def _simulate(self, tensors: Mapping[int, torch.Tensor], backward: bool) -> dict[int, torch.Tensor]:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"simulate expects a dict {{rank: tensor}}, got {type(tensors).__name__}")
        missing = [r for r in self.ranks if r not in tensors]
        extra = [r for r in tensors if r not in self.ranks]
        if missing or extra:
            raise ValueError(f"simulate needs exactly the ranks {list(self.ranks)}; missing "
                             f"{missing}, unexpected {extra}")
        for r in self.ranks:
            self._check(tensors[r], r, backward)
        self._check_agreement(tensors)
        sends, recvs, pending = {}, {}, {}
        for r in self.ranks:
            x = tensors[r]
            plan, outer, w_in, w_out, out_shape = self._geometry(x, r, backward)
            if backward and self.grad == "mean":
                x = x * self._mean_scale(r, x)
            x_flat = x.contiguous().view(-1)
            exe = engine.materialize(plan, outer, w_in, w_out)
            backend = resolve_backend(self.backend, x.device)
            sends[r] = (engine.pack(exe, x_flat, backend), exe.send_splits)
            recvs[r] = (x_flat.new_empty(exe.recv_numel), exe.recv_splits)
            pending[r] = (exe, x_flat, out_shape, backend)
        comm.simulate_exchange(sends, recvs)
        out = {}
        for r, (exe, x_flat, out_shape, backend) in pending.items():
            y = x_flat.new_empty(math.prod(out_shape))
            out[r] = engine.unpack(exe, x_flat, recvs[r][0], y, backend).view(out_shape)
        return out

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
        counts = _holder_counts(self.plan, rank)
        scale = torch.from_numpy(1.0 / np.maximum(counts, 1)).to(grad.dtype).to(grad.device)
        if self.plan.col_mode:
            return scale.view(scale.shape[0], *([1] * (grad.dim() - 2)), scale.shape[1])
        return scale.view(-1, *([1] * (grad.dim() - 1)))


def _holder_counts(plan: Plan, rank: int) -> np.ndarray:
    """[local rows, local cols] (cols = 1 without column splits): how many destination ranks hold
    each element of ``rank``'s destination shard."""
    dst = plan.dst
    if rank not in dst.ranks:
        return np.zeros((0, plan.width(dst, rank)))
    index = dst.holder_index
    starts, lengths = dst.runs(rank)
    pos = dst.index(rank)
    c0, c1 = plan.cols_of(dst, pos)
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
