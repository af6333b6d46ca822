"""Apply DP x CP x TP (with sequence parallelism) and PP to one unparallel module, after the fact,
the way torchtitan's parallelize_llama and pipeline_llama do.

- TP: Megatron column-parallel wq/wk/wv/w1 (output features split, whole heads per rank) and
  row-parallel wo/w2 (input features split). Sequence parallelism: between the TP regions every
  rank holds a contiguous slice of its rows; entering a region all-gathers the rows, leaving it
  reduce-scatters the partial sums.
- CP: each rank holds part of every sequence (zigzag for the causal LLM, contiguous for the
  encoder); attention all-gathers K and V over the CP group and masks by global row id, so one
  implementation is causal-correct across zigzag chunks and sample boundaries, and non-causal for
  the encoder.
- DP: whole samples per rank; gradients are summed over the module's own ranks (see reduce_grads).
- PP (the LLM): consecutive blocks per stage (pipeline_split); stage s holds ranks
  [s * n, (s + 1) * n) of the module's ranks and is a DP x CP x TP mesh of its own.
- compile (apply_compile): each block under torch.compile with dynamic shapes; the collectives
  and the per-sample attention loop stay eager, so layouts that change every step do not recompile.

All row bookkeeping comes from hpcomm layouts; the SP and CP collectives are hpcomm transforms,
installed as forward hooks on the unparallel modules (the model has no parallelism hooks of its own).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from hpcomm import Layout, Transform

from .dims import ParallelDims
from .model import LLM, AttnContext, Block, segments

_M = TypeVar("_M", bound=nn.Module)


class Mesh:
    """One module's ranks as a dp x cp x tp grid in Megatron order (TP fastest, then CP, then DP),
    with the process groups this rank needs. Groups of one rank are None (nothing to communicate).
    Must be built on every rank of the world, in the same order, because new_group is collective."""

    def __init__(self, dims: ParallelDims, ranks: list[int], rank: int) -> None:
        if dims.pp != 1:
            raise ValueError(f"a Mesh is one pipeline stage; got {dims}")
        if dims.size != len(ranks):
            raise ValueError(f"degrees {dims} multiply to {dims.size}, but the module has "
                             f"{len(ranks)} ranks {ranks}")
        self.dims, self.ranks, self.rank = dims, list(ranks), rank
        grid = torch.tensor(self.ranks).view(dims.dp, dims.cp, dims.tp)
        d, c, t = self.coords(rank) if rank in self.ranks else (0, 0, 0)
        self.tp_ranks = grid[d, c, :].tolist()  # this rank's TP peers (SP split), TP order
        self.cp_ranks = grid[d, :, t].tolist()  # its CP peers, CP order
        # Gradient reduction groups: TP-sharded weights are replicated over DP x CP, the others
        # over all of the module's ranks. (TP and CP traffic goes through hpcomm transforms.)
        self.dp_cp_group = self._group(grid.permute(2, 0, 1).reshape(dims.tp, -1))
        self.group = self._group(grid.reshape(1, -1))

    def _group(self, rows: torch.Tensor) -> dist.ProcessGroup | None:
        """Create one group per row of rank ids; return the one holding this rank."""
        mine = None
        for row in rows.tolist():
            group = dist.new_group(row) if len(row) > 1 else None
            if self.rank in row:
                mine = group
        return mine

    def __contains__(self, rank: int) -> bool:
        return rank in self.ranks

    def coords(self, rank: int) -> tuple[int, int, int]:
        i = self.ranks.index(rank)
        return i // (self.dims.cp * self.dims.tp), i // self.dims.tp % self.dims.cp, i % self.dims.tp


# ---------------------------------------------------------------- collectives
# The model's own collectives are hpcomm transforms too, built per micro-batch by attn_context
# from the layouts (so ragged row counts need no padding and no size handshake). The gathers'
# replicas hold partial gradients (each TP rank's heads, each CP rank's queries), so they sum them
# (grad="sum"): the SP gather's backward is a reduce-scatter, the CP K/V gather's a reduce-scatter
# of the key/value gradients; the reduce-scatter's (a partial source) is an all-gather.
# They run eagerly under torch.compile, between graph pieces: their timing (CommClock) is host code.


class CommClock:
    """Seconds this rank spends inside communication calls, forward and backward, by kind
    ("boundary", "pipeline", "model", "grads"); they include the time waiting for peers."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        # Transform calls of this rank whose backward has not run yet, by call number: kind. A
        # step must end with none (see pending_backward).
        self.pending: dict[int, str] = {}
        self._calls = 0

    def wrap(self, kind: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """fn timed in forward and (through autograd node hooks) in backward."""
        def call(x: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = fn(x, **kwargs)
            self.seconds[kind] += time.perf_counter() - start
            if y.grad_fn is not None:
                started: list[float] = []
                key = self._calls
                self._calls += 1
                self.pending[key] = kind
                y.grad_fn.register_prehook(lambda grads: started.append(time.perf_counter()))
                y.grad_fn.register_hook(lambda grads_in, grads_out: self._add(kind, started, key))
            return y
        return call

    def _add(self, kind: str, started: list[float], key: int) -> None:
        self.seconds[kind] += time.perf_counter() - started[-1]
        self.pending.pop(key, None)

    def pending_backward(self) -> dict[str, int]:
        """Transform calls with autograd history whose backward never ran, per kind, and forget
        them. Backward is collective, so a rank that skips one (its output did not reach any
        root this rank called backward on) leaves its peers waiting in that backward forever."""
        counts: dict[str, int] = defaultdict(int)
        for kind in self.pending.values():
            counts[kind] += 1
        self.pending.clear()
        return dict(counts)


@torch.compiler.disable
def sp_gather(x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    return ctx.sp_gather(x)  # type: ignore[misc]  # set by attn_context when tp > 1


@torch.compiler.disable
def sp_reduce_scatter(x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    return ctx.sp_reduce_scatter(x)  # type: ignore[misc]  # set by attn_context when tp > 1


@torch.compiler.disable
def cp_gather(x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    return ctx.cp_gather(x)  # type: ignore[misc]  # set by attn_context when cp > 1


# Module hooks (torchtitan's PrepareModuleInput / PrepareModuleOutput): args are (x, ctx) for a
# TP region and (q, kv, ctx) for the core attention. The collectives are looked up when called.

def _enter_tp_region(module: nn.Module, args: tuple[torch.Tensor, AttnContext]
                     ) -> tuple[torch.Tensor, AttnContext]:
    x, ctx = args
    return sp_gather(x, ctx), ctx


def _leave_tp_region(module: nn.Module, args: tuple[torch.Tensor, AttnContext],
                     out: torch.Tensor) -> torch.Tensor:
    return sp_reduce_scatter(out, args[1])


def _gather_kv(module: nn.Module, args: tuple[torch.Tensor, torch.Tensor, AttnContext]
               ) -> tuple[torch.Tensor, torch.Tensor, AttnContext]:
    q, kv, ctx = args  # K and V travel together: one collective
    return q, cp_gather(kv, ctx), ctx


@torch.compiler.disable
def keep_in_graph(out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor,
                  ctx: AttnContext) -> torch.Tensor:
    """The core attention's output, made to depend on q and kv when this rank has no query rows.

    With no query rows (no segments: e.g. a CP rank whose zigzag chunks of every sample of the
    micro-batch hold no image tokens, so the encoder gives it no rows) varlen_attention returns a
    fresh empty tensor that reads neither q nor the gathered K/V. Autograd would then never reach
    the transforms that produced them (the CP K/V gather, through q/k/v the attention region's SP
    gather) and this rank would skip their backward, while its peers, which have queries, run it
    and wait for this rank's (zero) partial gradients forever: transform backward is collective.
    The zero-weight term adds nothing to the (empty) output and gives q and kv zero gradients at
    the same point of the backward graph as on every other rank, so every rank runs the same
    transform backwards in the same order."""
    if ctx.segments:  # every query row is in a segment, and every segment reads q, K and V
        return out
    return out + (q.sum() + kv.sum()) * 0


def _keep_inputs_in_graph(module: nn.Module,
                          args: tuple[torch.Tensor, torch.Tensor, AttnContext],
                          out: torch.Tensor) -> torch.Tensor:
    q, kv, ctx = args  # after the pre-hooks: kv is the gathered K/V under CP
    return keep_in_graph(out, q, kv, ctx)


# ---------------------------------------------------------------- applying the parallelism

def _shard(linear: nn.Linear, dim: int, tp_rank: int, tp: int) -> None:
    """Keep this rank's slice of the full weight; remember where it came from (for checks)."""
    weight = nn.Parameter(linear.weight.detach().tensor_split(tp, dim)[tp_rank].clone())
    weight.tp_shard = (dim, tp_rank, tp)  # type: ignore[attr-defined]
    linear.weight = weight


def parallelize(module: _M, mesh: Mesh) -> _M:
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
            for region in (attn, mlp):
                region.register_forward_pre_hook(_enter_tp_region)
                region.register_forward_hook(_leave_tp_region)
        if mesh.dims.cp > 1:
            attn.core.register_forward_pre_hook(_gather_kv)
        if tp > 1 or mesh.dims.cp > 1:  # q, k and v come out of transforms (see keep_in_graph)
            attn.core.register_forward_hook(_keep_inputs_in_graph)
    return module


def reduce_grads(module: nn.Module, mesh: Mesh) -> None:
    """Sum gradients over the module's replicas. With per-rank losses normalized by the global
    target count, the sum is the full-batch gradient. TP-sharded weights are replicated over DP x
    CP; every other weight over all of the module's ranks (sequence parallelism gives each TP rank
    different rows, so norms and embeddings get partial gradients there too, as in Megatron-SP)."""
    params = list(module.parameters())
    for p in params:
        if p.grad is None:  # a rank that held no rows this step
            p.grad = torch.zeros_like(p)
    for group, selected in ((mesh.dp_cp_group, [p for p in params if hasattr(p, "tp_shard")]),
                            (mesh.group, [p for p in params if not hasattr(p, "tp_shard")])):
        if group is None or not selected:
            continue
        flat = torch.cat([p.grad.flatten() for p in selected])  # type: ignore[union-attr]  # set above
        dist.all_reduce(flat, group=group)
        for p, g in zip(selected, flat.split([p.numel() for p in selected])):
            p.grad.copy_(g.view_as(p))  # type: ignore[union-attr]


def pipeline_split(llm: LLM, stage: int, num_stages: int) -> LLM:
    """Keep this stage's share of `llm` in place: consecutive blocks (tensor_split), the embeddings
    on the first stage, the final norm and head on the last."""
    keys = list(llm.blocks.keys())
    if len(keys) < num_stages:
        raise ValueError(f"pp={num_stages} needs at least as many LLM layers ({len(keys)})")
    mine = {keys[i] for i in torch.arange(len(keys)).tensor_split(num_stages)[stage].tolist()}
    for key in keys:
        if key not in mine:
            del llm.blocks[key]
    if stage > 0:
        llm.tok_embed = llm.pos_embed = None
    if stage < num_stages - 1:
        llm.norm = llm.head = None
    return llm


def apply_compile(module: nn.Module, backend: str = "inductor") -> None:
    """Compile each block (torchtitan's apply_compile). Row counts change every step, so shapes
    are dynamic from the start; the collectives and the per-sample attention graph-break."""
    for block in module.modules():
        if isinstance(block, Block):
            block.compile(backend=backend, dynamic=True)


def attn_context(layout: Layout, mesh: Mesh, seq_of_row: torch.Tensor, causal: bool,
                 clock: CommClock) -> AttnContext:
    """Segments and collectives of this rank for one micro-batch whose rows follow `layout` (the
    module's Layout.grid, or any layout over the same mesh). Queries are this CP rank's rows (its
    TP peers' SP rows, in order), keys every CP peer's query rows, so the segments come from the
    very rows the gathers deliver. Each collective is a transform between two descriptions of the
    same global rows."""
    def cp_rows(rank: int) -> torch.Tensor:
        d, c, _ = mesh.coords(rank)
        return torch.cat([layout.rows(r) for r in mesh.ranks if mesh.coords(r)[:2] == (d, c)])

    q_rows = cp_rows(mesh.rank)
    k_rows = torch.cat([cp_rows(r) for r in mesh.cp_ranks])
    ctx = AttnContext(segments(q_rows, k_rows, seq_of_row, causal))
    n = layout.num_rows
    if mesh.dims.tp > 1:
        sp = Layout.from_rows({r: layout.rows(r) for r in mesh.tp_ranks}, n)
        cp_local = {r: q_rows for r in mesh.tp_ranks}
        ctx.sp_gather = clock.wrap("model", Transform(sp, Layout.from_rows(cp_local, n), grad="sum"))
        # Row-parallel outputs are partial sums; the transform delivers their sum.
        ctx.sp_reduce_scatter = clock.wrap(
            "model", Transform(Layout.from_rows(cp_local, n, partial=True), sp))
    if mesh.dims.cp > 1:
        ctx.cp_gather = clock.wrap("model", Transform(
            Layout.from_rows({r: cp_rows(r) for r in mesh.cp_ranks}, n),
            Layout.from_rows({r: k_rows for r in mesh.cp_ranks}, n), grad="sum"))
    return ctx
