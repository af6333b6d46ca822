"""The header protocol in real gloo worlds: a repeated call is one message per peer (its payload
riding behind its header, into a receive posted ahead); payloads that outgrow the announced room,
calls in flight together (the sender knows no room yet) and misuse after the rooms have grown all
still give exact results or a named error on every rank."""

import time

import pytest
import torch
import torch.distributed as dist

from hpcomm import Layout, Transform, comm
from hpcomm.comm import HEADER_TAG

LENS = [40, 100, 24, 76]
TIMEOUT = 4.0
SLACK = 6.0


def _global(lens, h=64, dtype=torch.float32, seed=0):
    return torch.randn(sum(lens), h, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _recording():
    """Patch P2P.post to count each call's messages: (header messages, payloads on their own)."""
    counts = {"header": 0, "alone": 0}
    post = comm.P2P.post

    def recording(self, sends, recvs, tag, *args):
        counts["header" if tag == HEADER_TAG else "alone"] += len(sends)
        return post(self, sends, recvs, tag, *args)

    comm.P2P.post = recording
    return counts, lambda: setattr(comm.P2P, "post", post)


def repeated_calls(rank, world_size):
    src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.cp(range(world_size), LENS, "contiguous")
    t = Transform(src, dst, group=dist.new_group(list(range(world_size))))
    x_global = _global(LENS, h=512)  # messages of about 40 KiB: more than a first receive's room
    x = src.shard(x_global, rank)
    per_call = []
    counts, restore = _recording()
    try:
        for _ in range(4):
            before = dict(counts)
            y = t(x)
            per_call.append((counts["header"] - before["header"], counts["alone"] - before["alone"],
                             torch.equal(y, dst.shard(x_global, rank))))
    finally:
        restore()
    return per_call


def test_a_repeated_call_is_one_message_per_peer(world):
    for rank, per_call in enumerate(world(4).run(repeated_calls)):
        assert all(ok for _, _, ok in per_call), rank
        # the first call's payloads (over 16 KiB) cannot ride in a header: the peer has announced
        # no room yet; from the second on, every payload rides behind its header
        assert per_call[0][1] > 0, (rank, per_call)
        assert [(h, alone) for h, alone, _ in per_call[1:]] == [(3, 0)] * 3, (rank, per_call)


def in_place_blocks(rank, world_size):
    """Big payloads on the host travel as one piece per segment, sent from the input and received
    into the output: CP contiguous -> DP, each message is two 256 KiB chunks (one block of the
    source, two runs of the destination; backward the other way round). Each piece travels on its
    own after its header, and no receive ahead is grown for them."""
    lens = [256] * 8  # 4 KiB rows: each pair's message is two 64-row chunks, 512 KiB
    src, dst = Layout.cp(range(world_size), lens, "contiguous"), Layout.dp(range(world_size), lens)
    group = dist.new_group(list(range(world_size)))
    t = Transform(src, dst, group=group, grad="sum")
    x_global = _global(lens, h=1024)
    per_call, ok = [], []
    counts, restore = _recording()
    try:
        for step in range(3):
            x = src.shard(x_global, rank).clone().requires_grad_()
            before = dict(counts)
            y = t(x)
            per_call.append((counts["header"] - before["header"], counts["alone"] - before["alone"]))
            g = torch.full_like(y, float(step + rank))
            y.backward(g)
            expect = t.simulate_backward({r: torch.full((dst.local_num_rows(r), 1024), float(step + r))
                                          for r in dst.ranks})[rank]
            ok.append(torch.equal(y, dst.shard(x_global, rank)) and torch.equal(x.grad, expect))
    finally:
        restore()
    rooms = [comm.P2P(group, None).link(p).ahead.room for p in range(world_size) if p != rank]
    return ok, per_call, rooms


def test_big_payloads_go_in_pieces_in_place(world):
    for rank, (ok, per_call, rooms) in enumerate(world(4).run(in_place_blocks)):
        assert all(ok), (rank, ok)
        assert per_call == [(3, 6)] * 3, (rank, per_call)  # a header to each peer, then the pieces
        assert rooms == [comm.DEFAULT_ROOM] * 3, (rank, rooms)


def changing_sizes(rank, world_size):
    """Every step a new transform, its payloads 4x larger or smaller than the last (beyond the
    announced room's slack, both ways), forward and backward, against the single-process answer."""
    group = dist.new_group(list(range(world_size)))
    ok = []
    for step, scale in enumerate([1, 4, 16, 4, 1, 16, 1]):
        lens = [n * scale for n in LENS]
        src, dst = Layout.dp(range(world_size), lens, "balanced"), Layout.cp(range(world_size), lens, "zigzag")
        t = Transform(src, dst, group=group, grad="sum")
        x_global = _global(lens, h=16, seed=step)
        x = src.shard(x_global, rank).clone().requires_grad_()
        y = t(x)
        y.backward(torch.full_like(y, float(rank + 1)))
        expect = t.simulate_backward({r: torch.full((dst.local_num_rows(r), 16), float(r + 1))
                                      for r in dst.ranks})[rank]
        ok.append(torch.equal(y, dst.shard(x_global, rank)) and torch.equal(x.grad, expect))
    return ok


def test_payloads_that_grow_and_shrink_every_step(world):
    for rank, ok in enumerate(world(4).run(changing_sizes)):
        assert all(ok), (rank, ok)


def two_in_flight(rank, world_size):
    """Two calls posted before either is waited for: the second is sent before the first's headers
    were read, so its sender knows no room and its payloads go on their own, received late."""
    src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.dp(range(world_size), LENS, "balanced")
    t = Transform(src, dst, group=dist.new_group(list(range(world_size))))
    xg = [_global(LENS, h=512, seed=s) for s in range(3)]  # messages over a first receive's 16 KiB
    for _ in range(2):  # rooms announced and grown
        t(src.shard(xg[0], rank))
    first = t(src.shard(xg[1], rank), async_op=True)
    second = t(src.shard(xg[2], rank), async_op=True)
    return torch.equal(first.wait(), dst.shard(xg[1], rank)) and torch.equal(second.wait(), dst.shard(xg[2], rank))


def test_calls_in_flight_together(world):
    assert world(4).run(two_in_flight) == [True] * 4


def warm_misuse(rank, world_size, case):
    """Misuse after good calls, when the peers' receives have room for the good payloads."""
    group = dist.new_group(list(range(world_size)))
    src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.cp(range(world_size), LENS, "contiguous")
    t = Transform(src, dst, group=group, timeout=TIMEOUT)
    x = src.shard(_global(LENS, h=512), rank)  # messages over a first receive's 16 KiB
    for _ in range(3):
        t(x)
    if case == "dtype_size" and rank == 0:
        x = x.double()  # twice the bytes: more than the room announced
    if case == "dtype_same_size":  # half the bytes (fits the room), one rank's dtype differs
        x = x.half() if rank == 0 else x.bfloat16()
    if case == "half_rows" and rank == 0:
        t = Transform(Layout.cp(range(world_size), [n // 2 for n in LENS], "zigzag"),
                      Layout.cp(range(world_size), [n // 2 for n in LENS], "contiguous"), group=group,
                      timeout=TIMEOUT)
        x = t.src.shard(_global([n // 2 for n in LENS], h=512), rank)  # fits the room: rides in the header
    start = time.monotonic()
    try:
        t(x)
    except Exception as e:  # noqa: BLE001  (the test reports whatever each rank raised)
        return time.monotonic() - start, f"{type(e).__name__}: {e}"
    return time.monotonic() - start, "no error"


@pytest.mark.parametrize("case,named", [
    ("dtype_size", ["torch.float64", "torch.float32"]),
    ("dtype_same_size", ["torch.bfloat16", "torch.float16"]),
    ("half_rows", ["different layouts"]),
])
def test_misuse_after_the_rooms_have_grown(world, case, named):
    for rank, (elapsed, message) in enumerate(world(4).run(warm_misuse, case, timeout=120)):
        assert message.startswith("ValueError") and any(w in message for w in named), (rank, message)
        assert elapsed < TIMEOUT + SLACK, (rank, elapsed)


def grouped_path(rank, world_size, case):
    """The NCCL way (headers on their own and checked first, then every payload in one group),
    forced on gloo by a group that says it moves no host tensors."""
    host_ok = comm.P2P.host_ok
    comm.P2P.host_ok = lambda self: False
    try:
        group = dist.new_group(list(range(world_size)))
        src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.dp(range(world_size), LENS, "balanced")
        t = Transform(src, dst, group=group, grad="sum", timeout=TIMEOUT)
        x_global = _global(LENS, h=512)
        if case == "dtype_size":
            x = src.shard(x_global, rank).to(torch.float64 if rank == 0 else torch.float32)
            try:
                t(x)
            except ValueError as e:
                return str(e)
            return "no error"
        ok = []
        for _ in range(3):
            x = src.shard(x_global, rank).clone().requires_grad_()
            y = t(x)
            y.backward(torch.ones_like(y))
            ok.append(torch.equal(y, dst.shard(x_global, rank)) and torch.equal(x.grad, torch.ones_like(x)))
        return all(ok)
    finally:
        comm.P2P.host_ok = host_ok


def test_the_grouped_path_on_gloo(world):
    assert world(4).run(grouped_path, "good") == [True] * 4
    for message in world(4).run(grouped_path, "dtype_size"):
        assert "torch.float64" in message and "torch.float32" in message, message


def refused_then_reused(rank, world_size, blocks):
    """After a refused call with payloads in flight (riding in headers, and on their own), the
    group's next calls are exact: nothing a refused call left posted is matched later. ``blocks``:
    big payloads sent from the input and received into the output in place."""
    group = dist.new_group(list(range(world_size)))
    lens, h = ([1024], 1024) if blocks else (LENS, 512)  # blocks: one sequence, 512 KiB chunks
    src, dst = Layout.cp(range(world_size), lens, "zigzag"), Layout.cp(range(world_size), lens, "contiguous")
    t = Transform(src, dst, group=group, timeout=TIMEOUT)
    xg = [_global(lens, h=h, seed=s) for s in range(3)]
    for _ in range(2):
        t(src.shard(xg[0], rank))
    refused = []
    for bad in (torch.float64, torch.float16):  # on its own (too big for the room), then riding
        try:
            t(src.shard(xg[1], rank).to(bad if rank == 0 else torch.float32))
            refused.append(False)
        except ValueError:
            refused.append(True)
    t2 = Transform(src, dst, group=group, timeout=TIMEOUT)  # a new transform on the same pairs
    counts, restore = _recording()
    try:
        good = [torch.equal(tt(src.shard(xg[2], rank)), dst.shard(xg[2], rank)) for tt in (t, t2, t)]
    finally:
        restore()
    return refused, good, counts["alone"] > 0


@pytest.mark.parametrize("blocks", [False, True])
def test_refused_calls_leave_the_pairs_usable(world, blocks):
    for rank, (refused, good, alone) in enumerate(world(4).run(refused_then_reused, blocks, timeout=120)):
        assert refused == [True, True] and good == [True] * 3, (rank, refused, good)
        assert alone == blocks, rank  # (a repeated call's payloads ride in their headers otherwise)
