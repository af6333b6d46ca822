"""Sequence metadata and padded CP layouts against brute force: per-row Python loops over the
packed sequences, and padded tensors built by padding each sequence and cutting it by hand."""

import time

import pytest
import torch

from hpcomm import Layout, Transform
from hpcomm.metadata import gather_lengths, padded_cp, seq_metadata
from hpcomm.tools.launch import World

LENS = [5, 7, 1, 16, 0, 9]


def brute_metadata(rows, lens):
    seq_of, pos_of, start = {}, {}, 0
    for s, n in enumerate(lens):
        for i in range(n):
            seq_of[start + i], pos_of[start + i] = s, i
        start += n
    seq_ids, cu = [], [0]
    for j, row in enumerate(rows):
        if j == 0 or seq_of[row] != seq_of[rows[j - 1]]:
            if j:
                cu.append(j)
            seq_ids.append(seq_of[row])
    cu = cu + [len(rows)] if rows else [0]
    return seq_ids, cu, [pos_of[r] for r in rows]


@pytest.mark.parametrize("layout", [
    Layout.cp(range(3), LENS, "zigzag"), Layout.cp(range(2), LENS, "contiguous"),
    Layout.dp(range(4), LENS, "balanced"), Layout.grid(LENS, dp=2, cp=2, tp=2),
], ids=["zigzag", "cp-contiguous", "dp-balanced", "grid"])
def test_seq_metadata_matches_brute_force(layout):
    for r in layout.ranks:
        m = seq_metadata(layout, LENS, r)
        seq_ids, cu, pos = brute_metadata(layout.rows(r).tolist(), LENS)
        assert m.seq_ids.tolist() == seq_ids, f"rank {r}"
        assert m.cu_seqlens.tolist() == cu and m.cu_seqlens.dtype == torch.int32, f"rank {r}"
        assert m.position_ids.tolist() == pos, f"rank {r}"


def brute_padded(x, lens, k, mode, multiple):
    """{cp rank: padded local tensor}: each sequence zero-padded, then cut into chunks."""
    out, start = {c: [] for c in range(k)}, 0
    for n in lens:
        m = -(-n // multiple) * multiple
        seq = torch.cat([x[start:start + n], x.new_zeros(m - n, *x.shape[1:])])
        start += n
        parts = 2 * k if mode == "zigzag" else k
        chunks = torch.tensor_split(seq, parts)
        for c in range(k):
            out[c] += [chunks[c], chunks[parts - 1 - c]] if mode == "zigzag" else [chunks[c]]
    return {c: torch.cat(v) for c, v in out.items()}


@pytest.mark.parametrize("k,mode,multiple", [(2, "zigzag", None), (3, "zigzag", None),
                                             (2, "contiguous", None), (2, "zigzag", 8)])
def test_padded_cp_transform_and_pad(k, mode, multiple):
    ranks = list(range(1, k + 1))  # CP on ranks 1..k, the source DP on ranks 0..1
    p = padded_cp(LENS, ranks, mode, multiple)
    mult = multiple or (2 * k if mode == "zigzag" else k)
    assert all(n % mult == 0 and n - mult < m <= n for m, n in zip(LENS, p.padded_lens))
    src = Layout.dp([0, 1], LENS)
    x = torch.randn(sum(LENS), 3, dtype=torch.float64, requires_grad=True)
    t = Transform(src, p.layout)
    sent = sum(t.stats(r)["sent"] for r in t.ranks)
    assert sent <= sum(LENS), "pad rows must never cross the wire"
    out = t.simulate({r: src.shard(x.detach(), r) if r in src.ranks else x.detach()[:0]
                      for r in t.ranks})
    want = brute_padded(x.detach(), LENS, k, mode, mult)
    for c, r in enumerate(ranks):
        padded = p.pad(out[r], r)
        assert torch.equal(padded, want[c]), f"rank {r}"
        m = p.metadata(r)
        seq_ids, cu, pos = brute_metadata(p.padded.rows(r).tolist(), p.padded_lens)
        assert (m.seq_ids.tolist(), m.cu_seqlens.tolist(), m.position_ids.tolist()) == (seq_ids, cu, pos)
    # pad is differentiable and gives pad rows no gradient
    y = p.layout.shard(x, ranks[0])
    g = torch.randn(p.padded.local_num_rows(ranks[0]), 3, dtype=torch.float64)
    (p.pad(y, ranks[0]) * g).sum().backward()
    expected = torch.zeros_like(x)
    expected[p.layout.rows(ranks[0])] = g[p.real_positions(ranks[0])]
    assert torch.equal(x.grad, expected)


def test_bad_input():
    with pytest.raises(ValueError, match="sum to"):
        seq_metadata(Layout.contiguous([0, 1], 10), [3, 3], 0)
    with pytest.raises(ValueError, match="multiple"):
        padded_cp([4], [0, 1], multiple=0)
    p = padded_cp([4, 3], [0, 1])
    with pytest.raises(ValueError, match="rank 0"):
        p.pad(torch.zeros(1, 2), 0)


def _gather(rank, world_size, lens_by_rank, timeout=30.0):
    return gather_lengths(lens_by_rank[rank], timeout=timeout)


def _gather_and_layout(rank, world_size):
    # each rank loads its own samples: rank r has r + 1 of them (rank 2: none)
    mine = [] if rank == 2 else [10 * rank + i for i in range(rank + 1)]
    by_rank = gather_lengths(torch.tensor(mine, dtype=torch.int32))
    layout = Layout.dp_by_rank(by_rank)
    seq_lens = [n for lens in by_rank.values() for n in lens]
    return by_rank, layout.rows(rank).tolist(), seq_lens


@pytest.mark.parametrize("size", [2, 4])
def test_gather_lengths_in_a_real_world(world, size):
    lens = {r: [r + 1] * r + [0, 7] for r in range(size)}
    for result in world(size).run(_gather, lens):
        assert result == lens and list(result) == sorted(result)
    if size == 4:
        expect = {0: [0], 1: [10, 11], 2: [], 3: [30, 31, 32, 33]}
        seq_lens = [0, 10, 11, 30, 31, 32, 33]
        for rank, (by_rank, rows, got_lens) in enumerate(world(size).run(_gather_and_layout)):
            assert by_rank == expect and got_lens == seq_lens
            start = sum(sum(expect[r]) for r in range(rank))
            assert rows == list(range(start, start + sum(expect[rank])))


def _bad(rank, world_size):
    try:
        gather_lengths([3, -2] if rank == 1 else [4])
    except ValueError as e:
        return str(e)
    return "no error"


def test_gather_lengths_bad_input_raises_on_every_rank(world):
    messages = world(2).run(_bad)
    assert "rank 1" in messages[1] and "-2" in messages[1]
    assert "rank(s) [1]" in messages[0]


def _late(rank, world_size):
    time.sleep(3.0 * rank)  # rank 1 joins after rank 0 gave up
    start = time.monotonic()
    try:
        gather_lengths([1], timeout=1.0)
    except TimeoutError:
        return time.monotonic() - start
    return None


def test_gather_lengths_times_out_instead_of_hanging():
    with World(2) as w:  # its own world: a timed-out collective leaves the group unusable
        waited = w.run(_late, timeout=60)
    assert all(t is not None and t < 10 for t in waited), waited


def test_dp_by_rank_matches_definition():
    lay = Layout.dp_by_rank({3: [2, 1], 0: [4], 5: []})
    assert lay.ranks == (0, 3, 5)
    assert rows_of(lay) == {0: [0, 1, 2, 3], 3: [4, 5, 6], 5: []}
    with pytest.raises(ValueError, match=r"sample lengths of rank 3\[1\] must be >= 0, got -1"):
        Layout.dp_by_rank({3: [2, -1]})
    with pytest.raises(TypeError, match="lens_by_rank"):
        Layout.dp_by_rank([[1]])


def rows_of(layout):
    return {r: layout.rows(r).tolist() for r in layout.ranks}
