"""Transport: moves one call's messages, and nothing else.

A call talks only to its data peers (the ranks it exchanges rows with in that direction), over two
kinds of message (hpcomm.protocol says what they carry and in which order):

- headers, small and host-only, on a host ``Channel``: the group's own point-to-point on a group
  that moves host tensors (gloo, or the CPU side of ``"cpu:gloo,cuda:nccl"``), else the process
  group's store (an NCCL-only group). Reading a header never touches device memory.
- payloads, on ``P2P``: one by one on the host path (gloo, every wait bounded by the call's
  timeout), or all of a call's in one ``torch.distributed.batch_isend_irecv`` group on the device
  path (NCCL: one Work for the whole group; waiting on it orders the stream and the process
  group's watchdog bounds it). ``HPCOMM_EMULATE_NCCL=1`` sends CPU tensors on a gloo group
  through the device path, with hpcomm.emulate_nccl giving that function NCCL's behaviour.

``Simulated`` is a whole world in one process: a posted receive is filled from the matching send.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from functools import lru_cache
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist

HEADER_TAG = 0x6870  # headers and payloads never match each other's receives (gloo)
PAYLOAD_TAG = 0x6871
HEADER_BYTES = 128

Messages = Sequence[tuple[int, torch.Tensor]]  # (global rank of the peer, tensor)


class TransformError(RuntimeError):
    """A distributed transform failed: a peer did not arrive in time, died, or disagreed."""


def emulating_nccl() -> bool:
    """``HPCOMM_EMULATE_NCCL=1``: CPU tensors take the device path (tests; see hpcomm.emulate_nccl)."""
    return os.environ.get("HPCOMM_EMULATE_NCCL") == "1"


def default_timeout(group: dist.ProcessGroup | None = None) -> float:
    """``HPCOMM_TIMEOUT`` (seconds) if set, else the process group's own timeout."""
    env = os.environ.get("HPCOMM_TIMEOUT")
    if env:
        try:
            seconds = float(env)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ValueError(f"HPCOMM_TIMEOUT must be a positive number of seconds, got {env!r}")
        return seconds
    return group_timeout(group)


def group_timeout(group: dist.ProcessGroup | None = None) -> float:
    """The process group's own timeout in seconds (what its collectives and its watchdog wait)."""
    try:
        pg = group or dist.group.WORLD
        # WORLD is None before init_process_group: the AttributeError is caught below
        backend = pg._get_backend(torch.device("cpu") if "gloo" in str(dist.get_backend(pg))  # type: ignore[union-attr]
                                  else torch.device("cuda"))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return dist.default_pg_timeout.total_seconds()


class Deadline:
    """One call's time budget: every host wait of the call draws on the same ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def left(self) -> float:
        return max(self._end - time.monotonic(), 0.05)


class Waitable(Protocol):
    def wait(self, timeout: timedelta = ...) -> Any: ...


class Pending:
    """Posted messages (one, or a whole group's); ``wait`` returns when they have moved, or raises
    TransformError naming the peer and what the call was doing. ``bounded``: a host wait, bounded
    by the call's deadline; else a device group's, which the group's watchdog bounds."""

    def __init__(self, works: Sequence[Waitable], peer: int | None, kind: str, what: str, deadline: Deadline,
                 bounded: bool) -> None:
        self._works, self.peer, self._kind, self._what = list(works), peer, kind, what
        self._deadline, self._bounded = deadline, bounded
        self._error: str | None = None  # a failed wait fails again (its buffer was never filled)

    def wait(self) -> None:
        if self._error is not None:
            raise TransformError(self._error)
        try:
            while self._works:
                work = self._works[0]
                if self._bounded:
                    work.wait(timedelta(seconds=self._deadline.left()))
                else:
                    work.wait()
                self._works.pop(0)
        except RuntimeError as e:
            self._error = _failure(self._what, self._kind, self.peer, self._deadline.timeout, e, self._bounded)
            raise TransformError(self._error) from None


def _failure(what: str, kind: str, peer: int | None, timeout: float, error: Exception,
             bounded: bool = True) -> str:
    """The error of a failed wait; ``peer`` None: a group's, with several peers (named in ``kind``)."""
    text = str(error)
    who = f"rank {peer}" if peer is not None else "one of them"
    if "timed out" in text.lower() or "timeout" in text.lower():
        limit = (f"within {timeout:g} s" if bounded else
                 f"within the process group's timeout ({timeout:g} s, enforced by its watchdog)")
        why = (f"{who} did not take part {limit} (it raised an error of its own, called another "
               f"transform or direction, skipped a call, or hangs)")
    elif "closed" in text.lower() or "reset" in text.lower() or "broken pipe" in text.lower():
        why = f"{who} died or closed its connection"
    else:
        why = f"the transport failed ({text.splitlines()[0] if text else type(error).__name__})"
    subject = f"{kind} rank {peer}" if peer is not None else kind
    return f"{what + ': ' if what else ''}{subject} failed: {why}"


def keep(*objects: Any) -> None:
    """Keep a failed call's buffers and posted messages alive for good: a message still posted
    may yet move, and gloo stalls the pair if a posted receive's buffer is freed."""
    _KEPT.append(objects)


_KEPT: list[tuple[Any, ...]] = []


class _Ranks:
    """A process group and its rank of each global rank."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.pg = group or dist.distributed_c10d._get_default_group()
        pg = self.pg
        self.of: Callable[[int], int] = lru_cache(maxsize=None)(lambda r: dist.get_group_rank(pg, r))


# -- header channels -------------------------------------------------------------------------------


class Channel:
    """Headers over the group's own point-to-point, on the host (gloo, or the CPU backend of
    ``"cpu:gloo,cuda:nccl"``): a pair's headers match in the order they were posted."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self._ranks = _Ranks(group)

    def post(self, sends: Messages, recvs: Messages, what: str, deadline: Deadline
             ) -> tuple[list[Pending], list[Pending]]:
        pg, of = self._ranks.pg, self._ranks.of
        try:
            sent = [Pending([pg.send([t], of(p), HEADER_TAG)], p, "header to", what, deadline, True)
                    for p, t in sends]
            got = [Pending([pg.recv([t], of(p), HEADER_TAG)], p, "header from", what, deadline, True)
                   for p, t in recvs]
        except RuntimeError as e:  # e.g. a peer already gone: gloo fails at posting
            peer = [*sends, *recvs][0][0]
            raise TransformError(_failure(what, "posting to", peer, deadline.timeout, e)) from None
        return sent, got


class StoreChannel:
    """Headers through the process group's store, for a group without a host backend (NCCL only):
    host-only, with no NCCL message and no device sync. A pair's n-th header is the key
    ``hpcomm/<group>/<from>-<to>/<n>``, deleted once read."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        pg = _Ranks(group).pg
        self._store = dist.distributed_c10d._get_default_store()
        self._prefix = f"hpcomm/{pg.group_name}/"
        self._sent: dict[int, int] = {}
        self._read: dict[int, int] = {}

    def _key(self, src: int, dst: int, counts: dict[int, int], peer: int) -> str:
        n = counts.get(peer, 0)
        counts[peer] = n + 1
        return f"{self._prefix}{src}-{dst}/{n}"

    def post(self, sends: Messages, recvs: Messages, what: str, deadline: Deadline
             ) -> tuple[list[Pending], list[Pending]]:
        me = dist.get_rank()
        for p, t in sends:
            self._store.set(self._key(me, p, self._sent, p), t.numpy().tobytes())  # type: ignore[arg-type]
        got = [Pending([_StoreRead(self._store, self._key(p, me, self._read, p), t)], p, "header from", what,
                       deadline, True) for p, t in recvs]
        return [], got


class _StoreRead:
    """A header receive from the store: the wait reads the key into the tensor, then deletes it."""

    def __init__(self, store: Any, key: str, out: torch.Tensor) -> None:
        self._store, self._key, self._out = store, key, out

    def wait(self, timeout: timedelta = timedelta(seconds=300)) -> None:
        self._store.wait([self._key], timeout)  # raises on timeout
        data = self._store.get(self._key)
        self._out.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self._store.delete_key(self._key)


def host_channel(group: dist.ProcessGroup | None) -> Channel | StoreChannel:
    """The group's own point-to-point if it moves host tensors, else its store."""
    backend = str(dist.get_backend(group))
    return Channel(group) if "gloo" in backend or "cpu" in backend else StoreChannel(group)


# -- payloads --------------------------------------------------------------------------------------


class P2P:
    """Payloads over ``group``: one by one on the host path, in one ``batch_isend_irecv`` group on
    the device path (``grouped``). Peers are global ranks."""

    def __init__(self, group: dist.ProcessGroup | None, timeout: float | None, grouped: bool) -> None:
        self.group = group
        self.timeout = default_timeout(group) if timeout is None else timeout
        self.grouped = grouped
        if grouped and emulating_nccl():
            from hpcomm import emulate_nccl

            emulate_nccl.install()
        self._ranks: _Ranks | None = None
        self._channel: Channel | StoreChannel | None = None

    def deadline(self) -> Deadline:
        return Deadline(self.timeout)

    @property
    def channel(self) -> Channel | StoreChannel:
        if self._channel is None:
            self._channel = _channel_of(self._pg())
        return self._channel

    def pair_call(self, peer: int) -> int:
        """The number of calls this rank has made with ``peer`` over this group before this one
        (both sides count the calls they share, so a call one side made alone shows)."""
        return _pair_counts(self._pg()).count(peer)

    def _pg(self) -> dist.ProcessGroup:
        if self._ranks is None:
            self._ranks = _Ranks(self.group)
        return self._ranks.pg

    def post(self, sends: Messages, recvs: Messages, what: str, deadline: Deadline,
             tags: Mapping[int, tuple[int, int]] = {}) -> tuple[list[Pending], list[Pending]]:
        """Post every payload of a call; one Pending per message (on the device path, each is the
        whole group's). ``tags``: gloo's tag of the send to and the receive from each peer
        (default PAYLOAD_TAG); NCCL has none."""
        if not sends and not recvs:
            return [], []
        self._pg()
        assert self._ranks is not None
        pg, of = self._ranks.pg, self._ranks.of
        try:
            if self.grouped:
                ops = [dist.P2POp(dist.isend, t, p, self.group, PAYLOAD_TAG) for p, t in sends]
                ops += [dist.P2POp(dist.irecv, t, p, self.group, PAYLOAD_TAG) for p, t in recvs]
                # one Work for the whole group on NCCL (torch returns the coalesced works)
                peers = sorted({p for p, _ in [*sends, *recvs]})
                watchdog = Deadline(group_timeout(pg))  # what bounds a device group: for its errors
                group = Pending(dist.batch_isend_irecv(ops), peers[0] if len(peers) == 1 else None,
                                "payloads with" if len(peers) == 1 else f"payloads with ranks {peers}",
                                what, watchdog, False)
                return [group] * len(sends), [group] * len(recvs)
            # straight to the process group: torch.distributed's wrappers cost more than gloo's
            no_tags = (PAYLOAD_TAG, PAYLOAD_TAG)
            sent = [Pending([pg.send([t], of(p), tags.get(p, no_tags)[0])], p, "payload to", what, deadline, True)
                    for p, t in sends]
            got = [Pending([pg.recv([t], of(p), tags.get(p, no_tags)[1])], p, "payload from", what, deadline, True)
                   for p, t in recvs]
            return sent, got
        except RuntimeError as e:
            peer = [*sends, *recvs][0][0]
            raise TransformError(_failure(what, "posting to", peer, deadline.timeout, e)) from None


class _PairCounts:
    def __init__(self, pg: dist.ProcessGroup) -> None:
        self.pg = pg
        self.calls: dict[int, int] = {}

    def count(self, peer: int) -> int:
        n = self.calls.get(peer, 0)
        self.calls[peer] = n + 1
        return n


_pairs: dict[int, _PairCounts] = {}  # id of the group -> its pairs' call counts
_channels: dict[int, tuple[dist.ProcessGroup, Channel | StoreChannel]] = {}


def _pair_counts(pg: dist.ProcessGroup) -> _PairCounts:
    """One count per group and peer, shared by every transform (a re-created group starts afresh)."""
    counts = _pairs.get(id(pg))
    if counts is None or counts.pg is not pg:
        counts = _pairs[id(pg)] = _PairCounts(pg)
    return counts


def _channel_of(pg: dist.ProcessGroup) -> Channel | StoreChannel:
    """One header channel per group: a store channel's key counts are the group's, not a transform's."""
    hit = _channels.get(id(pg))
    if hit is None or hit[0] is not pg:
        hit = _channels[id(pg)] = (pg, host_channel(pg))
    return hit[1]


class Simulated:
    """In-process transport for ``Transform.simulate``: one rank's ``post`` records its sends and
    receives; ``deliver`` then fills every receive from its matching send."""

    grouped = False

    def __init__(self) -> None:
        self._sends: dict[tuple[int, int], torch.Tensor] = {}  # (from, to)
        self._recvs: list[tuple[int, int, torch.Tensor]] = []
        self.rank = -1  # the rank whose messages the next post carries

    def deadline(self) -> Deadline:
        return Deadline(1.0)

    def post(self, sends: Messages, recvs: Messages, what: str, deadline: Deadline
             ) -> tuple[list[Pending], list[Pending]]:
        for peer, t in sends:
            self._sends[(self.rank, peer)] = t
        self._recvs += [(peer, self.rank, t) for peer, t in recvs]
        return ([Pending([], p, "", what, deadline, False) for p, _ in sends],
                [Pending([], p, "", what, deadline, False) for p, _ in recvs])

    def deliver(self) -> None:
        for peer, rank, t in self._recvs:
            src = self._sends.pop((peer, rank), None)
            if src is None or src.numel() != t.numel():
                raise TransformError(f"plan mismatch: rank {rank} expects {t.numel()} elements from rank "
                                     f"{peer}, which sends {None if src is None else src.numel()}")
            t.copy_(src)
        if self._sends:
            (rank, peer), _ = next(iter(self._sends.items()))
            raise TransformError(f"plan mismatch: rank {rank} sends to rank {peer}, which expects nothing")
        self._recvs = []
