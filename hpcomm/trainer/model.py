"""The multimodal model, written without parallelism (nanoGPT style).

Everything runs on packed THD rows: a flat [rows, dim] tensor holding several samples (or images)
back to back. Attention never crosses a sample boundary: it runs per sample (one SDPA call per
segment of rows, see varlen_attention), so its memory grows with the sum of the squared sample
lengths, not with the square of the packed length. Which query row may see which key row follows
from global row ids, so the same code serves the single-process model and every parallel layout.

The model knows nothing of parallelism: parallelize.py shards its weights and installs the
sequence- and context-parallel collectives afterwards as module hooks, the way torchtitan's
parallelize_llama does. The only concession is structural: the core attention (scores and values,
no weights) is a module of its own, so that keys and values can be gathered on its way in. The
LLM's optional parts (embeddings, final norm and head) may be None, as in torchtitan, so that a
pipeline stage keeps only its share.
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
class Segment:
    """The rows of one sample seen by one rank: query positions in the local query rows, key
    positions in the (gathered) key rows, and the causal mask between them (None: all see all)."""
    q_index: torch.Tensor
    k_index: torch.Tensor
    mask: torch.Tensor | None  # [len(q_index), len(k_index)] bool


@dataclass
class AttnContext:
    """Per-forward row bookkeeping shared by all layers: the per-sample segments, and the
    collectives (x -> x, autograd-aware), set only when the module is parallelized that way."""
    segments: list[Segment]
    sp_gather: RowFn | None = None    # SP rows -> this CP rank's rows (enter a TP region)
    sp_reduce_scatter: RowFn | None = None  # partial sums of CP rows -> summed SP rows (leave)
    cp_gather: RowFn | None = None    # this CP rank's rows -> the CP group's rows (K and V)

    def to(self, device: torch.device) -> AttnContext:
        segments = [Segment(s.q_index.to(device), s.k_index.to(device),
                            None if s.mask is None else s.mask.to(device)) for s in self.segments]
        return AttnContext(segments, self.sp_gather, self.sp_reduce_scatter, self.cp_gather)


def segments(q_rows: torch.Tensor, k_rows: torch.Tensor, seq_of_row: torch.Tensor,
             causal: bool) -> list[Segment]:
    """Group query and key rows (global packed row ids, any order: zigzag CP chunks included) by
    sample. With causal=True a query sees only keys at earlier or equal rows."""
    q_seq, k_seq = seq_of_row[q_rows], seq_of_row[k_rows]
    out = []
    for s in q_seq.unique().tolist():
        qi, ki = (q_seq == s).nonzero()[:, 0], (k_seq == s).nonzero()[:, 0]
        mask = k_rows[ki][None, :] <= q_rows[qi][:, None] if causal else None
        out.append(Segment(qi, ki, mask))
    return out


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     segs: list[Segment]) -> torch.Tensor:
    """q [rows, heads, head_dim], k and v [key rows, heads, head_dim] -> [rows, heads, head_dim];
    one SDPA per sample, so no [rows, key rows] score or mask tensor ever exists."""
    out = q.new_zeros(q.shape)
    for seg in segs:
        qs, ks, vs = (t[i].transpose(0, 1) for t, i in ((q, seg.q_index), (k, seg.k_index),
                                                        (v, seg.k_index)))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask)
        out = out.index_copy(0, seg.q_index, o.transpose(0, 1))
    return out


class CoreAttention(nn.Module):
    # A Python loop over the step's samples: a compiled graph would specialize on their number
    # (and read the context), so this stays eager (a graph break) under torch.compile.
    @torch.compiler.disable
    def forward(self, q: torch.Tensor, kv: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """q [rows, heads, head_dim], kv [key rows, heads, 2 * head_dim] (K and V side by side)
        -> [rows, heads, head_dim]."""
        k, v = kv.chunk(2, -1)
        return varlen_attention(q, k, v, ctx.segments)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)
        self.core = CoreAttention()

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        # The head count follows the weights (fewer per rank once they are sharded by heads).
        q, k, v = (w(x).unflatten(-1, (-1, self.head_dim)) for w in (self.wq, self.wk, self.wv))
        return self.wo(self.core(q, torch.cat([k, v], -1), ctx).flatten(1))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, 4 * dim, bias=False)
        self.w2 = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """ctx is unused: blocks call their attention and MLP alike (see parallelize's hooks)."""
        return self.w2(F.gelu(self.w1(x)))


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
    causal = False  # the kind of attention segments its context needs

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
    write the image tokens into the input embeddings in between. Blocks are a ModuleDict so that
    a pipeline stage that drops some keeps the others' names."""
    causal = True

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tok_embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.llm_dim)
        self.pos_embed: nn.Embedding | None = nn.Embedding(cfg.max_seq_len, cfg.llm_dim)
        self.blocks = nn.ModuleDict({str(i): Block(cfg.llm_dim, cfg.llm_heads)
                                     for i in range(cfg.llm_layers)})
        self.norm: nn.LayerNorm | None = nn.LayerNorm(cfg.llm_dim)
        self.head: nn.Linear | None = nn.Linear(cfg.llm_dim, cfg.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)  # type: ignore[misc]  # called on a first stage only

    def forward(self, h: torch.Tensor, positions: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """h [T, dim] input embeddings (or hidden states from the previous pipeline stage),
        positions [T] within each sample -> logits [T, vocab] (or hidden states)."""
        x = h + self.pos_embed(positions) if self.pos_embed is not None else h
        for block in self.blocks.values():
            x = block(x, ctx)
        return self.head(self.norm(x)) if self.head is not None else x  # type: ignore[misc]


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


def model_flops(cfg: Config, seq_lens: list[int], patch_counts: list[int],
                train_encoder: bool = True) -> float:
    """Model FLOPs of one training pass over these samples (docs/TRAINER.md): 2 per multiply-add
    of every matmul (embeddings are lookups and not counted), attention scores and values per
    sample (L^2 pairs, half of them when causal), forward x 3 with backward, the encoder x 1 when
    frozen (it runs forward only)."""
    def per_token(dim: int, layers: int) -> int:
        return layers * 12 * dim * dim  # wq, wk, wv, wo (4 d^2) and the MLP (8 d^2)

    def attention(dim: int, layers: int, lens: list[int], causal: bool) -> float:
        pairs = sum(n * n for n in lens) / (2 if causal else 1)
        return layers * 2 * 2 * dim * pairs  # Q K^T and P V

    enc, llm = cfg.enc_dim, cfg.llm_dim
    enc_fwd = 2 * sum(patch_counts) * (3 * cfg.patch ** 2 * enc + per_token(enc, cfg.enc_layers)
                                       + enc * llm + llm * llm) \
        + attention(enc, cfg.enc_layers, patch_counts, False)
    llm_fwd = 2 * sum(seq_lens) * (per_token(llm, cfg.llm_layers) + llm * cfg.vocab_size) \
        + attention(llm, cfg.llm_layers, seq_lens, True)
    return 3 * llm_fwd + (3 if train_encoder else 1) * enc_fwd
