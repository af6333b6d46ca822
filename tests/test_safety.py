"""Misuse across ranks, with the default settings (no validation): the rank at fault and every rank
that exchanges data with it get a Python error within the timeout naming what differs and which
ranks; a rank that exchanges nothing with it may return, and then its numbers are exact; no process
aborts, nothing hangs.

Each case runs on a fresh process group of the shared 4-rank world, so what a failed call leaves
behind (messages never received) cannot reach the next case."""

import time

import pytest
import torch
import torch.distributed as dist

from hpcomm import Layout, Transform
from hpcomm.tools.launch import World


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


# the rank at fault in each case
FAULTY = {"dtype_same_size": 0, "dtype_size": 0, "skip_backward": 1, "skip_backward_dp": 1,
          "stale_lengths": 2, "meta": 3, "peer_fails": 2}


def misuse(rank, world_size, case):
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
    t = Transform(src, dst, group=group, timeout=TIMEOUT, name="vision->llm")
    x_global = torch.arange(src.num_rows * 4, dtype=torch.float32).view(-1, 4)
    x = src.shard(x_global, rank).to(dtype)
    if case == "meta" and rank == 3:
        x = torch.empty_like(x, device="meta")

    exact = []  # a rank that returns: are its numbers exact?

    def call():
        if case.startswith("skip_backward"):
            xr = x.float().requires_grad_()
            y = t(xr)
            if rank != 1:  # rank 1 skips backward and goes on to its next forward
                y.sum().backward()
                exact.append(torch.equal(xr.grad, torch.ones_like(xr)))
            else:
                t(x.float())
            return
        if case == "peer_fails" and rank == 2:
            raise RuntimeError("rank 2's own code failed before the transform")
        exact.append(torch.equal(t(x).float(), dst.shard(x_global, rank).to(dtype).float()))

    elapsed, message = attempt(call)
    # the ranks that exchange rows with the rank at fault, in the direction it misbehaves in
    agreed = Transform(Layout.dp(ranks, lens, "balanced") if case in ("skip_backward_dp", "stale_lengths") else
                       Layout.cp(ranks, lens, "zigzag"), Layout.cp(ranks, lens, "contiguous"))
    plan = agreed.spec.rank_plan(FAULTY[case], case.startswith("skip_backward"))
    peers = {p for p, _ in plan.sends} | {p for p, _ in plan.recvs}
    return elapsed, message, exact == [True], rank in peers


@pytest.mark.parametrize("case,named", [
    ("dtype_same_size", ["torch.bfloat16", "torch.float16"]),
    ("dtype_size", ["torch.float64", "torch.float32"]),
    ("skip_backward", ["skipped a backward"]),
    ("skip_backward_dp", ["skipped a backward"]),
    ("stale_lengths", ["different layouts", "rank 2 did not take part"]),
    ("meta", ["meta"]),
    ("peer_fails", ["rank 2 did not take part"]),
])
def test_the_rank_at_fault_and_its_peers_raise_naming_the_difference(world, case, named):
    results = world(4).run(misuse, case, timeout=120)
    for rank, (elapsed, message, exact, peer) in enumerate(results):
        assert elapsed < TIMEOUT + SLACK, f"rank {rank} took {elapsed:.1f} s: {message}"
        assert "Received data size" not in message, message
        if message == "no error":  # only a rank that exchanges nothing with the rank at fault
            assert not peer and rank != FAULTY[case] and exact, (case, rank)
            continue
        if case == "peer_fails" and rank == 2:
            continue
        if not peer and rank != FAULTY[case]:  # it may raise too: what its own peers did
            assert message.startswith(("ValueError", "TransformError")), (rank, message)
            continue
        assert any(word in message for word in named), (rank, message)
        assert "transform 'vision->llm' (" in message, (rank, message)  # the user's name for it


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


def compiled_loop_with_a_skipped_backward(rank, world_size):
    """A compiled step with a new layout every step; at step 2 rank 1 skips its backward."""
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


def test_compiled_loop_with_a_skipped_backward(world):
    for rank, (elapsed, message) in enumerate(world(2).run(compiled_loop_with_a_skipped_backward,
                                                           timeout=300)):
        assert message.startswith("ValueError") and "skipped a backward" in message, (rank, message)
        assert elapsed < TIMEOUT + SLACK, (rank, elapsed)


def skipped_last_backward(rank, world_size):
    """Rank 1 skips its last backward and goes on to the gradient all-reduce, as a trainer would;
    its backward peers raise within HPCOMM_TIMEOUT (no timeout= given), naming it."""
    import os

    os.environ["HPCOMM_TIMEOUT"] = "3"
    try:
        group = dist.new_group(list(range(world_size)))
        src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.cp(range(world_size), LENS, "contiguous")
        t = Transform(src, dst, group=group, name="vision->llm")
        x = src.shard(torch.randn(N, 4), rank).requires_grad_()
        y = t(x)
        elapsed, message = (0.0, "skipped") if rank == 1 else attempt(lambda: y.sum().backward())
        dist.all_reduce(torch.zeros(1))  # the default group: the others join it once they raised
        peers = {p for p, _ in t.spec.rank_plan(1, True).sends} | {p for p, _ in t.spec.rank_plan(1, True).recvs}
        return elapsed, message, rank in peers
    finally:
        del os.environ["HPCOMM_TIMEOUT"]


def test_a_skipped_last_backward_ends_within_hpcomm_timeout(world):
    for rank, (elapsed, message, peer) in enumerate(world(4).run(skipped_last_backward, timeout=120)):
        if peer:
            assert "rank 1 did not take part within 3 s" in message and "'vision->llm'" in message, message
            assert elapsed < 3 + SLACK, (rank, elapsed)
