"""The multimodal model, written without parallelism (nanoGPT style).

Everything runs on packed THD rows: a flat [rows, dim] tensor holding several samples (or images)
back to back. Attention never crosses a sample boundary; which query row may see which key row is
an explicit boolean mask built from global row ids, so the same code serves the single-process model
and every parallel layout (parallelize.py only changes which rows a rank holds and gathers).

Parallelism hooks: each attention/MLP block calls ``self.enter`` before its first linear,
``self.exit`` after its last one and ``self.gather_kv`` on its keys and values. They are identities
here; parallelize.py replaces them with sequence-parallel and context-parallel collectives, the way
torchtitan's parallelize_llama rewires an unparallel model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 259
    patch: int = 4
    max_grid: int = 16          # patches per image side
    max_seq_len: int = 256      # tokens per sample
    enc_dim: int = 64
    enc_heads: int = 4
    enc_layers: int = 2
    llm_dim: int = 96
    llm_heads: int = 4
    llm_layers: int = 2


RowFn = Callable[[torch.Tensor], torch.Tensor]  # rows -> rows, autograd-aware


@dataclass
class AttnContext:
    """Per-forward row bookkeeping. mask[i, j]: query row i may attend key row j, where the key rows
    are whatever gather_kv produces. The collectives (x -> x, autograd-aware) are set only when the
    module is parallelized that way."""
    mask: torch.Tensor                   # [query rows, key rows] bool
    sp_gather: RowFn | None = None    # SP rows -> this CP rank's rows (enter a TP region)
    sp_reduce_scatter: RowFn | None = None  # partial sums of CP rows -> summed SP rows (leave)
    cp_gather: RowFn | None = None    # this CP rank's rows -> the CP group's rows (K and V)


def packed_mask(q_rows: torch.Tensor, k_rows: torch.Tensor, seq_of_row: torch.Tensor,
                causal: bool) -> torch.Tensor:
    """Queries see keys of their own sample, and with causal=True only earlier or equal rows.
    Rows are global packed row ids, so this is correct for any permutation (zigzag CP chunks)."""
    mask = seq_of_row[q_rows][:, None] == seq_of_row[k_rows][None, :]
    if causal:
        mask &= k_rows[None, :] <= q_rows[:, None]
    return mask


def identity(x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    return x


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.enter = self.exit = self.gather_kv = identity

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = self.enter(x, ctx)
        # Local head count follows the (possibly tensor-parallel sharded) weights.
        q, k, v = (w(x).unflatten(-1, (-1, self.head_dim)) for w in (self.wq, self.wk, self.wv))
        # [rows, local heads, head_dim]; K and V travel together (one collective under CP).
        k, v = self.gather_kv(torch.cat([k, v], -1), ctx).chunk(2, -1)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        return self.exit(self.wo(out.transpose(0, 1).flatten(1)), ctx)


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, 4 * dim, bias=False)
        self.w2 = nn.Linear(4 * dim, dim, bias=False)
        self.enter = self.exit = identity

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return self.exit(self.w2(F.gelu(self.w1(self.enter(x, ctx)))), ctx)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), MLP(dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), ctx)
        return x + self.mlp(self.norm2(x), ctx)


class VisionEncoder(nn.Module):
    """ViT over variable-resolution images: patches of all images packed as rows, learned row and
    column position embeddings, bidirectional attention within each image, then a projector to the
    LLM hidden size."""
    causal = False  # the kind of mask (packed_mask) its attention context needs

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(3 * cfg.patch * cfg.patch, cfg.enc_dim)
        self.row_embed = nn.Embedding(cfg.max_grid, cfg.enc_dim)
        self.col_embed = nn.Embedding(cfg.max_grid, cfg.enc_dim)
        self.blocks = nn.ModuleList(Block(cfg.enc_dim, cfg.enc_heads)
                                    for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(cfg.enc_dim)
        self.projector = nn.Sequential(nn.Linear(cfg.enc_dim, cfg.llm_dim), nn.GELU(),
                                       nn.Linear(cfg.llm_dim, cfg.llm_dim))

    def forward(self, patches: torch.Tensor, grid: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """patches [N, 3*p*p], grid [N, 2] -> image tokens [N, llm_dim]."""
        x = self.patch_embed(patches) + self.row_embed(grid[:, 0]) + self.col_embed(grid[:, 1])
        for block in self.blocks:
            x = block(x, ctx)
        return self.projector(self.norm(x))


class LLM(nn.Module):
    """Decoder-only LM over packed samples. embed() and forward() are separate so the trainer can
    write the image tokens into the input embeddings in between."""
    causal = True

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.llm_dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.llm_dim)
        self.blocks = nn.ModuleList(Block(cfg.llm_dim, cfg.llm_heads)
                                    for _ in range(cfg.llm_layers))
        self.norm = nn.LayerNorm(cfg.llm_dim)
        self.head = nn.Linear(cfg.llm_dim, cfg.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """h [T, dim] input embeddings, positions [T] within each sample -> logits [T, vocab]."""
        x = h + self.pos_embed(positions)
        for block in self.blocks:
            x = block(x, ctx)
        return self.head(self.norm(x))


class MultimodalModel(nn.Module):
    def __init__(self, cfg: Config, seed: int = 0) -> None:
        super().__init__()
        # Full weights from one seed on every rank, sharded afterwards: the single-process model is
        # an exact reference for every layout.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.encoder, self.llm = VisionEncoder(cfg), LLM(cfg)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)
