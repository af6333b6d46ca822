"""torch.library custom ops under ``hpcomm::``.

- ``hpcomm::transform(x, anchor, handle)`` runs a registered Transform's forward on this rank;
  its autograd backward is ``hpcomm::transform_backward(grad, handle)``, the collective that routes
  the gradient back. Fake implementations give static output shapes from the layouts, so
  ``torch.compile(fullgraph=True)`` traces through them. ``anchor`` is an empty tensor that requires
  grad whenever grad mode is on: it keeps the output in the autograd graph on ranks whose own input
  does not require grad (destination-only ranks), because their backward must still run to send
  gradients to the sources.
- ``hpcomm::pack(x, table, numel)`` gathers segments of a flat tensor into a new buffer and
  ``hpcomm::unpack(buf, table, numel)`` scatters a buffer into a new zero-filled flat tensor; each is
  the other's backward (tables as in ``hpcomm.segments``; backend "auto").
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch._library.effects import EffectType

from hpcomm import segments

if TYPE_CHECKING:
    from hpcomm.transform import Transform

_transforms: "weakref.WeakValueDictionary[int, Transform]" = weakref.WeakValueDictionary()
_next_handle = itertools.count()


def register_transform(transform: Transform) -> int:
    """Give a Transform an integer handle that the custom ops can carry through a graph."""
    handle = next(_next_handle)
    _transforms[handle] = transform
    return handle


def _lookup(handle: int) -> Transform:
    try:
        return _transforms[handle]
    except KeyError:
        raise RuntimeError(f"hpcomm transform handle {handle} is not alive") from None


@torch.library.custom_op("hpcomm::transform", mutates_args=())
def transform(x: torch.Tensor, anchor: torch.Tensor, handle: int) -> torch.Tensor:
    return _lookup(handle)._forward(x)


@transform.register_fake
def _(x: torch.Tensor, anchor: torch.Tensor, handle: int) -> torch.Tensor:
    # under torch.compile this is where inputs are checked: Transform.__call__'s own check reads
    # cached plans (lru_cache, numpy), which Dynamo would trace instead of calling
    t = _lookup(handle)
    t._check(x, t._rank(), backward=False)
    return x.new_empty(t._output_shape(x, backward=False))


@torch.library.custom_op("hpcomm::transform_backward", mutates_args=())
def transform_backward(grad: torch.Tensor, handle: int) -> torch.Tensor:
    return _lookup(handle)._backward(grad)


@transform_backward.register_fake
def _(grad: torch.Tensor, handle: int) -> torch.Tensor:
    return grad.new_empty(_lookup(handle)._output_shape(grad, backward=True))


def _transform_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.handle = inputs[2]
    ctx.transform = _lookup(inputs[2])  # keeps the transform alive as long as the graph
    ctx.anchor_shape = inputs[1].shape


def _transform_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    # the anchor only keeps the output in the graph; its gradient is None (it lives on the CPU
    # whatever the data's device)
    return transform_backward(grad.contiguous(), ctx.handle), None, None


transform.register_autograd(_transform_grad, setup_context=_transform_setup)

# Both are collectives: a compiled graph must neither drop one whose output looks unused (the
# backward of a rank whose input needs no gradient returns nothing the graph uses, yet its peers
# wait for what it sends) nor reorder two of them (every rank must issue them in the same order).
for _op in (torch.ops.hpcomm.transform.default, torch.ops.hpcomm.transform_backward.default):
    torch.library._register_effectful_op(_op, EffectType.ORDERED)


# -- pack / unpack: the kernel contract as differentiable ops -----------------------------------


def _apply(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor, accumulate: bool) -> None:
    backend = segments.resolve_backend("auto", src.device)
    segments.copy_segments(src, dst, table.to(src.device), accumulate, backend)


@torch.library.custom_op("hpcomm::pack", mutates_args=())
def pack(x: torch.Tensor, table: torch.Tensor, numel: int) -> torch.Tensor:
    """x: flat [n]; table: [segments, 6] into a buffer of ``numel`` elements."""
    buf = x.new_zeros(numel)
    _apply(x.contiguous(), buf, table, False)
    return buf


@pack.register_fake
def _(x: torch.Tensor, table: torch.Tensor, numel: int) -> torch.Tensor:
    return x.new_empty(numel)


@torch.library.custom_op("hpcomm::unpack", mutates_args=())
def unpack(buf: torch.Tensor, table: torch.Tensor, numel: int) -> torch.Tensor:
    """buf: flat; table: [segments, 6] from the buffer into a new zero-filled flat [numel].
    Segments whose destinations overlap add up, one group after another in table order, so
    unpack is exactly the transpose of pack (an element packed twice gets both gradients)."""
    out = buf.new_zeros(numel)
    for layer in _layers(table):
        _apply(buf.contiguous(), out, layer, True)
    return out


@unpack.register_fake
def _(buf: torch.Tensor, table: torch.Tensor, numel: int) -> torch.Tensor:
    return buf.new_empty(numel)


_SWAP = [1, 0, 2, 3, 5, 4]  # a table read backwards: destination and source columns exchanged


def _layers(table: torch.Tensor) -> list[torch.Tensor]:
    """Split a table into groups of segments with disjoint destinations (the kernel contract),
    keeping table order within and across groups."""
    rows = table.tolist()
    spans = [(r[1], r[1] + (r[2] - 1) * r[5] + r[3]) if r[2] and r[3] else None for r in rows]
    layers: list[list[int]] = []
    taken: list[list[tuple[int, int]]] = []
    for i, span in enumerate(spans):
        for k, spans_k in enumerate(taken):
            if span is None or all(span[1] <= a or b <= span[0] for a, b in spans_k):
                layers[k].append(i)
                if span is not None:
                    spans_k.append(span)
                break
        else:
            layers.append([i])
            taken.append([span] if span is not None else [])
    return [table[idx] for idx in layers]


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.table, ctx.numel = inputs[1], inputs[0].numel()


def _pack_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    # pack's backward is unpack: what was gathered is scattered back, adding repeated reads
    return unpack(grad.contiguous(), ctx.table[:, _SWAP].contiguous(), ctx.numel), None, None


def _unpack_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    # unpack's backward is pack: each output element gathers the gradient of what it received
    return pack(grad.contiguous(), ctx.table[:, _SWAP].contiguous(), ctx.numel), None, None


pack.register_autograd(_pack_grad, setup_context=_setup)
unpack.register_autograd(_unpack_grad, setup_context=_setup)
