"""Engine features: preallocated and scattered outputs, async calls, wire dtype, zero-copy,
identity without a copy, buffer reuse, cross-rank validation."""

import gc
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hpcomm import Layout, Transform
from hpcomm import comm
from hpcomm.engine import Engine
from hpcomm.plan import Plan
from hpcomm.segments import TorchBackend, register_backend
from strategies import shard_all

LENS = [9, 14, 3, 20]
N = sum(LENS)


def x_global(h=6, dtype=torch.float32, seed=0):
    return torch.randn(N, h, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _local(layout, x, rank):
    return layout.shard(x, rank) if rank in layout.ranks else x[:0]


def test_simulate_into_preallocated_outputs():
    src, dst = Layout.cp(range(3), LENS), Layout.dp(range(3), LENS, "balanced")
    t, x = Transform(src, dst), x_global()
    ys = {r: torch.full((dst.local_num_rows(r), 6), float("nan")) for r in t.ranks}
    out = t.simulate(shard_all(t, src, x), out=ys)
    grads = t.simulate_backward({r: torch.ones(dst.local_num_rows(r), 6) for r in t.ranks})
    for r in t.ranks:
        assert out[r] is ys[r] and torch.equal(ys[r], dst.shard(x, r))
        assert torch.equal(grads[r], torch.ones(src.local_num_rows(r), 6))


def test_wire_dtype_rounds_only_what_crosses():
    src, dst = Layout.cp(range(2), LENS), Layout.contiguous(range(2), N)
    t, x = Transform(src, dst, wire_dtype=torch.bfloat16), x_global()
    out = t.simulate(shard_all(t, src, x))
    for r in dst.ranks:
        mine = set(src.rows(r).tolist())
        for i, g in enumerate(dst.rows(r).tolist()):
            expect = x[g] if g in mine else x[g].bfloat16().float()
            assert torch.equal(out[r][i], expect)


def scatter_into_embeddings(rank, world_size):
    # the trainer's boundary: encoder rows land at image-token rows of the LLM's input embeddings
    llm = Layout.cp(range(world_size), LENS, "zigzag")
    image_rows = torch.tensor([1, 2, 3, 10, 11, 30, 31, 32, 40])
    enc = Layout.dp(range(world_size), [4, 5], "contiguous")
    boundary = llm.select(image_rows)
    t = Transform(enc, boundary)
    feats = x_global(5)[:len(image_rows)]
    x = _local(enc, feats, rank).clone().requires_grad_()
    base = torch.randn(llm.local_num_rows(rank), 5, requires_grad=True)
    emb = base * 1.0  # a non-leaf, like an embedding lookup's output
    mine = llm.rows(rank).tolist()
    out_rows = [mine.index(int(image_rows[j])) for j in boundary.rows(rank).tolist()]
    y = t(x, out=emb, out_rows=out_rows)
    same = y is emb
    weight = torch.randn(emb.shape, generator=torch.Generator().manual_seed(rank))
    (y * weight).sum().backward()
    expect = base.detach().clone()
    expect[out_rows] = boundary.shard(feats, rank)
    untouched = [i for i in range(len(mine)) if i not in out_rows]
    # expected encoder gradient: weight rows of every rank at the selected positions
    dist_weights = [torch.zeros_like(weight) for _ in range(world_size)]
    dist.all_gather(dist_weights, weight)
    full = torch.zeros(len(image_rows), 5)
    for r in range(world_size):
        for i, j in enumerate(boundary.rows(r).tolist()):
            full[j] = dist_weights[r][[llm.rows(r).tolist().index(int(image_rows[j]))][0]]
    return (same, torch.equal(emb.detach(), expect), torch.equal(x.grad, enc.shard(full, rank)),
            torch.equal(base.grad[untouched], weight[untouched]), bool((base.grad[out_rows] == 0).all()))


def test_scatter_into_larger_output_with_autograd(world):
    for rank, flags in enumerate(world(2).run(scatter_into_embeddings)):
        assert all(flags), f"rank {rank}: {flags}"


def async_overlap(rank, world_size):
    src, dst = Layout.dp(range(world_size), LENS), Layout.cp(range(world_size), LENS)
    x = _local(src, x_global(), rank).clone().requires_grad_()
    pending = Transform(src, dst)(x, async_op=True)
    busy = torch.randn(64, 64) @ torch.randn(64, 64)  # compute while the transfer is in flight
    y = pending.wait()
    y.sum().backward()
    return torch.equal(y.detach(), dst.shard(x_global(), rank)), bool((x.grad == 1).all()), busy.shape


def test_async_call_overlaps_and_differentiates(world):
    for ok_y, ok_grad, _ in world(2).run(async_overlap):
        assert ok_y and ok_grad


def zero_copy_and_identity(rank, world_size):
    lay = Layout.cp(range(world_size), LENS, "zigzag")
    x = _local(lay, x_global(), rank).clone().requires_grad_()
    y = Transform(lay, lay)(x)
    identity = y.data_ptr() == x.data_ptr()
    y.sum().backward()
    # a message that is one block of the input goes out as a view of it, not a packed copy
    big = torch.randn(64, 8192)
    seen = []
    original = comm.P2P.post

    def recording(self, sends, recvs, *args):  # the payloads (headers go on the channel)
        seen.extend(t.data_ptr() for _, t in sends)
        return original(self, sends, recvs, *args)

    comm.P2P.post = recording
    try:
        t = Transform(Layout.cp(range(world_size), [32, 32], "contiguous"),
                      Layout.contiguous(range(world_size), 64))
        xs = _local(t.src, big, rank)
        t(xs)
        t(xs)
    finally:
        comm.P2P.post = original
    lo, hi = xs.data_ptr(), xs.data_ptr() + xs.numel() * 4
    views = bool(seen) and all(lo <= p < hi for p in seen)
    # small messages that are not one block go through pooled buffers, handed back after each
    # call (zigzag -> contiguous CP: on both sides each message is two runs of 8 KiB)
    zigzag = Transform(Layout.cp(range(world_size), [32, 32], "zigzag"),
                       Layout.cp(range(world_size), [32, 32], "contiguous"))
    xz = _local(zigzag.src, big[:, :256].contiguous(), rank)
    first = zigzag(xz)
    pooled = any(zigzag._engine.pool._free.values())
    reused = torch.equal(zigzag(xz), first) and pooled
    return identity, bool((x.grad == 1).all()), views, reused


def test_zero_copy_identity_and_buffer_reuse(world):
    for rank, (identity, grad_ok, views, reused) in enumerate(world(2).run(zero_copy_and_identity)):
        assert identity, f"rank {rank}: identity transform copied"
        assert grad_ok and views, rank
        assert reused, f"rank {rank}: buffers were not returned to the pool"


def validation_catches_disagreement(rank, world_size):
    src, dst = Layout.cp(range(world_size), LENS), Layout.contiguous(range(world_size), N)
    x = _local(src, x_global(), rank)
    if rank == 2:
        x = x.double()
    try:
        Transform(src, dst, validate=True, timeout=20)(x)
    except ValueError as e:
        return str(e)
    return "no error"


def test_validation_raises_the_same_error_everywhere(world):
    messages = world(4).run(validation_catches_disagreement)
    for rank, msg in enumerate(messages):
        assert "rank 2 passes torch.float64, rank 0 passes torch.float32" in msg, (rank, msg)


def dlpack_arrays(rank, world_size):
    import numpy as np
    src, dst = Layout.cp(range(world_size), LENS), Layout.contiguous(range(world_size), N)
    x = _local(src, x_global(), rank).numpy()
    y = Transform(src, dst)(x)
    return type(y) is np.ndarray and np.array_equal(y, dst.shard(x_global(), rank).numpy())


def test_dlpack_arrays_in_and_out(world):
    # the cupy path on GPU; numpy arrays exercise the same DLPack round trip on CPU
    assert all(world(2).run(dlpack_arrays))


def identity_on_one_rank(rank, world_size):
    # rank 0 keeps exactly its rows (nothing to do there); the others swap theirs. With every
    # group member taking part the call is one collective, which rank 0 must still join.
    src = Layout.contiguous(range(world_size), 4 * world_size)
    swapped = {0: [0, 1, 2, 3], **{r: [4 * (world_size - r) + i for i in range(4)] if r > 0 else []
                                   for r in range(1, world_size)}}
    dst = Layout.from_rows(swapped, 4 * world_size)
    x = src.shard(x_global()[:4 * world_size], rank)
    y = Transform(src, dst, timeout=30)(x)
    return torch.equal(y, dst.shard(x_global()[:4 * world_size], rank))


def test_identity_rank_still_joins_the_collective(world):
    assert all(world(4).run(identity_on_one_rank))


def partial_into_rows(rank, world_size):
    # a partial source zero-fills its destination rows before adding: only those rows of out
    src, dst = Layout.replicated(range(world_size), 2).as_partial(), Layout.contiguous(range(world_size), 2)
    t = Transform(src, dst)
    weight = torch.ones(4, 3, requires_grad=True)
    base = weight * 7.0
    y = t(torch.ones(2, 3), out=base, out_rows=[2])
    coeff = torch.arange(12.0).view(4, 3)
    (y * coeff).sum().backward()
    expect = torch.full((4, 3), 7.0)
    expect[2] = float(world_size)
    grad = coeff * 7.0
    grad[2] = 0
    return torch.equal(y.detach(), expect), torch.equal(weight.grad, grad)


def test_partial_source_into_rows_keeps_the_other_rows(world):
    for flags in world(2).run(partial_into_rows):
        assert all(flags), flags


def long_trailing_shape(rank, world_size):
    lay = Layout.contiguous(range(world_size), 4)
    shape = (2,) + (1,) * 8 + ((2,) if rank == 0 else (3,))
    try:
        Transform(lay, Layout.replicated(range(world_size), 4), validate=True, timeout=20)(torch.zeros(shape))
    except ValueError as e:
        return str(e)
    return "no error"


def test_validation_compares_the_whole_trailing_shape(world):
    for msg in world(2).run(long_trailing_shape):
        assert "passes trailing dims [1, 1, 1, 1, 1, 1, 1, 1, ...]" in msg, msg


def test_nest_coverage_counts_only_what_inner_layouts_hold():
    import pytest
    outer = Layout.contiguous([0, 1], 4)
    holey = Layout.nest(outer, [Layout.from_rows({0: [0]}, 2), Layout.from_rows({1: [0, 1]}, 2)])
    with pytest.raises(ValueError, match=r"destination row 1 \(held by rank 2\) is held by no source rank"):
        Transform(holey, Layout.replicated([2], 4))
    partial_dst = Layout.nest(outer, [Layout.replicated([0], 2), Layout.from_rows({1: [0]}, 2)])
    t = Transform(Layout.from_rows({0: [0, 1, 2]}, 4), partial_dst)
    x = torch.arange(8.0).view(4, 2)
    out = t.simulate({0: x[:3], 1: x[:0]})
    assert torch.equal(out[0], x[:2]) and torch.equal(out[1], x[2:3])


def test_out_sharing_memory_with_the_input_is_refused():
    import pytest
    lay = Layout.cp([0, 1], [4, 4], "zigzag")
    t = Transform(lay, Layout.contiguous([0, 1], 8))
    ins = {r: lay.shard(torch.arange(16.0).view(8, 2), r) for r in (0, 1)}
    with pytest.raises(ValueError, match="rank 0: transform [0-9a-f]{16}: out shares memory with the input"):
        t.simulate(ins, out=ins)


class Counting(TorchBackend):
    """The reference kernels, counting table preparations and launches."""

    name = "counting"

    def __init__(self):
        self.prepared = self.launched = 0

    def _prepare(self, rows, device):
        self.prepared += 1
        return super()._prepare(rows, device)

    def _launch(self, data, src, dst, accumulate):
        self.launched += 1
        super()._launch(data, src, dst, accumulate)


def prepared_once(rank, world_size):
    counting = Counting()
    register_backend(counting)
    t = Transform(Layout.cp(range(world_size), [40, 24], "zigzag"), Layout.dp(range(world_size), [40, 24]),
                  backend="counting")
    x = torch.randn(t.src.local_num_rows(rank), 8, requires_grad=True)
    t(x).sum().backward()  # the first call of each direction prepares its tables
    after_first = counting.prepared
    for _ in range(99):
        t(x).sum().backward()
    return after_first, counting.prepared, counting.launched


def test_tables_are_prepared_once_per_plan(world):
    for rank, (first, total, launched) in enumerate(world(2).run(prepared_once)):
        assert first > 0 and total == first, f"rank {rank}: {total} preparations for {first} tables"
        assert launched >= 100, rank


def nothing_crosses(rank, world_size):
    lens = [16, 16, 16, 16]
    t = Transform(Layout.dp(range(4), lens), Layout.grid(lens, dp=2, tp=2))  # SP chunks = own samples
    x_global = torch.randn(64, 8)
    x = t.src.shard(x_global, rank).clone().requires_grad_()
    saved = comm.P2P.post

    def forbidden(self, sends, recvs, *args):
        if sends or recvs:
            raise AssertionError("a transform with nothing off-rank communicated")
        return [], []

    comm.P2P.post = forbidden
    try:
        y = t(x)
        y.backward(torch.ones_like(y))
    finally:
        comm.P2P.post = saved
    crosses = t.plan.crosses_wire(), t.spec.grad_plan.crosses_wire()
    return torch.equal(y, t.dst.shard(x_global, rank)), bool((x.grad == 1).all()), crosses


def test_nothing_off_rank_means_local_copies_only(world):
    for rank, (fwd, bwd, crosses) in enumerate(world(4).run(nothing_crosses)):
        assert fwd and bwd and crosses == (False, False), rank


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live(cls):
    return sum(type(o) is cls for o in gc.get_objects())


def _training_step(rng, step):
    """One step with layouts no earlier step had: a new Transform, forward and backward for every
    rank (simulated), through every cache the distributed path uses."""
    lens = rng.integers(1, 40, 4).tolist()
    if step % 2:
        src, dst = Layout.dp(range(2), lens, "balanced"), Layout.cp(range(2), lens, "zigzag")
    else:  # column splits go through the cached choice rule
        src = Layout.grid(lens, tp=2, tp_mode="hidden", num_cols=8)
        dst = Layout.contiguous(range(2), sum(lens)).with_cols(None, 8)
    t = Transform(src, dst)
    x = torch.ones(sum(lens), 8)
    ys = t.simulate({r: src.shard(x, r) for r in range(2)})
    t.simulate_backward(ys)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux /proc")
def test_memory_stays_flat_over_10000_steps_of_fresh_layouts():
    rng = np.random.default_rng(0)
    for step in range(2000):  # fills every bounded cache
        _training_step(rng, step)
    gc.collect()
    warm, plans, layouts, engines = _rss(), _live(Plan), _live(Layout), _live(Engine)
    for step in range(2000, 10000):
        _training_step(rng, step)
    gc.collect()
    assert _live(Plan) <= plans and _live(Layout) <= layouts + 8 and _live(Engine) <= engines
    assert _rss() - warm < 50 * 2**20, f"RSS grew by {(_rss() - warm) / 2**20:.1f} MiB over 8000 steps"
