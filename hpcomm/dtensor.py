"""DTensor interop: placements on a DeviceMesh as hpcomm layouts, and ``redistribute`` between any
two meshes, disjoint ones included (DTensor's own ``redistribute`` refuses a different mesh).

The row view: a DTensor of global shape ``(n0, ..., nk)`` with k >= 1 is seen as the 2-D tensor
``[n0 * ... * n(k-1), nk]``: rows are the row-major flattened leading dims, columns the last dim.
A rank's shard of any combination of ``Shard(d)`` placements is a box, and a box is a set of such
rows (in increasing order, which is the order of the box's own row-major flattening) times a
column range. So every Shard/Replicate placement maps to ``Layout.from_rows`` (with columns when
the last dim is sharded). A 1-D DTensor is rows only. Shards follow DTensor's ``torch.chunk``
semantics: chunks of ceil(n / k), trailing ranks may get fewer or none; a dim sharded over several
mesh dims is chunked in mesh-dim order.

``Partial("sum")`` sources become partial layouts (the transform delivers the sum); as
destinations, the mesh coordinate 0 of each partial mesh dim holds the value and the other ranks
hold zeros, which is a valid partial sum.

Ranks outside the destination mesh (source-only ranks) get a DTensor on the destination mesh with
an empty local tensor, as DTensor gives every non-member, but one that stays in the autograd graph:
backward is collective, so every rank of either mesh runs backward through the result, e.g.
``out.to_local().sum().backward()`` on a source-only rank, which then receives its gradients.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.placement_types import _StridedShard

from hpcomm.layout import Layout
from hpcomm.transform import Transform

Box = tuple[tuple[int, int], ...]


def chunk_bounds(n: int, k: int, i: int) -> tuple[int, int]:
    """[start, stop) of chunk i when n items are cut by ``torch.chunk`` semantics into k parts."""
    size = -(-n // k)
    return min(i * size, n), min((i + 1) * size, n)


def _check_placements(mesh: DeviceMesh, placements: Sequence[Placement], ndim: int
                      ) -> tuple[Placement, ...]:
    placements = tuple(placements)
    if len(placements) != mesh.ndim:
        raise ValueError(f"{len(placements)} placements for a {mesh.ndim}-D mesh")
    for p in placements:
        if isinstance(p, _StridedShard):
            raise ValueError(f"placement {p} (strided shard) is not supported")
        if isinstance(p, Shard):
            if not 0 <= p.dim < ndim:
                raise ValueError(f"placement {p} shards dim {p.dim} of a {ndim}-D tensor; use a "
                                 f"non-negative dim below {ndim}")
        elif isinstance(p, Partial):
            if p.reduce_op != "sum":
                raise ValueError(f"placement {p}: only Partial('sum') maps to a layout")
        elif not isinstance(p, Replicate):
            raise TypeError(f"unknown placement {p!r}")
    return placements


def _coords(mesh: DeviceMesh) -> list[tuple[int, tuple[int, ...]]]:
    """(global rank, mesh coordinate) for every rank of the mesh, in row-major mesh order."""
    grid = mesh.mesh.cpu().numpy()
    return [(int(grid[c]), tuple(int(i) for i in c)) for c in np.ndindex(*grid.shape)]


def shard_box(mesh_shape: Sequence[int], placements: Sequence[Placement], shape: Sequence[int],
              coord: Sequence[int]) -> Box:
    """[start, stop) per tensor dim of the shard at mesh coordinate ``coord`` (torch.chunk, mesh
    dims applied in order)."""
    box = [(0, n) for n in shape]
    for m, p in enumerate(placements):
        if isinstance(p, Shard):
            lo, hi = box[p.dim]
            a, b = chunk_bounds(hi - lo, mesh_shape[m], coord[m])
            box[p.dim] = (lo + a, lo + b)
    return tuple(box)


def _box_rows(box: Box, shape: Sequence[int]) -> np.ndarray:
    """Row indices of a box in the row view, increasing."""
    lead = box[:-1] if len(shape) > 1 else box
    lead_shape = tuple(shape[:-1]) if len(shape) > 1 else tuple(shape)
    if any(b <= a for a, b in lead):
        return np.zeros(0, np.int64)
    grids = np.meshgrid(*[np.arange(a, b) for a, b in lead], indexing="ij")
    return np.ravel_multi_index([g.reshape(-1) for g in grids], lead_shape).astype(np.int64)


def _layout(mesh: DeviceMesh, placements: tuple[Placement, ...], shape: tuple[int, ...],
            holds: Callable[[tuple[int, ...]], bool]) -> Layout:
    """The row-view layout; ``holds(coord)`` says whether the rank at coord holds its box."""
    if len(shape) == 0:
        raise ValueError("a 0-dim DTensor has no rows")
    num_rows = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
    split_cols = len(shape) > 1 and any(isinstance(p, Shard) and p.dim == len(shape) - 1
                                        for p in placements)
    rows, cols = {}, {}
    for rank, coord in _coords(mesh):
        box = shard_box(mesh.mesh.shape, placements, shape, coord)
        rows[rank] = _box_rows(box, shape) if holds(coord) else np.zeros(0, np.int64)
        cols[rank] = box[-1]
    if split_cols:
        return Layout.from_rows(rows, num_rows, cols, shape[-1])
    return Layout.from_rows(rows, num_rows)


def layout_from_placements(mesh: DeviceMesh, placements: Sequence[Placement],
                           shape: Sequence[int]) -> Layout:
    """The hpcomm layout (row view, see the module docstring) of a DTensor of global ``shape``
    placed on ``mesh``. ``Partial('sum')`` gives a partial layout; it cannot be combined with
    ``Replicate`` on another mesh dim (the layout would sum the replicas too)."""
    shape = tuple(int(n) for n in shape)
    placements = _check_placements(mesh, placements, len(shape))
    if any(isinstance(p, Partial) for p in placements):
        if any(isinstance(p, Replicate) for p in placements):
            raise ValueError(f"placements {placements}: Partial with Replicate on another mesh dim "
                             f"has no layout (a partial layout sums every holder, replicas "
                             f"included); redistribute to Shard or reduce first")
        return _layout(mesh, placements, shape, lambda coord: True).as_partial()
    return _layout(mesh, placements, shape, lambda coord: True)


def _destination_layout(mesh: DeviceMesh, placements: tuple[Placement, ...],
                        shape: tuple[int, ...]) -> Layout:
    """As layout_from_placements, but a Partial mesh dim is held at coordinate 0 only (the other
    ranks get zeros)."""
    partial_dims = [m for m, p in enumerate(placements) if isinstance(p, Partial)]
    return _layout(mesh, placements, shape, lambda coord: all(coord[m] == 0 for m in partial_dims))


def placements_from_layout(layout: Layout, mesh: DeviceMesh,
                           shape: Sequence[int]) -> tuple[Placement, ...]:
    """Placements on ``mesh`` whose row view is ``layout`` (same rows and columns on every rank),
    or ValueError if none is. Tries every combination of Replicate, Partial and Shard(d)."""
    shape = tuple(int(n) for n in shape)
    candidates = [Replicate(), Partial()] + [Shard(d) for d in range(len(shape))]
    for placements in itertools.product(candidates, repeat=mesh.ndim):
        try:
            other = layout_from_placements(mesh, placements, shape)
        except ValueError:
            continue
        if _same_shards(layout, other):
            return placements
    raise ValueError(f"{layout!r} is not expressible as placements on a mesh of shape "
                     f"{tuple(mesh.mesh.shape)} for a tensor of shape {shape}")


def _same_shards(a: Layout, b: Layout) -> bool:
    if a.num_rows != b.num_rows or a.partial != b.partial or set(a.ranks) != set(b.ranks):
        return False
    width = a.num_cols if a.has_cols else b.num_cols
    for r in a.ranks:
        if not np.array_equal(a.rows(r).numpy(), b.rows(r).numpy()):
            return False
        ca = a.cols(r) if a.has_cols else (0, width)
        cb = b.cols(r) if b.has_cols else (0, width)
        if a.local_num_rows(r) and ca != cb:
            return False
    return True


@lru_cache(maxsize=256)
def _transform(src: Layout, dst: Layout) -> Transform:
    # the default "replicated": the gradients of a Replicate destination are identical copies
    # (DTensor's convention), so one copy is read per row, as in DTensor's own redistribute
    return Transform(src, dst)


def redistribute(dtensor: DTensor, device_mesh: DeviceMesh,
                 placements: Sequence[Placement]) -> DTensor:
    """``dtensor`` as a DTensor on ``device_mesh`` with ``placements``; the meshes may differ and
    be disjoint. Collective over both meshes: every rank of either mesh calls it (ranks outside
    the source mesh with the DTensor they hold, whose local tensor is empty). Autograd-aware: the
    gradient goes back to the source placements (a Partial source's gradient is Replicate, as with
    ``DTensor.from_local``)."""
    if not isinstance(dtensor, DTensor):
        raise TypeError(f"redistribute expects a DTensor, got {type(dtensor).__name__}")
    shape = tuple(dtensor.shape)
    src_mesh, src_placements = dtensor.device_mesh, tuple(dtensor.placements)
    dst_placements = _check_placements(device_mesh, placements, len(shape))
    src = layout_from_placements(src_mesh, src_placements, shape)
    dst = _destination_layout(device_mesh, dst_placements, shape)
    t = _transform(src, dst)
    rank = dist.get_rank()
    stride = _contiguous_stride(shape)
    local_in = dtensor.to_local(grad_placements=tuple(
        Replicate() if isinstance(p, Partial) else p for p in src_placements))
    if rank not in t.ranks:
        return DTensor.from_local(local_in.new_empty(0), device_mesh, dst_placements,
                                  shape=torch.Size(shape), stride=stride)
    y = t(_row_view(local_in, src, rank, shape))
    coord = device_mesh.get_coordinate()
    if coord is None:
        return _NonMember.apply(y, device_mesh, dst_placements, torch.Size(shape), stride)
    box = shard_box(device_mesh.mesh.shape, dst_placements, shape, coord)
    local_shape = tuple(b - a for a, b in box)
    if y.shape[0] == 0 and math.prod(local_shape):  # type: ignore[arg-type]  # typeshed's prod overloads
        # a zero-filled Partial replica; concatenating the empty y keeps it in the graph
        local_out = torch.cat([y.reshape(-1), y.new_zeros(math.prod(local_shape))]).view(local_shape)
    else:
        local_out = y.reshape(local_shape)
    return DTensor.from_local(local_out, device_mesh, dst_placements, shape=torch.Size(shape),
                              stride=stride)


class _NonMember(torch.autograd.Function):
    """The DTensor a rank outside the destination mesh gets: empty, as DTensor gives non-members,
    but a function of y, so that backward through it runs this rank's part of the transform's
    backward collective. (DTensor.from_local's empty stand-in is 1-D, and to_local's backward then
    rejects Shard(d > 0) placements; this one has the DTensor's ndim.)"""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, mesh: DeviceMesh, placements: tuple[Placement, ...],
                shape: torch.Size, stride: tuple[int, ...]) -> DTensor:
        ctx.y_shape = y.shape
        spec = DTensorSpec(mesh, placements, tensor_meta=TensorMeta(shape, stride, y.dtype))
        return DTensor(y.new_empty((0,) * len(shape)), spec, requires_grad=y.requires_grad)

    @staticmethod
    def backward(ctx: Any, grad: DTensor) -> tuple[torch.Tensor, None, None, None, None]:
        # y is empty: its gradient is too, but it must be a tensor for the transform to run
        return grad.to_local().new_zeros(ctx.y_shape), None, None, None, None


def _row_view(local: torch.Tensor, src: Layout, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The local tensor as the transform's input: [rows, last dim] (rows only for 1-D); on a rank
    outside the source mesh, zero rows of the full width."""
    if rank not in src.ranks:
        return local.new_zeros(0) if len(shape) == 1 else local.new_zeros(0, shape[-1])
    # a reshape even when the shard is empty, so that its (empty) gradient reaches the DTensor
    rows = src.local_num_rows(rank)
    return local.reshape(rows) if len(shape) == 1 else local.reshape(rows, local.shape[-1])


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))
