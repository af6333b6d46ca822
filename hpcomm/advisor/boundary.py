"""Boundary traffic of a candidate, from hpcomm's own layouts and plans.

The encoder's output rows (one per image token, image after image) move to the image-token rows of
the LLM's first pipeline stage, exactly as the trainer's ``Transform(enc, llm.select(image_rows))``.
Two exact ways to count what the busiest rank sends and receives:

- ``plan`` (worlds up to PLAN_WORLD ranks): ``get_plan(src, dst).rank_plan(r).stats()`` for every
  rank r of the boundary.
- ``owners`` (larger worlds): both layouts are partitions (every row has one holder: DP, CP and
  sequence-parallel TP never replicate), so the plan's rule (a row the destination already holds
  is copied locally, any other row is sent once by its only holder) reduces to counting, per rank,
  rows it holds in src but not in dst (sent) and in dst but not in src (received). The tests check
  both against each other and against a brute-force count; the busiest rank's numbers are
  additionally read from its own ``rank_plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hpcomm.layout import Layout, expand_runs
from hpcomm.megatron import megatron_layout, megatron_ranks
from hpcomm.plan import get_plan

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
    """(source, destination) of the boundary transform of one micro-batch."""
    return (encoder_layout(candidate, samples),
            llm_layout(candidate, samples).select(image_rows(samples)))


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


def owner_stats(src: Layout, dst: Layout) -> BoundaryStats:
    """Exact for partitions (see the module docstring), in O(rows) numpy work."""
    s, d = owners(src), owners(dst)
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
    src, dst = boundary_layouts(candidate, samples)
    if candidate.world_size <= PLAN_WORLD:
        return plan_stats(src, dst)
    stats = owner_stats(src, dst)
    st = get_plan(src, dst).rank_plan(stats.busiest_rank).stats()
    return BoundaryStats(st["sent"], st["received"], max(st["messages_out"], st["messages_in"]),
                         stats.total, stats.busiest_rank)


def homogeneous_encoder(llm: ModuleDims) -> ModuleDims:
    """The encoder's degrees when it inherits the LLM's layout (pipeline aside)."""
    return ModuleDims(dp=llm.dp, cp=llm.cp, tp=llm.tp)
