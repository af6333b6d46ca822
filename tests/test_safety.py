"""Misuse across ranks, with the default settings (no validation): every rank of the transform gets a
Python error within the timeout naming what differs and which ranks; no rank returns numbers, no
process aborts, nothing hangs.

Each case runs on a fresh process group of the shared 4-rank world, so what a failed call leaves
behind (messages never received) cannot reach the next case."""

import time

import pytest
import torch
import torch.distributed as dist

from hpcomm import Layout, Transform
from hpcomm.tools.launch import World

from counting import in_pieces

LENS = [17, 30, 8, 25]
N = sum(LENS)
TIMEOUT = 4.0
SLACK = 6.0  # "within timeout plus a few seconds" on a loaded 2-core machine


def attempt(fn):
    start = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the test reports whatever each rank raised)
        return time.monotonic() - start, f"{type(e).__name__}: {e}"
    return time.monotonic() - start, "no error"


def misuse(rank, world_size, case, pieces):
    with in_pieces(pieces):  # (every message of more than one run in pieces, as big ones travel)
        return _misuse(rank, world_size, case)


def _misuse(rank, world_size, case):
    group = dist.new_group(list(range(world_size)))
    ranks = list(range(world_size))
    lens = list(LENS)
    src, dst = Layout.cp(ranks, lens, "zigzag"), Layout.cp(ranks, lens, "contiguous")
    if case in ("skip_backward_dp", "stale_lengths"):
        src = Layout.dp(ranks, lens, "balanced")
    if case == "stale_lengths" and rank == 2:
        src = Layout.dp(ranks, lens[:-1] + [lens[-1] + 3], "balanced")
        dst = Layout.cp(ranks, lens[:-1] + [lens[-1] + 3], "contiguous")
    dtype = torch.float16
    if case == "dtype_same_size" and rank == 0:
        dtype = torch.bfloat16
    if case == "dtype_size":
        dtype = torch.float64 if rank == 0 else torch.float32
    t = Transform(src, dst, group=group, timeout=TIMEOUT)
    x_global = torch.arange(src.num_rows * 4, dtype=torch.float32).view(-1, 4)
    x = src.shard(x_global, rank).to(dtype)
    if case == "meta" and rank == 3:
        x = torch.empty_like(x, device="meta")

    def call():
        if case.startswith("skip_backward"):
            y = t(x.requires_grad_())
            if rank != 1:  # rank 1 skips backward and goes on to its next forward
                y.sum().backward()
            else:
                t(x.detach())
            return
        if case == "peer_fails" and rank == 2:
            raise RuntimeError("rank 2's own code failed before the transform")
        t(x)

    return attempt(call)


@pytest.mark.parametrize("case,named", [
    ("dtype_same_size", ["torch.bfloat16", "torch.float16"]),
    ("dtype_size", ["torch.float64", "torch.float32"]),
    ("skip_backward", ["skipped a backward"]),
    ("skip_backward_dp", ["skipped a backward"]),
    ("stale_lengths", ["different layouts"]),
    ("meta", ["meta"]),
    ("peer_fails", ["rank 2 did not take part"]),
])
@pytest.mark.parametrize("pieces", [False, True])
def test_every_rank_raises_naming_the_difference(world, case, named, pieces):
    results = world(4).run(misuse, case, pieces, timeout=120)
    for rank, (elapsed, message) in enumerate(results):
        assert message != "no error", f"rank {rank} returned numbers: {case}"
        assert "Received data size" not in message, message
        assert elapsed < TIMEOUT + SLACK, f"rank {rank} took {elapsed:.1f} s: {message}"
        if case == "peer_fails" and rank == 2:
            continue
        assert any(word in message for word in named), (rank, message)


def too_few_processes(rank, world_size):
    t = Transform(Layout.cp(range(4), LENS), Layout.contiguous(range(4), N), timeout=TIMEOUT)
    return attempt(lambda: t(torch.zeros(Layout.cp(range(4), LENS).local_num_rows(rank), 4)))


def test_layouts_larger_than_the_world():
    with World(2) as world:
        for elapsed, message in world.run(too_few_processes, timeout=60):
            assert message.startswith("ValueError") and "only 2 ranks" in message, message
            assert elapsed < 1.0, elapsed


def subset_misuse(rank, world_size, case):
    """A transform over ranks 0-1 of a 4-rank world: peers swap headers pairwise."""
    if rank > 1:
        return 0.0, "not in the transform"
    src, dst = Layout.cp([0, 1], LENS, "zigzag"), Layout.cp([0, 1], LENS, "contiguous")
    t = Transform(src, dst, timeout=TIMEOUT)
    dtype = torch.float64 if case == "dtype_size" and rank == 0 else torch.float32
    x = src.shard(torch.randn(N, 4), rank).to(dtype)
    if case == "stale_lengths" and rank == 1:
        t = Transform(Layout.cp([0, 1], LENS[:-1] + [LENS[-1] + 2], "zigzag"),
                      Layout.cp([0, 1], LENS[:-1] + [LENS[-1] + 2], "contiguous"), timeout=TIMEOUT)
        x = t.src.shard(torch.randn(N + 2, 4), rank)
    return attempt(lambda: t(x))


@pytest.mark.parametrize("case,named", [("dtype_size", "torch.float64"), ("stale_lengths", "different layouts")])
def test_pairwise_headers_when_the_transform_is_a_subset_of_its_group(world, case, named):
    for rank, (elapsed, message) in enumerate(world(4).run(subset_misuse, case, timeout=120)[:2]):
        assert message.startswith("ValueError") and named in message, (rank, message)
        assert elapsed < TIMEOUT + SLACK, (rank, elapsed)


def refused_then_reused(rank, world_size):
    """A refused call leaves its sends unreceived; the group's next calls must not receive them."""
    src, dst = Layout.cp([0, 1], LENS, "zigzag"), Layout.cp([0, 1], LENS, "contiguous")
    x_global = torch.randn(N, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bad = src.shard(x_global, rank).to(torch.float32 if rank == 0 else torch.float64)
    refused = attempt(lambda: Transform(src, dst, timeout=TIMEOUT)(bad))[1]
    good = [Transform(src, dst, timeout=TIMEOUT)(src.shard(x_global, rank)) for _ in range(2)]
    return refused, all(torch.equal(y, dst.shard(x_global, rank)) for y in good)


def test_a_refused_call_leaves_the_group_usable(world):
    for refused, ok in world(2).run(refused_then_reused, timeout=120):
        assert refused.startswith("ValueError") and ok, refused


def compiled_loop_with_a_skipped_backward(rank, world_size, pieces):
    """A compiled step with a new layout every step; at step 2 rank 1 skips its backward."""
    with in_pieces(pieces):
        return _compiled_loop_with_a_skipped_backward(rank, world_size)


def _compiled_loop_with_a_skipped_backward(rank, world_size):
    proj = torch.nn.Linear(4, 4)
    step = torch.compile(lambda x, t: proj(t(x * 2)).square().sum(), fullgraph=True, backend="aot_eager")
    for i in range(3):
        lens = [5 + i, 7, 3 + 2 * i]
        t = Transform(Layout.cp([0, 1], lens, "zigzag"), Layout.dp([0, 1], lens, "balanced"), timeout=TIMEOUT)
        x = torch.randn(t.src.local_num_rows(rank), 4, requires_grad=True)
        loss = step(x, t)
        if i == 2 and rank == 1:
            return attempt(lambda: step(x.detach(), t))  # the next forward instead of the backward
        if i == 2:
            return attempt(loss.backward)
        loss.backward()


@pytest.mark.parametrize("pieces", [False, True])
def test_compiled_loop_with_a_skipped_backward(world, pieces):
    for rank, (elapsed, message) in enumerate(world(2).run(compiled_loop_with_a_skipped_backward, pieces,
                                                           timeout=300)):
        assert message.startswith("ValueError") and "skipped a backward" in message, (rank, message)
        assert elapsed < TIMEOUT + SLACK, (rank, elapsed)
