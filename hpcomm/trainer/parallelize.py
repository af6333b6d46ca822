"""Apply DP x CP x TP (with sequence parallelism) to one unparallel module, after the fact, the way
torchtitan's parallelize_llama does.

- TP: Megatron column-parallel wq/wk/wv/w1 (output features split, whole heads per rank) and
  row-parallel wo/w2 (input features split). Sequence parallelism: between the TP regions every
  rank holds a contiguous slice of its rows; entering a region all-gathers the rows, leaving it
  reduce-scatters the partial sums.
- CP: each rank holds part of every sequence (zigzag for the causal LLM, contiguous for the
  encoder); attention all-gathers K and V over the CP group and masks by global row id, so one
  implementation is causal-correct across zigzag chunks and sample boundaries, and non-causal for
  the encoder.
- DP: whole samples per rank; gradients are summed over the module's own ranks (see reduce_grads).

Row counts per peer come from the layouts (AttnContext), so no collective needs a size handshake.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .model import AttnContext, Block, packed_mask


@dataclass(frozen=True)
class ParallelDims:
    dp: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def parse(cls, text: str) -> "ParallelDims":
        """'dp=2,tp=2' -> ParallelDims(dp=2, cp=1, tp=2)."""
        dims = {}
        for item in filter(None, text.replace(" ", "").split(",")):
            key, _, value = item.partition("=")
            if key not in ("dp", "cp", "tp") or not value.isdigit() or int(value) < 1:
                raise ValueError(f"bad parallel degree {item!r} in {text!r} (want dp=,cp=,tp= >= 1)")
            dims[key] = int(value)
        return cls(**dims)

    @property
    def size(self) -> int:
        return self.dp * self.cp * self.tp

    def __str__(self) -> str:
        return f"dp={self.dp},cp={self.cp},tp={self.tp}"


class Mesh:
    """One module's ranks as a dp x cp x tp grid in Megatron order (TP fastest, then CP, then DP),
    with the process groups this rank needs. Groups of one rank are None (nothing to communicate).
    Must be built on every rank of the world, in the same order, because new_group is collective."""

    def __init__(self, dims: ParallelDims, ranks: list[int], rank: int):
        if dims.size != len(ranks):
            raise ValueError(f"degrees {dims} multiply to {dims.size}, but the module has "
                             f"{len(ranks)} ranks {ranks}")
        if list(ranks) != sorted(ranks):
            raise ValueError(f"module ranks must be increasing (process groups order their members "
                             f"by rank), got {ranks}")
        self.dims, self.ranks, self.rank = dims, list(ranks), rank
        grid = torch.tensor(self.ranks).view(dims.dp, dims.cp, dims.tp)
        self.tp_group, self.tp_ranks = self._group(grid.reshape(-1, dims.tp))
        self.cp_group, self.cp_ranks = self._group(grid.transpose(1, 2).reshape(-1, dims.cp))
        self.dp_cp_group, _ = self._group(grid.permute(2, 0, 1).reshape(dims.tp, -1))
        self.group, _ = self._group(grid.reshape(1, -1))

    def _group(self, rows: torch.Tensor):
        """Create one group per row of rank ids; return the one holding this rank and its ranks."""
        mine, members = None, [self.rank]
        for row in rows.tolist():
            group = dist.new_group(row) if len(row) > 1 else None
            if self.rank in row:
                mine, members = group, row
        return mine, members

    def __contains__(self, rank: int) -> bool:
        return rank in self.ranks

    def coords(self, rank: int) -> tuple[int, int, int]:
        i = self.ranks.index(rank)
        return i // (self.dims.cp * self.dims.tp), i // self.dims.tp % self.dims.cp, i % self.dims.tp


# ---------------------------------------------------------------- collectives with autograd
# Peers may hold different row counts (tensor_split of ragged sequences), so gathers pad to the
# largest count. The gradient of a gather is a reduce-scatter; gloo has no reduce_scatter, so it is
# an all-reduce of the gathered gradient followed by taking one's own rows.

def _all_gather_rows(x: torch.Tensor, group, counts: list[int]) -> torch.Tensor:
    width = max(counts)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def _own_rows(x: torch.Tensor, group, counts: list[int]) -> torch.Tensor:
    start = sum(counts[:dist.get_rank(group)])
    return x[start:start + counts[dist.get_rank(group)]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counts):
        ctx.group, ctx.counts = group, counts
        return _all_gather_rows(x, group, counts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return _own_rows(grad, ctx.group, ctx.counts), None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counts):
        ctx.group, ctx.counts = group, counts
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return _own_rows(x, group, counts)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad.contiguous(), ctx.group, ctx.counts), None, None


def sp_gather(group):
    return lambda x, ctx: _GatherRows.apply(x, group, ctx.sp_counts)


def sp_reduce_scatter(group):
    return lambda x, ctx: _ReduceScatterRows.apply(x, group, ctx.sp_counts)


def cp_gather(group):
    return lambda x, ctx: _GatherRows.apply(x, group, ctx.cp_counts)


# ---------------------------------------------------------------- applying the parallelism

def _shard(linear: nn.Linear, dim: int, tp_rank: int, tp: int) -> None:
    """Keep this rank's slice of the full weight; remember where it came from (for checks)."""
    weight = nn.Parameter(linear.weight.detach().tensor_split(tp, dim)[tp_rank].clone())
    weight.tp_shard = (dim, tp_rank, tp)
    linear.weight = weight


def parallelize(module: nn.Module, mesh: Mesh) -> nn.Module:
    """Shard `module` (VisionEncoder or LLM, full weights) in place for this rank of `mesh`."""
    _, _, tp_rank = mesh.coords(mesh.rank)
    tp = mesh.dims.tp
    for block in module.modules():
        if not isinstance(block, Block):
            continue
        attn, mlp = block.attn, block.mlp
        if tp > 1:
            heads = attn.wq.out_features // attn.head_dim
            if heads % tp:
                raise ValueError(f"tp={tp} must divide the number of attention heads ({heads})")
            for linear in (attn.wq, attn.wk, attn.wv, mlp.w1):
                _shard(linear, 0, tp_rank, tp)
            for linear in (attn.wo, mlp.w2):
                _shard(linear, 1, tp_rank, tp)
            attn.enter = mlp.enter = sp_gather(mesh.tp_group)
            attn.exit = mlp.exit = sp_reduce_scatter(mesh.tp_group)
        if mesh.dims.cp > 1:
            attn.gather_kv = cp_gather(mesh.cp_group)
    return module


def reduce_grads(module: nn.Module, mesh: Mesh) -> None:
    """Sum gradients over the module's replicas. With per-rank losses normalized by the global
    target count, the sum is the full-batch gradient. TP-sharded weights are replicated over DP x
    CP; every other weight over all of the module's ranks (sequence parallelism gives each TP rank
    different rows, so norms and embeddings get partial gradients there too, as in Megatron-SP)."""
    params = [p for p in module.parameters()]
    for p in params:
        if p.grad is None:  # a rank that held no rows this step
            p.grad = torch.zeros_like(p)
    for group, selected in ((mesh.dp_cp_group, [p for p in params if hasattr(p, "tp_shard")]),
                            (mesh.group, [p for p in params if not hasattr(p, "tp_shard")])):
        if group is None or not selected:
            continue
        flat = torch.cat([p.grad.flatten() for p in selected])
        dist.all_reduce(flat, group=group)
        for p, g in zip(selected, flat.split([p.numel() for p in selected])):
            p.grad.copy_(g.view_as(p))


def attn_context(rows_of, mesh: Mesh, seq_of_row: torch.Tensor, causal: bool) -> AttnContext:
    """Mask and peer row counts for this rank. rows_of(rank) gives a rank's global rows (local
    order) of the module's layout. Queries are the rows after the SP gather (this CP rank's rows,
    TP peers in order); keys are the rows after the CP gather (every CP peer's query rows)."""
    def cp_rows(rank):
        d, c, _ = mesh.coords(rank)
        peers = [r for r in mesh.ranks if mesh.coords(r)[:2] == (d, c)]
        return [rows_of(r) for r in peers]

    sp_parts = cp_rows(mesh.rank)
    q_rows = torch.cat(sp_parts)
    kv_parts = [torch.cat(cp_rows(r)) for r in mesh.cp_ranks]
    return AttnContext(packed_mask(q_rows, torch.cat(kv_parts), seq_of_row, causal),
                       sp_counts=[len(p) for p in sp_parts], cp_counts=[len(p) for p in kv_parts])
