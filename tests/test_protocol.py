"""The per-call protocol in real worlds, on both transports: messages only to data peers (at most
two per data peer and direction), nothing left posted between calls, no host reads of payload
memory on a repeated call, and the group's timeout ending a stuck device group."""

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from hpcomm import Layout, Transform, TransformError, comm

LENS = [40, 100, 24, 76]


def _global(lens, h=16, seed=0):
    return torch.randn(sum(lens), h, generator=torch.Generator().manual_seed(seed))


def _recording():
    """Patch the header channel and the payload transport: each message this rank sends, by peer."""
    sent = []
    originals = comm.Channel.post, comm.P2P.post

    def record(post):
        def recorded(self, sends, recvs, *args):
            sent.extend(p for p, _ in sends)
            return post(self, sends, recvs, *args)
        return recorded

    comm.Channel.post, comm.P2P.post = record(originals[0]), record(originals[1])

    def restore():
        comm.Channel.post, comm.P2P.post = originals
    return sent, restore


def _data_peers(t, rank, backward):
    plan = t.spec.rank_plan(rank, backward)
    return {p for p, _ in plan.sends} | {p for p, _ in plan.recvs}


def message_counts(rank, world_size, case):
    """Forward and backward of one call: the peers each message of this rank went to."""
    n = 8 * 64
    if case == "pairwise":  # an encoder on ranks 0-3 in DP, the LLM on 4-7 in DP: one peer each
        src, dst = Layout.contiguous(range(4), n), Layout.contiguous(range(4, 8), n)
    else:  # a ring shift over all 8 ranks: rank r's rows go to rank r + 1
        src = Layout.contiguous(range(8), n)
        dst = Layout.contiguous([(r + 1) % 8 for r in range(8)], n)
    t = Transform(src, dst, grad="sum")
    x_global = _global([n])
    x = (src.shard(x_global, rank) if rank in src.ranks else x_global[:0]).clone().requires_grad_()
    t(x).sum().backward()  # a first call: plans and prepares
    sent, restore = _recording()
    try:
        y = t(x)
        forward = list(sent)
        y.sum().backward()
        backward = sent[len(forward):]
    finally:
        restore()
    ok = torch.equal(y, dst.shard(x_global, rank) if rank in dst.ranks else x_global[:0])
    return ok, forward, backward, _data_peers(t, rank, False), _data_peers(t, rank, True)


@pytest.mark.parametrize("case", ["pairwise", "ring"])
def test_messages_go_only_to_data_peers(world, case):
    total = 0
    for rank, (ok, forward, backward, fwd_peers, bwd_peers) in enumerate(world(8).run(message_counts, case)):
        assert ok, rank
        for sent, peers in ((forward, fwd_peers), (backward, bwd_peers)):
            assert set(sent) <= peers, (rank, sent, peers)  # nobody else hears of the call
            assert all(sent.count(p) <= 2 for p in peers), (rank, sent)  # a header and a payload
        assert len(fwd_peers) <= 2 and len(bwd_peers) <= 2, rank
        total += len(forward) + len(backward)
    # a header each way and one payload per pair and direction: 4 pairs (pairwise) or 8 (ring)
    assert total == (24 if case == "pairwise" else 48), total


class SyncCounter(TorchDispatchMode):
    """Flags what would make the host wait for the device on a GPU: a scalar read
    (``_local_scalar_dense``, behind ``.item()`` and ``int()``), ops whose output shape depends on
    the data, copies between tensors (a device-to-host ``.cpu()`` or a host-to-device copy of
    pageable memory); and, patched on the class, ``tolist`` / ``numpy`` / ``cpu`` / ``item`` and
    truth tests of a payload (float) tensor, which on CPU bypass the dispatcher."""

    DATA_DEPENDENT = {"nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
                      "masked_select", "equal", "is_nonzero", "_to_copy", "repeat_interleave"}
    METHODS = ("tolist", "numpy", "cpu", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, handle):
        super().__init__()
        self.handle, self.flagged = handle, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "_local_scalar_dense" and not (first is not None and first.dtype == torch.int64
                                                    and first.numel() == 1):  # the op's handle
            self.flagged.append(name)
        elif name in self.DATA_DEPENDENT:
            self.flagged.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {m: getattr(torch.Tensor, m) for m in self.METHODS}
        for m, original in self._saved.items():
            setattr(torch.Tensor, m, self._flagging(m, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for m, original in self._saved.items():
            setattr(torch.Tensor, m, original)
        return super().__exit__(*exc)

    def _flagging(self, m, original):
        def flagging(t, *args, **kwargs):
            if t.dtype.is_floating_point:
                self.flagged.append(f"Tensor.{m}")
            return original(t, *args, **kwargs)
        return flagging


def host_reads(rank, world_size):
    """Repeated calls (the same Transform and shapes), forward and backward, plain, ``out=`` and
    ``out_rows=``: nothing reads payload memory on the host."""
    src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.dp(range(world_size), LENS, "balanced")
    t = Transform(src, dst, grad="sum")
    x_global = _global(LENS)
    x0 = src.shard(x_global, rank)
    n = dst.local_num_rows(rank)
    out = torch.empty(n, 16)
    big = torch.zeros(n + 3, 16)
    rows = torch.arange(n) + 2  # the same rows tensor every call: made ready once

    def calls():
        x = x0.clone().requires_grad_()
        y = t(x)
        y.backward(torch.ones_like(y))
        t(x0, out=out)
        t(x0, out=big, out_rows=rows)
        return y

    for _ in range(2):
        calls()
    counter = SyncCounter(t._handle)
    with counter:
        for _ in range(3):
            y = calls()
    expected = dst.shard(x_global, rank)
    ok = torch.equal(y, expected) and torch.equal(out, expected) and torch.equal(big[2:2 + n], expected)
    return ok, counter.flagged


def test_a_repeated_call_reads_no_payload_on_the_host(world, transport):
    for rank, (ok, flagged) in enumerate(world(4).run(host_reads)):
        assert ok, rank
        assert flagged == [], (transport, rank, sorted(set(flagged)))


def user_traffic_after_calls(rank, world_size):
    """After transform calls, a user's own grouped point-to-point on the same group completes at
    once: no receive of hpcomm's is left posted on the communicator's stream."""
    group = dist.new_group(list(range(world_size)))
    src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.cp(range(world_size), LENS, "contiguous")
    t = Transform(src, dst, group=group)
    x_global = _global(LENS)
    ok = []
    for _ in range(3):
        ok.append(torch.equal(t(src.shard(x_global, rank)), dst.shard(x_global, rank)))
        mine, theirs = torch.full((4,), float(rank)), torch.empty(4)
        right, left = (rank + 1) % world_size, (rank - 1) % world_size
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, right, group),
                                        dist.P2POp(dist.irecv, theirs, left, group)])
        for w in works:
            w.wait()
        ok.append(bool((theirs == left).all()))
    return all(ok)


def test_nothing_stays_posted_between_calls(world):
    assert world(4).run(user_traffic_after_calls) == [True] * 4


def stuck_group(rank, world_size):
    """Rank 1 leaves a receive from rank 2 (which never sends) on the group's stream before the
    call: on NCCL that blocks every later group of the communicator, the call's too. The headers
    agree (they are on the host channel), so the call's group is posted, and only the process
    group's timeout (its watchdog) ends it: the transform's own timeout does not."""
    group = dist.new_group([0, 1, 2], timeout=timedelta(seconds=3))
    if rank == 3:
        return 0.0, "not in the group"
    from hpcomm import emulate_nccl
    emulate_nccl.install()  # (hpcomm installs it at its first call on the device path: this comes first)
    if rank == 1:
        dist.batch_isend_irecv([dist.P2POp(dist.irecv, torch.empty(4), 2, group)])
    src, dst = Layout.contiguous([0, 1], 64), Layout.contiguous([1, 0], 64)
    t = Transform(src, dst, group=group, timeout=60)
    start = time.monotonic()
    try:
        if rank in (0, 1):
            t(src.shard(_global([64]), rank))
        return time.monotonic() - start, "no error"
    except TransformError as e:
        return time.monotonic() - start, str(e)


def test_the_group_timeout_ends_a_stuck_device_group(world, transport):
    if transport != "nccl-emulated":
        pytest.skip("the device path's group: gloo's host path waits with the call's own timeout")
    results = world(4).run(stuck_group, timeout=120)
    for rank in (0, 1):
        elapsed, message = results[rank]
        assert elapsed < 3 + 6, (rank, elapsed)
        # the peer's group timed out (its watchdog), or gloo closed the pair when it did
        assert "payloads with rank" in message and ("process group's timeout (3 s" in message
                                                    or "closed its connection" in message), (rank, message)


def store_channel(rank, world_size):
    """The headers of an NCCL-only group go through the process group's store: forced here on a
    gloo group, calls are exact and a rank that passes another dtype is named by its peers."""
    saved = comm.host_channel
    comm.host_channel = comm.StoreChannel
    try:
        group = dist.new_group(list(range(world_size)))  # a new group: a channel of its own
        src, dst = Layout.cp(range(world_size), LENS, "zigzag"), Layout.dp(range(world_size), LENS, "balanced")
        t = Transform(src, dst, group=group, grad="sum", timeout=10)
        ok = isinstance(comm._channel_of(group), comm.StoreChannel)
        x_global = _global(LENS)
        for _ in range(3):
            x = src.shard(x_global, rank).clone().requires_grad_()
            y = t(x)
            y.backward(torch.ones_like(y))
            ok &= torch.equal(y, dst.shard(x_global, rank)) and torch.equal(x.grad, torch.ones_like(x))
        try:
            t(src.shard(x_global, rank).to(torch.float64 if rank == 0 else torch.float32))
            error = "no error"
        except ValueError as e:
            error = str(e)
        return ok, error, _data_peers(t, 0, False)
    finally:
        comm.host_channel = saved


def test_headers_through_the_store(world):
    for rank, (ok, error, peers_of_0) in enumerate(world(4).run(store_channel)):
        assert ok, rank
        if rank == 0 or rank in peers_of_0:
            assert "torch.float64" in error and "torch.float32" in error, (rank, error)
