"""NCCL's point-to-point semantics on a gloo group, so the device path runs on machines without a
GPU (CI). ``HPCOMM_EMULATE_NCCL=1`` sends CPU tensors through the device path, and the first such
call installs this in place of ``torch.distributed.batch_isend_irecv`` (for the whole process:
a user's own grouped point-to-point shares the emulated communicator, as it shares NCCL's).

What NCCL does, and the emulation does too:

- one Work for the whole group (torch returns the coalesced works), whatever it holds;
- no tags: the messages between a pair match in the order they were posted, across groups;
- the groups of one communicator run one after another on each rank, as on a CUDA stream: a
  group starts only once the one before it has completed, so a receive left posted in an earlier
  group blocks every later one until its message arrives;
- a stuck group ends only through the process group's timeout, as NCCL's watchdog ends it; the
  communicator is then aborted and every later group on it fails too.

The host waits for a group to complete (its data is host memory): NCCL's ``wait`` would only
order the stream, which makes no difference to what a test can observe on one host.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from hpcomm.comm import group_timeout

TAG = 0x4E43  # every emulated message shares one tag: a pair's messages match in posting order

_original = dist.batch_isend_irecv
_streams: dict[int, tuple[dist.ProcessGroup, _Stream]] = {}
_lock = threading.Lock()


class GroupWork:
    """The one Work of a group: complete once every message of the group has moved."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: str | None = None

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: timedelta | None = None) -> bool:
        # the caller's timeout is ignored, as NCCL's wait takes none: the watchdog ends a stuck group
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(self.error)
        return True

    def finish(self, error: str | None) -> None:
        self.error = error
        self._done.set()


class _Stream:
    """One communicator's stream on this rank: its groups run in order on a thread of their own."""

    def __init__(self, pg: dist.ProcessGroup) -> None:
        self.pg = pg
        self.timeout = group_timeout(pg)
        self.aborted: str | None = None
        self.groups: queue.Queue[tuple[list[dist.P2POp], GroupWork]] = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="hpcomm-emulated-nccl-stream").start()

    def _run(self) -> None:
        while True:
            ops, work = self.groups.get()
            work.finish(self.aborted or self._one(ops))

    def _one(self, ops: list[dist.P2POp]) -> str | None:
        me = dist.get_rank(self.pg)
        to_self = [op.tensor for op in ops if op.group_peer == me and op.op is dist.isend]
        from_self = [op.tensor for op in ops if op.group_peer == me and op.op is dist.irecv]
        for src, dst in zip(to_self, from_self):  # NCCL lets a rank send to itself within a group
            dst.copy_(src)
        end = time.monotonic() + self.timeout
        try:
            works = [(self.pg.send if op.op is dist.isend else self.pg.recv)([op.tensor], op.group_peer, TAG)
                     for op in ops if op.group_peer != me]
            for w in works:
                w.wait(timedelta(seconds=max(end - time.monotonic(), 0.01)))
        except RuntimeError as e:
            timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
            self.aborted = (f"Watchdog caught collective operation timeout: a point-to-point group ran for "
                            f"more than the process group's timeout ({self.timeout:g} s); the communicator "
                            f"is aborted" if timed_out else f"NCCL communicator aborted: {e}")
            return self.aborted
        return None


def batch_isend_irecv(p2p_op_list: list[dist.P2POp]) -> list[Any]:
    """``torch.distributed.batch_isend_irecv`` with NCCL's semantics on gloo groups (see above);
    other groups go to torch's own."""
    dist.distributed_c10d._check_p2p_op_list(p2p_op_list)
    pg = p2p_op_list[0].group or dist.distributed_c10d._get_default_group()
    if "gloo" not in str(dist.get_backend(pg)) or p2p_op_list[0].tensor.device.type != "cpu":
        return _original(p2p_op_list)
    with _lock:
        hit = _streams.get(id(pg))
        if hit is None or hit[0] is not pg:
            hit = _streams[id(pg)] = (pg, _Stream(pg))
    work = GroupWork()
    hit[1].groups.put((list(p2p_op_list), work))
    return [work]


def install() -> None:
    """Route ``torch.distributed.batch_isend_irecv`` through the emulation, once per process (a
    wrapper put around it afterwards, e.g. a test's counter, stays)."""
    global _installed
    if not _installed:
        dist.batch_isend_irecv = batch_isend_irecv
        dist.distributed_c10d.batch_isend_irecv = batch_isend_irecv
        _installed = True


_installed = False

