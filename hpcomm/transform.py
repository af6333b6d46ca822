"""Transform: the user-facing boundary communicator between two layouts (checks, options,
autograd glue). Execution is hpcomm.engine's; the custom ops are hpcomm.ops'."""

from __future__ import annotations

import math
import os
import sys
import weakref
from typing import Any, Callable, Literal, Mapping, Sequence, overload

import numpy as np
import torch
import torch.distributed as dist

from hpcomm import engine, ops, protocol
from hpcomm.engine import GRAD_MODES
from hpcomm.layout import Layout
from hpcomm.plan import get_plan
from hpcomm.segments import backend_names
from hpcomm.protocol import REASONS, failure


class Transform:
    """Moves a tensor from layout ``src`` to layout ``dst``; its gradient goes back.

    Call ``t(x)`` on every rank of ``src`` or ``dst`` with the rank's local shard ``x``
    ``[rows, *trailing]`` (zero rows, with the dtype and the full logical trailing shape, on
    destination-only ranks); it returns the rank's destination shard ``[dst rows, *trailing]``
    (zero rows on source-only ranks; the last dim is the rank's column range when the layouts
    split columns). Backward is collective like forward.

    grad: how gradients flow back (every source replica of a row receives the row's full gradient,
      and every holder of a partial source the full gradient, except under "adjoint").
      - "replicated" (default; Megatron's TP convention, DTensor's Replicate): destination replicas
        of a row hold the same full gradient; one holder's is read per row (the local holder when
        there is one) and the others send nothing.
      - "sum": destination replicas hold partial gradients, which are summed (source-rank order).
      - "mean": destination replicas' gradients are averaged.
      - "adjoint": the exact transpose of forward (only the source replica a destination read
        from receives its gradient), so <T x, y> = <x, T^T y>.
      - None: no backward at all (a frozen source): the output carries no autograd history on any
        rank and nothing moves backward.
    backend: "auto" or a kernel backend name (``hpcomm.backends()``) for pack/unpack/local copies.
    group: the process group carrying the transfer (default: the world); it must contain every
      rank of src and dst. Ranks are global ranks.
    wire_dtype: dtype on the wire (e.g. torch.bfloat16 for fp32 activations): pack converts to it
      and unpack back, in the same pass; rows copied locally keep full precision.
    validate: before each call every participant exchanges a fingerprint with all the others
      (layouts, direction, dtype, trailing shape, device, own input check) and all raise the same
      error if any disagrees; under "replicated" backward also checks that replicas' gradients
      agree. Off by default (HPCOMM_VALIDATE=1 turns it on): the per-peer header every call
      exchanges already turns disagreements between peers into errors.
    timeout: seconds one call may wait for its peers in all, on the host (headers, and gloo's
      payloads; NCCL's payloads are bounded by the process group's timeout and its watchdog).
      Default: the environment variable HPCOMM_TIMEOUT if set, else the process group's timeout.
    zero_copy: send a message that is one block of the input from the input itself, and receive one
      that is one block of the output straight into it (on by default).
    name: how errors and ``repr`` name this transform (e.g. "vision->llm"); optional.
    loopback: send this rank's own rows through the transport as a message to itself instead of
      copying them locally (exercises the device path on one rank, which NCCL allows and gloo does
      not: the one-GPU self-check uses it).
    """

    def __init__(self, src: Layout, dst: Layout, group: dist.ProcessGroup | None = None,
                 backend: str = "auto", grad: str | None = "replicated",
                 wire_dtype: torch.dtype | None = None, validate: bool | None = None,
                 timeout: float | None = None, zero_copy: bool = True, name: str | None = None,
                 loopback: bool = False) -> None:
        if grad not in GRAD_MODES:
            raise ValueError(f"unknown grad mode {grad!r}; expected one of {', '.join(map(repr, GRAD_MODES))}")
        if backend != "auto" and backend not in backend_names():
            raise ValueError(f"unknown backend {backend!r}; expected auto or one of {', '.join(backend_names())}")
        if wire_dtype is not None and not isinstance(wire_dtype, torch.dtype):
            raise TypeError(f"wire_dtype must be a torch.dtype, got {wire_dtype!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        plan = get_plan(src, dst)
        gplan = engine.grad_plan(src, dst, grad)
        validate = os.environ.get("HPCOMM_VALIDATE") == "1" if validate is None else validate
        options = (grad, str(wire_dtype), zero_copy, loopback)  # what changes what crosses the wire, or how
        fingerprint = engine.fingerprint(src, dst, options)
        if name is not None:
            protocol.name_transform(fingerprint, name)
        self.spec = engine.Spec(
            src, dst, plan, gplan, grad, group, backend, wire_dtype, timeout, zero_copy, validate,
            fingerprint, tuple(dict.fromkeys(src.ranks + dst.ranks)), name, loopback)
        # out_rows made ready once per caller's object (no host read of device memory per call)
        self._rows: dict[Any, tuple[Callable[[], Any], engine.OutRows]] = {}
        self._engine = engine.Engine(self.spec)
        self._handle = torch.tensor([engine.register(self._engine)], dtype=torch.int64)
        # the registry holds engines weakly; an autograd graph holds this tensor, so a graph whose
        # Transform is gone can still run its backward
        self._handle.engine = self._engine  # type: ignore[attr-defined]
        self._anchor = torch.zeros(0, requires_grad=grad is not None)
        self._out_like: torch.Tensor | None = None
        if dist.is_available() and dist.is_initialized() and dist.get_rank() in self.spec.ranks:
            self._out_like = self._size_carrier(dist.get_rank())  # ready before any compiled call

    src = property(lambda self: self.spec.src)
    dst = property(lambda self: self.spec.dst)
    plan = property(lambda self: self.spec.plan)
    grad = property(lambda self: self.spec.grad)
    ranks = property(lambda self: self.spec.ranks)

    @property
    def fingerprint(self) -> str:
        """The transform's fingerprint as errors show it: equal on every rank for equal layouts
        and options."""
        return f"{self.spec.fingerprint:016x}"

    def __repr__(self) -> str:
        name = f"{self.spec.name!r}, " if self.spec.name else ""
        return (f"Transform({name}{_short(self.src)} -> {_short(self.dst)}, grad={self.grad!r}, "
                f"fingerprint={self.fingerprint})")

    def _size_carrier(self, rank: int) -> torch.Tensor:
        plan = self.spec.plan.rank_plan(rank)
        return torch.empty((plan.out_rows, plan.out_cols, 0) if self.spec.plan.col_mode else (plan.out_rows, 0))

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
        whose rows ``out_rows`` receive the shard; it is written in place and returned (rows not
        written keep their own autograd history). With ``async_op`` the call returns a handle at
        once; its ``wait()`` returns the result (compute in between overlaps the transfer; do not
        modify ``x`` or ``out`` until then)."""
        if not isinstance(x, torch.Tensor) and hasattr(x, "__dlpack__"):
            return self._call_array(x, out, out_rows)
        frozen = self.spec.grad is None or not torch.is_grad_enabled()
        anchor = self._anchor.detach() if frozen else self._anchor
        if torch.compiler.is_compiling() and not async_op:
            # the op reads sizes from tensors, so a new Transform every step reuses the graph; an
            # out= write is an ordinary (compiled) in-place op after it
            y = ops.transform(x.detach() if self.spec.grad is None else x, anchor, self._handle,
                              self._out_like)  # type: ignore[arg-type]  # built with the process group
            if out is None:
                return y
            if out_rows is None:
                return out.copy_(y)
            return out.index_copy_(0, torch.as_tensor(out_rows, device=out.device), y)
        rank = self._rank()
        rows: engine.OutRows | None = None
        error = None if out is None else self._out_error(x, rank, out, out_rows)
        if error is None and out is None and out_rows is not None:
            error = ValueError(f"rank {rank}: {self.spec.label}: out_rows needs out (the tensor the rows index)")
        if error is None and out_rows is not None and isinstance(x, torch.Tensor) and x.dim() > 0:
            num_rows = self._engine.output_shape(x, rank, False)[0]
            ready = self._out_rows(rank, out_rows, out, num_rows)  # type: ignore[arg-type]
            rows, error = (ready, None) if isinstance(ready, engine.OutRows) else (None, ready)
        if error is not None:
            error = failure(error, REASONS.index("a bad out= or out_rows="))
        else:
            # checked here, not only in the engine: a meta tensor never reaches the op's real
            # kernel (its fake one runs), so this rank would neither raise nor tell its peers
            error = self._engine.local_error(x, rank, backward=False)
        if error is not None:
            self._engine.start(x, rank, False, error=error)  # tells the peers, then raises
        if out is None and not async_op:
            if self.spec.identity and not self.spec.loopback:  # every rank returns its input, uncopied
                return _Alias.apply(x.detach() if self.spec.grad is None else x, anchor, self)
            with torch.set_grad_enabled(not frozen):
                return ops.transform(x, anchor, self._handle, self._sizes(rank))
        call = self._engine.start(x, rank, False, out, rows)
        index = None if rows is None else rows.index

        def wait() -> torch.Tensor:
            if frozen:
                with torch.no_grad():
                    call.finish()
                return _Into.apply(x.detach(), anchor, call.out, None, index, lambda: call.out)
            return _Into.apply(x, anchor, call.out, self, index, call.finish)

        return _Pending(wait) if async_op else wait()

    def _sizes(self, rank: int) -> torch.Tensor:
        if self._out_like is None:
            self._out_like = self._size_carrier(rank)
        return self._out_like

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
        and dst (``out``: optional {rank: preallocated y}). Same plan, kernels and execution as the
        distributed path; only the transport differs."""
        return self._simulate(inputs, backward=False, out=out)

    def simulate_backward(self, grads: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Backward for the whole world in one process: {rank: grad of y} -> {rank: grad of x}."""
        if self.spec.grad is None:
            raise ValueError("this transform has grad=None: it has no backward")
        return self._simulate(grads, backward=True)

    def stats(self, rank: int | None = None, like: torch.Tensor | None = None,
              backward: bool = False) -> dict[str, int]:
        """What ``rank`` (default: this rank) sends, receives and copies locally in forward (or
        backward), from the plan: row x column units, and bytes when ``like`` (a tensor with the
        trailing shape and dtype of the data, e.g. the input) is given."""
        rank = self._rank() if rank is None else rank
        stats = self.spec.rank_plan(rank, backward).stats()
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
            raise ValueError(f"rank {rank} is neither in src nor in dst of {self.spec.label} ({self!r})")
        self._engine.check_world(rank)  # before the op: its first call in a process takes seconds
        return rank

    def _out_error(self, x: torch.Tensor, rank: int, out: Any,
                   out_rows: torch.Tensor | Sequence[int] | None) -> Exception | None:
        if not isinstance(out, torch.Tensor):
            return TypeError(f"rank {rank}: {self.spec.label}: out must be a torch.Tensor, got {type(out).__name__}")
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None  # the input check names that
        shape = self._engine.output_shape(x, rank, False)
        if out.dtype != x.dtype or out.device != x.device:
            return ValueError(f"rank {rank}: {self.spec.label}: out is {out.dtype} on {out.device}, input is {x.dtype} "
                              f"on {x.device}")
        if not out.is_contiguous():
            return ValueError(f"rank {rank}: {self.spec.label}: out must be contiguous")
        if out.numel() and x.numel() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            return ValueError(f"rank {rank}: {self.spec.label}: out shares memory with the input; pass a "
                              f"separate tensor")
        if out_rows is None:
            if tuple(out.shape) != shape:
                return ValueError(f"rank {rank}: {self.spec.label}: out has shape {tuple(out.shape)}, the destination "
                                  f"shard is {shape}")
            return None
        if out.dim() == 0 or tuple(out.shape[1:]) != shape[1:]:
            return ValueError(f"rank {rank}: {self.spec.label}: out has trailing shape {tuple(out.shape[1:])}, the "
                              f"destination shard's is {shape[1:]}")
        return None

    def _out_rows(self, rank: int, out_rows: torch.Tensor | Sequence[int], out: torch.Tensor,
                  num_rows: int) -> engine.OutRows | Exception:
        """``out_rows`` checked and made ready (runs, and an index on out's device) once per caller's
        object: a tensor is known by its identity and version (a CUDA one is read on the host only
        then), a sequence by its value. Keep passing the same rows tensor to make no host reads."""
        key: Any = (id(out_rows), getattr(out_rows, "_version", 0)) if isinstance(out_rows, torch.Tensor) \
            else tuple(out_rows)
        key = (key, out.device, out.shape[0], num_rows)
        hit = self._rows.get(key)
        if hit is not None and (not isinstance(out_rows, torch.Tensor) or hit[0]() is out_rows):
            return hit[1]
        rows = torch.as_tensor(out_rows)
        if rows.dim() != 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            return TypeError(f"rank {rank}: {self.spec.label}: out_rows must be a 1-D integer tensor or sequence")
        values = rows.cpu().numpy()
        if len(values) != num_rows:
            return ValueError(f"rank {rank}: {self.spec.label}: out_rows has {len(values)} entries, the destination "
                              f"shard has {num_rows} rows")
        bad = values[(values < 0) | (values >= out.shape[0])]
        if len(bad):
            return ValueError(f"rank {rank}: {self.spec.label}: out_rows entry {int(bad[0])} is out of range "
                              f"[0, {out.shape[0]})")
        if len(np.unique(values)) != len(values):
            return ValueError(f"rank {rank}: {self.spec.label}: out_rows has a repeated row")
        ready = engine.OutRows.of(values, out.device)
        if len(self._rows) >= 64:  # bounded: rows built anew every step are not kept
            self._rows.pop(next(iter(self._rows)))
        ref = weakref.ref(out_rows) if isinstance(out_rows, torch.Tensor) else (lambda: None)
        self._rows[key] = (ref, ready)
        return ready

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
            error = self._engine.local_error(tensors[r], r, backward)
            if error is None and out is not None:
                error = self._out_error(tensors[r], r, out.get(r), None)
            if error is not None:
                raise error
        self._check_agreement(tensors)
        return engine.simulate(self._engine, dict(tensors), backward, None if out is None else dict(out))

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


def _short(layout: Layout) -> str:
    """A layout in a few words: its kind, ranks and rows."""
    ranks = list(layout.ranks)
    span = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)) \
        else ",".join(map(str, ranks))
    return f"{type(layout.kind).__name__.lower()}[{span}]x{layout.num_rows}"


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
    gradient of the written rows goes back through the transform (none with ``transform`` None,
    a frozen source); the rest of ``out``'s gradient flows to whatever ``out`` was before (the
    overwritten rows get none)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, out: torch.Tensor, transform: Transform | None,
                rows: torch.Tensor | None, produce: Callable[[], torch.Tensor]) -> torch.Tensor:
        produce()
        ctx.mark_dirty(out)
        ctx.transform, ctx.rows, ctx.in_shape = transform, rows, x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor
                 ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None, None, None]:
        rows = ctx.rows
        grad_x = None
        if ctx.transform is not None:
            grad_y = grad_out if rows is None else grad_out.index_select(0, rows)
            grad_x = ops.transform_backward(grad_y.contiguous(), ctx.transform._handle, list(ctx.in_shape))
        grad_base = None if rows is None else grad_out.index_fill(0, rows, 0)
        return grad_x, None, grad_base, None, None, None


class _Alias(torch.autograd.Function):
    """An identity transform (src == dst): the result is the input itself, a view on every rank
    (no copy), and the gradient still takes the collective backward path (replicas may need each
    other's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, transform: Transform) -> torch.Tensor:
        ctx.transform, ctx.in_shape = transform, x.shape
        y = transform._engine.run(x, dist.get_rank(), False)  # the identity: x itself, checked
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad_x = ops.transform_backward(grad.contiguous(), ctx.transform._handle, list(ctx.in_shape))
        return grad_x, None, None
