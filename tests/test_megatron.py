"""megatron_layout against a brute force written from Megatron-Core's rank formula and the layout
semantics (DP contiguous samples, zigzag CP chunks, sequence-parallel TP split), row by row."""

import pytest
import torch

from hpcomm import Transform
from hpcomm.megatron import megatron_layout, megatron_ranks

LENS = [8, 13, 4, 20, 7]


def _tensor_split(items, k):
    return [list(part) for part in torch.tensor_split(torch.tensor(items, dtype=torch.long), k)]


def brute_force(lens, tp, cp, dp, pp, pp_rank, offset, sp, order):
    """{rank: rows}: coordinates from the mixed-radix digits of (rank - offset), fastest dim first."""
    degree = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
    dims = order.split("-")
    starts = [sum(lens[:s]) for s in range(len(lens))]
    out = {}
    for index in range(tp * cp * dp * pp):
        coord, rest = {}, index
        for d in dims:
            coord[d], rest = rest % degree[d], rest // degree[d]
        if coord["pp"] != pp_rank:
            continue
        samples = _tensor_split(list(range(len(lens))), dp)[coord["dp"]]
        rows = []
        for s in samples:
            seq = list(range(starts[s], starts[s] + lens[s]))
            chunks = _tensor_split(seq, 2 * cp)
            rows += chunks[coord["cp"]] + chunks[2 * cp - 1 - coord["cp"]]
        if sp:
            rows = _tensor_split(rows, tp)[coord["tp"]]
        out[offset + index] = [int(r) for r in rows]
    return out


@pytest.mark.parametrize("tp,cp,dp,pp,pp_rank,offset,sp,order", [
    (2, 2, 2, 1, 0, 0, True, "tp-cp-ep-dp-pp"),
    (2, 2, 2, 1, 0, 4, False, "tp-cp-ep-dp-pp"),
    (2, 1, 2, 2, 1, 8, True, "tp-cp-ep-dp-pp"),
    (2, 2, 1, 2, 0, 0, True, "tp-pp-dp-cp"),
    (1, 2, 3, 1, 0, 3, True, "tp-dp-cp-pp"),
])
def test_layout_matches_brute_force(tp, cp, dp, pp, pp_rank, offset, sp, order):
    layout = megatron_layout(LENS, tp=tp, cp=cp, dp=dp, pp=pp, pp_rank=pp_rank, rank_offset=offset,
                             sequence_parallel=sp, order=order)
    want = brute_force(LENS, tp, cp, dp, pp, pp_rank, offset, sp, order)
    assert sorted(layout.ranks) == sorted(want)
    for rank, rows in want.items():
        assert layout.rows(rank).tolist() == rows, f"rank {rank}"


def test_ranks_default_order():
    # Megatron's default: TP neighbours adjacent, then CP, then DP, stages last
    assert megatron_ranks(tp=2, cp=2, dp=2, pp=2, pp_rank=1, rank_offset=4) == list(range(12, 20))
    assert megatron_ranks(tp=2, dp=2, order="tp-dp-cp-pp", cp=2) == [0, 1, 4, 5, 2, 3, 6, 7]


@pytest.mark.parametrize("kwargs,match", [
    (dict(tp=0), "tp must be"), (dict(pp=2, pp_rank=2), "pp_rank"), (dict(rank_offset=-1), "rank_offset"),
    (dict(order="tp-cp-dp"), "order"), (dict(order="tp-cp-tp-dp-pp"), "order"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        megatron_ranks(**kwargs)


def test_mimo_boundary_simulated():
    """Encoder grid (tp=2 without SP, dp=2) on ranks 0-3 feeding image-token positions of an LLM
    grid (tp=2 with SP, cp=2) on ranks 4-7."""
    image_lens, seq_lens = [4, 6], [12, 20]
    positions = list(range(1, 5)) + list(range(12 + 3, 12 + 9))
    encoder = megatron_layout(image_lens, tp=2, dp=2, sequence_parallel=False)
    llm = megatron_layout(seq_lens, tp=2, cp=2, rank_offset=4)
    t = Transform(encoder, llm.select(positions))
    x = torch.randn(sum(image_lens), 8)
    out = t.simulate({r: encoder.shard(x, r) if r in encoder.ranks else x[:0] for r in t.ranks})
    dst = llm.select(positions)
    for r in dst.ranks:
        assert torch.equal(out[r], dst.shard(x, r))
