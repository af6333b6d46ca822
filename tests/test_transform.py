"""Transform semantics on simulated worlds (up to 64 ranks): forward equals slicing the global
tensor, round trips are bitwise, gradients follow the documented conventions, and the adjoint
identity holds in float64."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hpcomm import Layout, Transform
from strategies import dest_layouts, scatter_sum, shard_all, source_layouts

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.int32, torch.int8, torch.bool]


def random_tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


@st.composite
def pairs(draw, max_ranks=8, max_id=64, cols=False):
    num_rows = draw(st.integers(0, 24))
    width = draw(st.integers(1, 6)) if cols else None
    src = draw(source_layouts(num_rows, max_ranks, max_id, cols=width))
    dst = draw(dest_layouts(num_rows, max_ranks, max_id, cols=width))
    return src, dst, width


def check_forward(src, dst, x, backend="auto"):
    t = Transform(src, dst, backend=backend)
    out = t.simulate(shard_all(t, src, x))
    for r in t.ranks:
        expect = dst.shard(x, r) if r in dst.ranks else x[:0] if not dst.has_cols else x[:0, ..., :0]
        if r not in dst.ranks and dst.has_cols:
            assert out[r].shape[0] == 0
            continue
        assert out[r].dtype == x.dtype and torch.equal(out[r], expect), r
    return t, out


@given(pairs(), st.sampled_from(DTYPES), st.integers(0, 2**31))
def test_forward_equals_slicing(pair, dtype, seed):
    src, dst, _ = pair
    check_forward(src, dst, random_tensor((src.num_rows, 2, 3), dtype, seed))


@given(pairs(max_ranks=64, max_id=10**6), st.integers(0, 2**31))
def test_forward_many_ranks(pair, seed):
    src, dst, _ = pair
    check_forward(src, dst, random_tensor((src.num_rows, 3), torch.float32, seed))


@given(pairs(cols=True), st.integers(0, 2**31))
def test_forward_with_column_splits(pair, seed):
    src, dst, width = pair
    check_forward(src, dst, random_tensor((src.num_rows, 2, width), torch.float32, seed))


@given(st.integers(0, 24).flatmap(lambda n: st.tuples(source_layouts(n), source_layouts(n))),
       st.sampled_from(DTYPES), st.integers(0, 2**31))
def test_round_trip_is_bitwise(pair, dtype, seed):
    a, b = pair
    x = random_tensor((a.num_rows, 5), dtype, seed)
    there = Transform(a, b).simulate(shard_all(Transform(a, b), a, x))
    back = Transform(b, a).simulate(there)
    for r in a.ranks:
        assert torch.equal(back[r], a.shard(x, r))


def inner(xs, ys):
    return sum(float((xs[r].double() * ys[r].double()).sum()) for r in xs)


@given(pairs(cols=True), st.booleans(), st.integers(0, 2**31))
def test_adjoint_identity_float64(pair, partial, seed):
    src, dst, width = pair
    if partial:
        src = src.as_partial()
    t = Transform(src, dst, grad="adjoint")
    g = torch.Generator().manual_seed(seed)
    # every rank's input is independent (replicas need not agree): this is the linear map itself
    xs = {r: torch.randn(src.local_num_rows(r) if r in src.ranks else 0, 2,
                         t.plan.width(src, r), generator=g, dtype=torch.float64) for r in t.ranks}
    ys = t.simulate(xs)
    gys = {r: torch.randn(ys[r].shape, generator=g, dtype=torch.float64) for r in t.ranks}
    gxs = t.simulate_backward(gys)
    assert inner(ys, gys) == pytest.approx(inner(xs, gxs), rel=1e-12, abs=1e-12)


@given(pairs(cols=True), st.booleans(), st.sampled_from(["sum", "mean"]), st.integers(0, 2**31))
def test_gradient_conventions(pair, partial, mode, seed):
    src, dst, width = pair
    if partial:
        src = src.as_partial()
    t = Transform(src, dst, grad=mode)
    g = torch.Generator().manual_seed(seed)
    gys = {r: torch.randn(dst.local_num_rows(r) if r in dst.ranks else 0, 2, t.plan.width(dst, r),
                          generator=g, dtype=torch.float64) for r in t.ranks}
    total, count = scatter_sum(dst, gys, (src.num_rows, 2, width), torch.float64)
    expect = total if mode == "sum" else total / count.clamp(min=1)
    gxs = t.simulate_backward(gys)
    for r in src.ranks:
        # every source replica (and every partial holder) receives the full gradient
        torch.testing.assert_close(gxs[r], src.shard(expect, r), rtol=1e-12, atol=1e-12)


def test_partial_source_sums_in_rank_order():
    parts = [torch.randn(6, 4) for _ in range(3)]
    src = Layout.replicated([2, 0, 1], 6).as_partial()
    dst = Layout.contiguous([0, 1], 6)
    out = Transform(src, dst).simulate({r: parts[r] for r in (0, 1, 2)})
    total = torch.zeros(6, 4) + parts[2] + parts[0] + parts[1]
    assert torch.equal(torch.cat([out[0], out[1]]), total)


def test_replica_choice_prefers_local_and_spreads():
    src = Layout.replicated([0, 1, 2, 3], 8)
    dst = Layout.contiguous([0, 4, 5, 6, 7], 8)
    plan = Transform(src, dst).plan
    assert plan.rank_plan(0).recvs == () and plan.rank_plan(0).stats()["copied"] == 2
    sources = [plan.rank_plan(r).recvs[0][0] for r in (4, 5, 6, 7)]
    assert sorted(sources) == [0, 1, 2, 3]


def test_plan_is_cached_and_built_once():
    a, b = Layout.cp([0, 1], [9, 4]), Layout.contiguous([0, 1, 2], 13)
    assert Transform(a, b).plan is Transform(a, b).plan
    assert Transform(a, b).plan.rank_plan(1) is Transform(a, b).plan.rank_plan(1)
