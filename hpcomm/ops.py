"""torch.library custom ops under ``hpcomm::``; each is one call into the execution layer.

- ``hpcomm::transform(x, anchor, handle, out_like)`` runs a transform's forward on this rank; its
  autograd backward is ``hpcomm::transform_backward(grad, handle, in_shape)``, the collective that
  routes the gradient back.
- ``handle`` is a one-element int64 CPU tensor naming the transform's engine, and ``out_like`` a
  zero-element tensor whose shape carries the output's size: ``[out_rows, 0]``, or
  ``[out_rows, out_cols, 0]`` when the layouts split columns. Both are data, not constants, so a
  compiled graph reads a new transform's sizes instead of specializing on them: a new layout every
  step does not mean a new graph.
- ``anchor`` is an empty tensor that requires grad whenever grad mode is on: it keeps the output in
  the autograd graph on ranks whose own input does not require grad (destination-only ranks),
  because their backward must still run to send gradients to the sources.

The unit is the whole transform: the default gradient conventions are not transposes of forward,
so pack/unpack pairs could not express them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch._library.effects import EffectType

from hpcomm import engine


def _output(x: torch.Tensor, rows: Any, cols: Any | None) -> torch.Tensor:
    shape = (rows, *x.shape[1:]) if cols is None else (rows, *x.shape[1:-1], cols)
    return x.new_empty(shape)


@torch.library.custom_op("hpcomm::transform", mutates_args=())
def transform(x: torch.Tensor, anchor: torch.Tensor, handle: torch.Tensor, out_like: torch.Tensor) -> torch.Tensor:
    y = engine.lookup(int(handle)).run(x, dist.get_rank(), False)
    return y.clone() if y is x else y  # an op's output may not alias its input (identity)


@transform.register_fake
def _(x: torch.Tensor, anchor: torch.Tensor, handle: torch.Tensor, out_like: torch.Tensor) -> torch.Tensor:
    return _output(x, out_like.shape[0], out_like.shape[1] if out_like.dim() == 3 else None)


@torch.library.custom_op("hpcomm::transform_backward", mutates_args=())
def transform_backward(grad: torch.Tensor, handle: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    return engine.lookup(int(handle)).backward(grad, dist.get_rank())


@transform_backward.register_fake
def _(grad: torch.Tensor, handle: torch.Tensor, in_shape: Sequence[int]) -> torch.Tensor:
    return grad.new_empty(in_shape)


def _transform_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.handle = inputs[2]  # the handle tensor keeps its engine alive (Transform sets that up)
    ctx.in_shape = inputs[0].shape


def _transform_grad(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
    # the anchor only keeps the output in the graph; its gradient is None (it lives on the CPU
    # whatever the data's device)
    return transform_backward(grad.contiguous(), ctx.handle, list(ctx.in_shape)), None, None, None


transform.register_autograd(_transform_grad, setup_context=_transform_setup)

# Both are collectives: a compiled graph must neither drop one whose output looks unused (the
# backward of a rank whose input needs no gradient returns nothing the graph uses, yet its peers
# wait for what it sends) nor reorder two of them (every rank must issue them in the same order).
for _op in (torch.ops.hpcomm.transform.default, torch.ops.hpcomm.transform_backward.default):
    torch.library._register_effectful_op(_op, EffectType.ORDERED)
