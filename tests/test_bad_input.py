"""Every bad input of docs/DESIGN.md raises ValueError or TypeError naming the rank or value,
before anything is sent (these run without a process group, so nothing could be sent)."""

import pytest
import torch

from hpcomm import Layout, Transform

CP = Layout.cp([0, 1], [5, 7])
CONTIG = Layout.contiguous([0, 1, 2], 12)


def sim_inputs(t, layout, x, override=None):
    inputs = {r: layout.shard(x, r) if r in layout.ranks else x[:0] for r in t.ranks}
    inputs.update(override or {})
    return inputs


X = torch.randn(12, 4)
CASES = {
    "row out of range": (lambda: Layout.from_rows({0: [0, 12]}, 12), ValueError, r"rank 0: row 12 is out of range"),
    "negative row": (lambda: Layout.from_rows({3: [-1]}, 12), ValueError, r"rank 3: row -1 is out of range"),
    "row twice on a rank": (lambda: Layout.from_rows({1: [2, 5, 2]}, 12), ValueError, r"rank 1: row 2 appears twice"),
    "negative rank": (lambda: Layout.contiguous([0, -2], 12), ValueError, r"rank -2 .* must be >= 0"),
    "duplicate rank": (lambda: Layout.replicated([4, 1, 4], 12), ValueError, r"rank 4 appears twice"),
    "non-integer rank": (lambda: Layout.contiguous([0, 1.5], 12), TypeError, r"rank 1.5"),
    "unknown cp mode": (lambda: Layout.cp([0], [3], "spiral"), ValueError, r"unknown cp mode 'spiral'"),
    "unknown dp assign": (lambda: Layout.dp([0], [3], "random"), ValueError, r"unknown dp assign 'random'"),
    "unknown backend": (lambda: Transform(CP, CONTIG, backend="mpi"), ValueError, r"unknown backend 'mpi'"),
    "unknown grad mode": (lambda: Transform(CP, CONTIG, grad="max"), ValueError, r"unknown grad mode 'max'"),
    "unknown tp mode": (lambda: Layout.grid([4], tp=2, tp_mode="ring"), ValueError, r"unknown tp_mode 'ring'"),
    "negative length": (lambda: Layout.cp([0, 1], [5, -7]), ValueError, r"seq_lens\[1\] must be >= 0, got -7"),
    "non-integer length": (lambda: Layout.dp([0, 1], [5, 2.5]), TypeError, r"sample_lens\[1\] must be an integer, got 2.5"),
    "negative num_rows": (lambda: Layout.contiguous([0], -3), ValueError, r"num_rows must be >= 0, got -3"),
    "empty rank list": (lambda: Layout.replicated([], 4), ValueError, r"ranks is empty"),
    "empty rows mapping": (lambda: Layout.from_rows({}, 4), ValueError, r"is empty"),
    "select out of range": (lambda: CP.select([1, 12]), ValueError, r"select rows: row 12 is out of range \[0, 12\)"),
    "select duplicate": (lambda: CP.select([3, 1, 3]), ValueError, r"select rows: row 3 appears twice"),
    "reversed columns": (lambda: CONTIG.with_cols({1: (3, 1)}, 4), ValueError, r"rank 1 is reversed: \(3, 1\)"),
    "columns beyond num_cols": (lambda: CONTIG.with_cols({2: (1, 6)}, 4), ValueError, r"rank 2 \(1, 6\) goes beyond num_cols=4"),
    "row counts differ": (lambda: Transform(CP, Layout.contiguous([0], 11)), ValueError, r"src has 12 rows but dst has 11"),
    "row held by no source": (lambda: Transform(Layout.from_rows({0: [0, 1], 1: [3]}, 4), Layout.replicated([2], 4)),
                              ValueError, r"destination row 2 \(held by rank 2\) is held by no source rank"),
    "columns held by no source": (lambda: Transform(CONTIG.with_cols({0: (0, 2)}, 4), Layout.replicated([5], 12)),
                                  ValueError, r"columns \[2, 4\) of row 0 \(held by destination rank 5\) are held by no source rank"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_layouts_and_transforms(name):
    fn, exc, pattern = CASES[name]
    with pytest.raises(exc, match=pattern):
        fn()


T = Transform(CP, CONTIG)


def test_wrong_row_count():
    with pytest.raises(ValueError, match=r"rank 1: transform [0-9a-f]{16}: input has 5 rows, but the layout gives this rank 6"):
        T.simulate(sim_inputs(T, CP, X, {1: torch.zeros(5, 4)}))


def test_wrong_dtype_across_ranks():
    with pytest.raises(ValueError, match=r"rank 1 passes dtype torch.float64, rank 0 passes torch.float32"):
        T.simulate(sim_inputs(T, CP, X, {1: CP.shard(X, 1).double()}))


def test_wrong_trailing_shape_across_ranks():
    with pytest.raises(ValueError, match=r"rank 2 passes trailing shape \(5,\), rank 0 passes \(4,\)"):
        T.simulate(sim_inputs(T, CP, X, {2: torch.zeros(0, 5)}))


def test_wrong_column_width():
    lay = Layout.replicated([0, 1], 12).with_cols({1: (0, 2)}, 4)
    t = Transform(lay, CONTIG.with_cols(None, 4))
    with pytest.raises(ValueError, match=r"rank 1: transform [0-9a-f]{16}: input has last dim 4, but the layout gives this rank 2 columns"):
        t.simulate({0: torch.zeros(12, 4), 1: torch.zeros(12, 4), 2: torch.zeros(0, 4)})


def test_non_tensor_input():
    with pytest.raises(TypeError, match=r"rank 0: transform [0-9a-f]{16}: input must be a torch.Tensor, got list"):
        T.simulate(sim_inputs(T, CP, X, {0: [[1.0]]}))


def test_zero_dim_input():
    with pytest.raises(ValueError, match=r"rank 0: transform [0-9a-f]{16}: input is a zero-dim tensor"):
        T.simulate(sim_inputs(T, CP, X, {0: torch.tensor(1.0)}))


def test_simulate_needs_every_rank():
    with pytest.raises(ValueError, match=r"missing \[2\], unexpected \[7\]"):
        T.simulate({0: CP.shard(X, 0), 1: CP.shard(X, 1), 7: X[:0]})


def test_bad_out_shape():
    ys = {r: torch.zeros(CONTIG.local_num_rows(r) if r in CONTIG.ranks else 0, 4) for r in T.ranks}
    ys[2] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"rank 2: transform [0-9a-f]{16}: out has shape \(3, 5\), the destination shard is \(4, 4\)"):
        T.simulate(sim_inputs(T, CP, X), out=ys)


def test_bad_layout_arguments_types():
    with pytest.raises(TypeError, match=r"rows must map rank -> row indices"):
        Layout.from_rows([[0, 1]], 2)
    with pytest.raises(TypeError, match=r"rows of rank 0 must be an integer tensor"):
        Layout.from_rows({0: torch.tensor([0.0])}, 2)
    with pytest.raises(TypeError, match=r"src and dst must be Layouts"):
        Transform(CP, "contiguous")
