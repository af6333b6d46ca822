"""Boundary traffic of a candidate, from hpcomm's own layouts and plans.

The encoder's output rows (one per image token, image after image) move to the image-token rows of
the LLM's first pipeline stage, exactly as the trainer's ``Transform(enc, llm.select(image_rows))``.
Two exact ways to count what the busiest rank sends and receives:

- ``plan`` (worlds up to PLAN_WORLD ranks): ``get_plan(src, dst).rank_plan(r).stats()`` for every
  rank r of the boundary.
- ``owners`` (larger worlds): both layouts are partitions (every row has one holder: DP, CP and
  sequence-parallel TP never replicate), so the plan's rule (a row the destination already holds
  is copied locally, any other row is sent once by its only holder) reduces to counting, per rank,
  rows it holds in src but not in dst (sent) and in dst but not in src (received). Each row's
  holder comes from ``grid_owners``, the grid's closed form in O(rows) numpy (building every rank's
  runs, or the plan's holder index, costs seconds at 1,024 ranks). The tests check plan, owner
  counting, the closed form and a brute-force count against each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from hpcomm.layout import Layout, expand_runs, split_points
from hpcomm.megatron import megatron_layout, megatron_ranks
from hpcomm.plan import get_plan

from .flops import cp_rank_rows
from .spec import Candidate, ModuleDims, Sample

PLAN_WORLD = 64


@dataclass(frozen=True)
class BoundaryStats:
    """Rows of one micro-batch's boundary transform (one direction; backward mirrors it):
    the busiest rank's rows sent, received and its peer count, and all rows crossing the wire."""

    sent: int
    received: int
    peers: int
    total: int
    busiest_rank: int


def image_rows(samples: tuple[Sample, ...]) -> np.ndarray:
    """Rows of the image tokens in the packed LLM sequence, in order of appearance."""
    out, offset = [], 0
    for s in samples:
        n = sum(s.image_tokens)
        out.append(np.arange(offset + s.image_offset, offset + s.image_offset + n))
        offset += s.seq_len
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def encoder_layout(candidate: Candidate, samples: tuple[Sample, ...]) -> Layout:
    """Encoder rows (images as sequences, contiguous CP, SP over TP) on the encoder's ranks: the
    LLM's first-stage ranks when colocated, ranks 0.. when not."""
    e, llm = candidate.encoder, candidate.llm
    images = [n for s in samples for n in s.image_tokens]
    if candidate.placement == "noncolocated":
        ranks = list(range(e.size))
    else:
        ranks = megatron_ranks(llm.tp, llm.cp, llm.dp, llm.pp)
    return Layout.grid(images, dp=e.dp, cp=e.cp, tp=e.tp, cp_mode="contiguous", ranks=ranks)


def llm_layout(candidate: Candidate, samples: tuple[Sample, ...]) -> Layout:
    """The LLM's first-stage token layout (zigzag CP, sequence parallel)."""
    d = candidate.llm
    return megatron_layout([s.seq_len for s in samples], tp=d.tp, cp=d.cp, dp=d.dp, pp=d.pp,
                           rank_offset=candidate.llm_rank_offset())


def boundary_layouts(candidate: Candidate, samples: tuple[Sample, ...]) -> tuple[Layout, Layout]:
    """(source, destination) of the boundary transform of one micro-batch. A homogeneous encoder
    runs on the LLM's own rows of the images (the trainer's ``--encoder inherit``): nothing moves."""
    dst = llm_layout(candidate, samples).select(image_rows(samples))
    if candidate.placement == "homogeneous":
        return dst, dst
    return encoder_layout(candidate, samples), dst


def plan_stats(src: Layout, dst: Layout) -> BoundaryStats:
    """Exact, from hpcomm's plan for every rank of the boundary."""
    plan = get_plan(src, dst)
    best = (-1, 0, 0, 0, 0)
    total = 0
    for rank in sorted(set(src.ranks) | set(dst.ranks)):
        st = plan.rank_plan(rank).stats()
        total += st["sent"]
        key = (max(st["sent"], st["received"]), st["sent"], st["received"],
               max(st["messages_out"], st["messages_in"]), rank)
        best = max(best, key)
    _, sent, received, peers, rank = best
    return BoundaryStats(sent, received, peers, total, rank)


def owners(layout: Layout) -> np.ndarray:
    """[num_rows] the one rank holding each row (the layout must be a partition)."""
    out = np.full(layout.num_rows, -1, np.int64)
    held = 0
    for r in layout.ranks:
        rows = expand_runs(*layout.runs(r))
        out[rows] = r
        held += len(rows)
    if held != layout.num_rows or (out < 0).any():
        raise ValueError("owner counting needs a partition: every row held by exactly one rank")
    return out


def grid_owners(seq_lens: Sequence[int], dims: ModuleDims, ranks: Sequence[int], zigzag: bool,
                rows: np.ndarray | None = None) -> np.ndarray:
    """[rows] the holder of each of ``rows`` (default: every row) of ``Layout.grid(seq_lens, dp,
    cp, tp, tp_mode="sp", order="tp-cp-dp", ranks=ranks)``, in numpy work proportional to the rows
    asked for, instead of one runs() call per rank (the tests check it against ``owners``)."""
    lens = np.asarray(seq_lens, np.int64)
    k = dims.cp
    offsets = np.concatenate([[0], np.cumsum(lens)])
    rows = np.arange(offsets[-1]) if rows is None else np.asarray(rows, np.int64)
    seq = np.searchsorted(offsets, rows, "right") - 1
    pos = rows - offsets[seq]
    parts = 2 * k if zigzag else k
    q, r = lens // parts, lens % parts
    qs, rs = q[seq], r[seq]
    big = rs * (qs + 1)  # the first r chunks have q + 1 rows
    chunk = np.where(pos < big, pos // (qs + 1), rs + (pos - big) // np.maximum(qs, 1))
    chunk_start = chunk * qs + np.minimum(chunk, rs)
    c = np.minimum(chunk, parts - 1 - chunk) if zigzag else chunk
    # local index on CP rank c: rows c holds of earlier sequences, then chunk c before chunk
    # parts-1-c within this sequence
    per_seq = cp_rank_rows(lens, k, zigzag)  # [cp, sequences]
    first = q[None, :] + (np.arange(k)[:, None] < r[None, :])  # size of chunk c of each sequence
    seq_group = np.repeat(np.arange(dims.dp), np.diff(split_points(len(lens), dims.dp)))
    group_start = split_points(len(lens), dims.dp)[:-1]
    before = np.cumsum(per_seq, 1) - per_seq  # rows of earlier sequences, all groups
    before = before - before[:, group_start[seq_group]]  # ... of earlier sequences of the group
    second = chunk != c
    flat = c * len(lens) + seq  # index into [cp, sequences] tables, flattened
    local = before.ravel()[flat] + pos - chunk_start + np.where(second, first.ravel()[flat], 0)
    held = np.stack([np.bincount(seq_group, w, dims.dp) for w in per_seq]).astype(np.int64)
    group = seq_group[seq]
    t = _sp_part(local, held.ravel()[c * dims.dp + group], dims.tp)
    return np.asarray(ranks, np.int64)[(group * k + c) * dims.tp + t]


def _sp_part(local: np.ndarray, held: np.ndarray, tp: int) -> np.ndarray:
    """Part of each local row when ``held`` rows are tensor_split into tp parts."""
    q, r = held // tp, held % tp
    big = r * (q + 1)
    return np.where(local < big, local // (q + 1), r + (local - big) // np.maximum(q, 1))


def candidate_owners(candidate: Candidate, samples: tuple[Sample, ...]) -> tuple[np.ndarray, np.ndarray]:
    """[image rows] holders of every boundary row in the source and the destination."""
    llm, enc = candidate.llm, candidate.encoder
    enc_ranks = (tuple(range(enc.size)) if candidate.placement == "noncolocated"
                 else tuple(megatron_ranks(llm.tp, llm.cp, llm.dp, llm.pp)))
    llm_ranks = tuple(megatron_ranks(llm.tp, llm.cp, llm.dp, llm.pp,
                                     rank_offset=candidate.llm_rank_offset()))
    dst = _owners_cached(samples, llm, llm_ranks, "llm")
    if candidate.placement == "homogeneous":
        return dst, dst
    return _owners_cached(samples, enc, enc_ranks, "encoder"), dst


@lru_cache(maxsize=64)
def _owners_cached(samples: tuple[Sample, ...], dims: ModuleDims, ranks: tuple[int, ...],
                   which: str) -> np.ndarray:
    """Candidates of one search share module layouts: each is resolved once."""
    if which == "encoder":
        return grid_owners([n for s in samples for n in s.image_tokens], dims, ranks, zigzag=False)
    return grid_owners([s.seq_len for s in samples], dims, ranks, zigzag=True, rows=image_rows(samples))


def owner_stats(src: Layout | np.ndarray, dst: Layout | np.ndarray) -> BoundaryStats:
    """Exact for partitions (see the module docstring), in O(rows) numpy work."""
    s = owners(src) if isinstance(src, Layout) else src
    d = owners(dst) if isinstance(dst, Layout) else dst
    size = int(max(s.max(initial=0), d.max(initial=0))) + 1
    moved = s != d
    sent = np.bincount(s[moved], minlength=size)
    received = np.bincount(d[moved], minlength=size)
    pairs = np.unique(s[moved] * size + d[moved])
    peers_out = np.bincount(pairs // size, minlength=size)
    peers_in = np.bincount(pairs % size, minlength=size)
    # the busiest rank, ties broken as plan_stats does: more sent, received, peers, higher rank
    rank = int(np.lexsort((np.arange(size), np.maximum(peers_out, peers_in), received, sent,
                           np.maximum(sent, received)))[-1])
    return BoundaryStats(int(sent[rank]), int(received[rank]),
                         int(max(peers_out[rank], peers_in[rank])), int(moved.sum()), rank)


@lru_cache(maxsize=4096)
def boundary_stats(candidate: Candidate, samples: tuple[Sample, ...]) -> BoundaryStats:
    """The boundary of one micro-batch, by plan in small worlds and by owner counting in large
    ones (where the busiest rank's figures come from its own rank_plan)."""
    if candidate.world_size <= PLAN_WORLD:
        return plan_stats(*boundary_layouts(candidate, samples))
    return owner_stats(*candidate_owners(candidate, samples))
