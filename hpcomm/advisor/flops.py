"""Analytic FLOPs and per-rank work of one module on one micro-batch.

Counting convention (the one torch's FlopCounterMode uses): a [m, k] x [k, n] matmul is 2mkn FLOPs;
attention is two such matmuls per (query, key) pair and head (QK^T and PV), 4 * head_dim * heads
FLOPs per pair; norms, activations, softmax and embedding lookups are not counted. Backward is
twice forward for every matmul, except that the first linear of a module whose input needs no
gradient (the encoder's patch embedding) computes only its weight gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hpcomm.layout import split_points

from .spec import ModuleDims, ModuleSpec


def block_forward_flops(m: ModuleSpec, rows: float, pairs: float) -> float:
    """One transformer block on ``rows`` rows whose attention computes ``pairs`` (query, key)
    pairs (whole model width: divide by the TP degree for one rank's share)."""
    d = m.hidden
    matmul = 2 * rows * (2 * d * d + 2 * d * m.kv_dim + (3 if m.gated else 2) * d * m.ffn)
    return matmul + 4 * pairs * d


def extra_forward_flops(m: ModuleSpec, rows: float) -> tuple[float, float]:
    """(input linear, output linears) outside the blocks: the encoder's patch embedding and
    projector, the LLM's head."""
    first = 2 * rows * m.in_features * m.hidden
    last = 2 * rows * (m.hidden * m.out_features + m.out_features ** 2) + 2 * rows * m.hidden * m.vocab
    return first, last


def module_flops(m: ModuleSpec, rows: float, pairs: float, layers: int, with_extras: bool = True,
                 train: bool = True) -> float:
    """Forward (train=False) or forward + backward FLOPs of ``layers`` blocks plus, with
    ``with_extras``, the input and output linears."""
    blocks = layers * block_forward_flops(m, rows, pairs)
    first, last = extra_forward_flops(m, rows) if with_extras else (0.0, 0.0)
    if not train or m.frozen:
        return blocks + first + last
    return 3 * (blocks + last) + 2 * first


def attention_pairs(seq_lens: Sequence[int], causal: bool) -> int:
    """Pairs a variable-length kernel computes: s^2 per sequence, or s(s+1)/2 when causal."""
    s = np.asarray(seq_lens, np.int64)
    return int((s * (s + 1) // 2).sum() if causal else (s * s).sum())


@dataclass(frozen=True)
class RankWork:
    """What the busiest rank of a module computes on one micro-batch: ``rows`` of its CP rank (the
    rows its TP group's matmuls run on), ``pairs`` attention pairs of those rows (whole width),
    ``sp_rows`` the rows it holds between TP regions, ``group_rows`` its CP group's rows."""

    rows: int
    pairs: float
    sp_rows: int
    group_rows: int


def cp_rank_rows(seq_lens: np.ndarray, cp: int, zigzag: bool) -> np.ndarray:
    """[cp, sequences] rows each CP rank holds of each sequence, tensor_split into 2cp (zigzag:
    chunks i and 2cp-1-i) or cp chunks."""
    parts = 2 * cp if zigzag else cp
    q, r = seq_lens // parts, seq_lens % parts
    i = np.arange(cp)
    per = q[None, :] + (i[:, None] < r[None, :])
    if zigzag:
        per = per + q[None, :] + ((2 * cp - 1 - i)[:, None] < r[None, :])
    return per


def rank_work(m: ModuleSpec, seq_lens: Sequence[int], dims: ModuleDims, attention: str,
              zigzag: bool) -> RankWork:
    """The busiest rank (most block FLOPs) of a dp x cp x tp grid of module ``m`` over
    ``seq_lens`` (DP: contiguous groups of whole sequences, as ``Layout.dp``)."""
    lens = np.asarray(seq_lens, np.int64)
    counts = np.diff(split_points(len(lens), dims.dp))
    if len(lens) == 0:
        return RankWork(0, 0.0, 0, 0)
    group = np.repeat(np.arange(dims.dp), counts)
    totals = np.bincount(group, lens, dims.dp)
    # [cp, groups] rows of each CP rank of each DP group; the busiest CP rank per group
    per_seq = cp_rank_rows(lens, dims.cp, zigzag)
    rows = np.stack([np.bincount(group, r, dims.dp) for r in per_seq]).max(0)
    if attention == "packed":  # each CP rank's queries meet every key of its group
        pairs = rows * totals
    else:  # zigzag balances the causal triangle: each CP rank gets an equal share of the pairs
        s_pairs = lens * (lens + 1) // 2 if m.causal and attention == "varlen" else lens * lens
        pairs = np.bincount(group, s_pairs, dims.dp) / dims.cp
    score = block_forward_flops(m, rows, pairs)  # type: ignore[arg-type]  # numpy broadcasts
    g = int(np.argmax(score))
    r = int(rows[g])
    return RankWork(r, float(pairs[g]), int(split_points(r, dims.tp)[1]), int(totals[g]))
