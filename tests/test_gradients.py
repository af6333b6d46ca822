"""Gradient conventions against brute force in float64 ("replicated", the default, and grad=None for
frozen sources); the bytes "replicated" moves; frozen sources in a real gloo world."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hpcomm import Layout, Transform
from strategies import dest_layouts, scatter_sum, source_layouts

LENS = [9, 4, 7, 12]


@st.composite
def pairs(draw, cols=False):
    n = draw(st.integers(0, 24))
    width = 5
    src = draw(source_layouts(n, cols=width if cols else None))
    dst = draw(dest_layouts(n, cols=width if cols else None))
    return src, dst, width


def holders_grad(dst, gys, shape):
    """{(row, col): {rank: value}}: every destination holder's gradient of every element."""
    out: dict = {}
    for r in dst.ranks:
        c = dst.cols(r) or (0, shape[-1])
        for i, row in enumerate(dst.rows(r).tolist()):
            for j in range(c[0], c[1]):
                out.setdefault((row, j), {})[r] = gys[r][i, ..., j - c[0]]
    return out


@given(pairs(cols=True), st.booleans(), st.integers(0, 2**31))
def test_replicated_reads_one_holder_the_local_one_first(pair, partial, seed):
    src, dst, width = pair
    if partial:
        src = src.as_partial()
    t = Transform(src, dst)  # the default convention
    assert t.grad == "replicated"
    g = torch.Generator().manual_seed(seed)
    # replicas deliberately differ, to see whose gradient each source element got
    gys = {r: torch.randn(dst.local_num_rows(r) if r in dst.ranks else 0, 2, t.plan.width(dst, r),
                          generator=g, dtype=torch.float64) for r in t.ranks}
    gxs = t.simulate_backward(gys)
    held = holders_grad(dst, gys, (src.num_rows, 2, width))
    for s in src.ranks:
        c = src.cols(s) or (0, width)
        for i, row in enumerate(src.rows(s).tolist()):
            for j in range(c[0], c[1]):
                got = gxs[s][i, ..., j - c[0]]
                candidates = held.get((row, j), {})
                if not candidates:
                    assert torch.equal(got, torch.zeros_like(got))  # no destination read it
                elif s in candidates:
                    assert torch.equal(got, candidates[s]), "the local holder's gradient is read"
                else:
                    assert any(torch.equal(got, v) for v in candidates.values())


@given(pairs(cols=True), st.integers(0, 2**31))
def test_replicated_equals_sum_over_distinct_holders_when_replicas_agree(pair, seed):
    src, dst, width = pair
    t = Transform(src, dst)
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(src.num_rows, 2, width, generator=g, dtype=torch.float64)
    gys = {r: dst.shard(full, r) if r in dst.ranks else full[:0, ..., :t.plan.width(dst, r)] for r in t.ranks}
    _, count = scatter_sum(dst, gys, full.shape, torch.float64)
    expect = full * (count > 0)
    gxs = t.simulate_backward(gys)
    for r in src.ranks:
        torch.testing.assert_close(gxs[r], src.shard(expect, r), rtol=0, atol=0)


def test_replicated_fan_in_moves_no_more_backward_than_forward():
    # encoder DP=4 -> LLM DP=2 x TP=2, TP ranks replicated (no sequence parallelism), colocated
    enc = Layout.dp(range(4), LENS, "balanced")
    llm = Layout.grid(LENS, dp=2, tp=2, tp_mode="replicate")
    replicated, summed = Transform(enc, llm), Transform(enc, llm, grad="sum")
    fwd = sum(replicated.stats(r)["sent"] for r in range(4))
    bwd = sum(replicated.stats(r, backward=True)["sent"] for r in range(4))
    assert 0 < bwd <= fwd
    assert bwd < sum(summed.stats(r, backward=True)["sent"] for r in range(4))


def test_frozen_source_has_no_backward():
    src, dst = Layout.cp([0, 1], LENS, "zigzag"), Layout.contiguous([0, 1], sum(LENS))
    t = Transform(src, dst, grad=None)
    with pytest.raises(ValueError, match="grad=None"):
        t.simulate_backward({0: torch.zeros(16, 2), 1: torch.zeros(16, 2)})


def frozen(rank, world_size):
    src, dst = Layout.dp([0], LENS), Layout.cp([1, 2], LENS, "zigzag")  # encoder on 0, LLM on 1-2
    t = Transform(src, dst, grad=None)
    x_global = torch.randn(sum(LENS), 3, generator=torch.Generator().manual_seed(0))
    x = (src.shard(x_global, rank) if rank in src.ranks else x_global[:0]).clone().requires_grad_()
    if rank == 0:
        y = t(x)
        return y.requires_grad, None, None  # the encoder never calls backward
    # the LLM writes the image rows into its own embeddings, which keep their history elsewhere
    base = torch.ones(dst.local_num_rows(rank) + 3, 3, requires_grad=True)
    emb = base * 2
    rows = torch.arange(dst.local_num_rows(rank)) + 3
    out = t(x, out=emb, out_rows=rows)
    out.sum().backward()
    written = torch.equal(out[rows].detach(), dst.shard(x_global, rank))
    untouched = bool((base.grad[:3] == 2).all()) and bool((base.grad[rows] == 0).all())
    return out.requires_grad, written, untouched


def test_frozen_encoder_noncolocated(world):
    results = world(3).run(frozen)
    assert results[0] == (False, None, None)
    for rank in (1, 2):
        in_graph, written, untouched = results[rank]
        assert in_graph and written, rank
        assert untouched, f"rank {rank}: rows not written must keep their own gradient, written rows none"


def replicas_disagree(rank, world_size, same):
    t = Transform(Layout.contiguous([0, 1], 8), Layout.replicated([0, 1], 8), validate=True, timeout=20)
    x = torch.randn(4, 2, requires_grad=True)
    y = t(x)
    gy = torch.ones(8, 2) * (1 if same else rank + 1)
    try:
        y.backward(gy)
    except ValueError as e:
        return str(e)
    return bool((x.grad == gy[:4]).all())


def test_validation_checks_replicas_agree_under_replicated(world):
    assert world(2).run(replicas_disagree, True) == [True, True]
    for message in world(2).run(replicas_disagree, False):
        assert "gradients differ under grad='replicated'" in message and "grad='sum'" in message, message
