"""megatron_layout against a brute force written from Megatron-Core's rank formula and the layout
semantics (DP contiguous samples, zigzag CP chunks, sequence-parallel TP split), row by row."""

import pytest
import torch

from hpcomm import Layout, Transform
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


def brute_force_sbh(s, batch, tp, cp, dp, pp, pp_rank, offset, sp, order):
    """{rank: rows} of an [s, b, h] tensor (row s * B + b): Megatron's get_batch_on_this_cp_rank
    zigzag over s, the sequence-parallel scatter of the local s, DP's slice of the batch."""
    degree = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
    out = {}
    for index in range(tp * cp * dp * pp):
        coord, rest = {}, index
        for d in order.split("-"):
            coord[d], rest = rest % degree[d], rest // degree[d]
        if coord["pp"] != pp_rank:
            continue
        chunks = _tensor_split(list(range(s)), 2 * cp)
        s_rows = chunks[coord["cp"]] + chunks[2 * cp - 1 - coord["cp"]]
        if sp:
            s_rows = _tensor_split(s_rows, tp)[coord["tp"]]
        b_rows = _tensor_split(list(range(batch)), dp)[coord["dp"]]
        out[offset + index] = [int(i) * batch + int(b) for i in s_rows for b in b_rows]
    return out


@pytest.mark.parametrize("s,batch,tp,cp,dp,pp,pp_rank,offset,sp,order", [
    (16, 4, 2, 2, 2, 1, 0, 0, True, "tp-cp-ep-dp-pp"),
    (13, 3, 2, 2, 2, 1, 0, 4, False, "tp-cp-ep-dp-pp"),
    (12, 6, 2, 1, 3, 2, 1, 8, True, "tp-cp-ep-dp-pp"),
    (20, 2, 1, 2, 2, 1, 0, 0, True, "tp-dp-cp-pp"),
])
def test_sbh_layout_matches_brute_force(s, batch, tp, cp, dp, pp, pp_rank, offset, sp, order):
    layout = megatron_layout(s, tp=tp, cp=cp, dp=dp, pp=pp, pp_rank=pp_rank, rank_offset=offset,
                             sequence_parallel=sp, order=order, batch=batch)
    want = brute_force_sbh(s, batch, tp, cp, dp, pp, pp_rank, offset, sp, order)
    assert sorted(layout.ranks) == sorted(want) and layout.num_rows == s * batch
    for rank, rows in want.items():
        assert layout.rows(rank).tolist() == rows, f"rank {rank}"


def test_sbh_boundary_simulated():
    """An encoder's [s, b, h] output under dp=4 moved to an LLM's cp=2 x tp=2 [s, b, h] layout,
    and each rank's local tensor is its [s_local, b_local, h] slice."""
    s, batch, h = 12, 4, 3
    encoder = Layout.seq_first(Layout.replicated([0], s), Layout.contiguous(range(4), batch))
    llm = megatron_layout(s, tp=2, cp=2, batch=batch)
    x = torch.randn(s, batch, h)
    flat = x.reshape(s * batch, h)
    out = Transform(encoder, llm).simulate({r: encoder.shard(flat, r) for r in range(4)})
    chunks = torch.tensor_split(torch.arange(s), 4)
    for c in range(2):
        local_s = torch.cat([chunks[c], chunks[3 - c]])
        for t, part in enumerate(torch.tensor_split(local_s, 2)):
            assert torch.equal(out[2 * c + t].view(len(part), batch, h), x[part])


def test_sbh_bad_arguments():
    with pytest.raises(TypeError, match="an int"):
        megatron_layout([4, 4], batch=2)
    with pytest.raises(TypeError, match="needs batch"):
        megatron_layout(4)
    with pytest.raises(ValueError, match="batch must be"):
        megatron_layout(4, batch=-1)
