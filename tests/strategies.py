"""Hypothesis strategies for random layouts, and the brute-force semantics the tests check against."""

import numpy as np
import torch
from hypothesis import strategies as st

from hpcomm import Layout


@st.composite
def rank_sets(draw, max_ranks=8, max_id=64):
    return draw(st.lists(st.integers(0, max_id), min_size=1, max_size=max_ranks, unique=True))


@st.composite
def covering_rows(draw, ranks, num_rows, replicate=True):
    """rank -> rows (random local order) such that every row has at least one holder."""
    rows = {r: set() for r in ranks}
    for g in range(num_rows):
        rows[draw(st.sampled_from(ranks))].add(g)
        if replicate and draw(st.integers(0, 3)) == 0:
            rows[draw(st.sampled_from(ranks))].add(g)
    out = {}
    for r in ranks:
        lst = sorted(rows[r])
        if draw(st.booleans()):
            lst = draw(st.permutations(lst))
        out[r] = list(lst)
    return out


@st.composite
def source_layouts(draw, num_rows, max_ranks=8, max_id=64, cols=None):
    """A layout in which every row (and every column, with ``cols``) has a holder."""
    ranks = draw(rank_sets(max_ranks, max_id))
    if cols is not None:
        # column groups, each covering every row: the hidden-split pattern, with replication
        k = draw(st.integers(1, min(len(ranks), 3)))
        bounds = sorted(draw(st.lists(st.integers(0, cols), min_size=k - 1, max_size=k - 1)))
        bounds = [0, *bounds, cols]
        groups = [ranks[i::k] for i in range(k)]
        rows, colmap = {}, {}
        for i, grp in enumerate(groups):
            rows.update(draw(covering_rows(grp, num_rows)))
            colmap.update({r: (bounds[i], bounds[i + 1]) for r in grp})
        return Layout.from_rows(rows, num_rows, colmap, cols)
    kind = draw(st.sampled_from(["rows", "replicated", "contiguous", "dp", "cp", "grid"]))
    if kind == "rows":
        return Layout.from_rows(draw(covering_rows(ranks, num_rows)), num_rows)
    if kind == "replicated":
        return Layout.replicated(ranks, num_rows)
    if kind == "contiguous":
        return Layout.contiguous(ranks, num_rows)
    lens = draw(split_lengths(num_rows))
    if kind == "dp":
        return Layout.dp(ranks, lens, draw(st.sampled_from(["contiguous", "round_robin", "balanced"])))
    if kind == "cp":
        return Layout.cp(ranks, lens, draw(st.sampled_from(["zigzag", "contiguous"])))
    dp, cp, tp = draw(st.sampled_from([(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1),
                                       (1, 2, 2), (2, 1, 2)]))
    grid_ranks = draw(st.lists(st.integers(0, max_id), min_size=dp * cp * tp, max_size=dp * cp * tp,
                               unique=True))
    return Layout.grid(lens, dp, cp, tp, cp_mode=draw(st.sampled_from(["zigzag", "contiguous"])),
                       tp_mode=draw(st.sampled_from(["sp", "replicate"])), ranks=grid_ranks,
                       order=draw(st.sampled_from(["tp-cp-dp", "dp-tp-cp"])))


@st.composite
def split_lengths(draw, total):
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=5)))
    return list(np.diff([0, *cuts, total]))


@st.composite
def dest_layouts(draw, num_rows, max_ranks=8, max_id=64, cols=None):
    """Any layout: rows may be missing, replicated or absent; ranks may hold nothing."""
    if draw(st.booleans()):
        lay = draw(source_layouts(num_rows, max_ranks, max_id))
        if cols is not None:
            ranks = lay.ranks
            colmap = {r: tuple(sorted(draw(st.lists(st.integers(0, cols), min_size=2, max_size=2))))
                      for r in ranks}
            lay = lay.with_cols(colmap, cols)
        return lay
    ranks = draw(rank_sets(max_ranks, max_id))
    rows = {r: draw(st.permutations(sorted(draw(st.sets(st.integers(0, max(num_rows - 1, 0)),
                                                 max_size=num_rows)))))
            if num_rows else [] for r in ranks}
    lay = Layout.from_rows(rows, num_rows)
    if cols is not None:
        colmap = {r: tuple(sorted(draw(st.lists(st.integers(0, cols), min_size=2, max_size=2))))
                  for r in ranks}
        lay = lay.with_cols(colmap, cols)
    return lay


def shard_all(t, layout, x):
    """{rank: local input} for every rank of a transform: zero rows where the rank is not in layout."""
    return {r: layout.shard(x, r) if r in layout.ranks else x[:0] for r in t.ranks}


def scatter_sum(layout, shards, shape, dtype):
    """(sum, count): global tensors holding, per element, the sum of every holder's value and the
    number of holders (the oracle for the 'sum' and 'mean' gradient semantics)."""
    total = torch.zeros(shape, dtype=dtype)
    count = torch.zeros(shape, dtype=dtype)
    for r in layout.ranks:
        rows, c = layout.rows(r), layout.cols(r)
        cols = slice(None) if c is None else slice(c[0], c[1])
        total[rows, ..., cols] += shards[r]
        count[rows, ..., cols] += 1
    return total, count
