"""Transport: moves one call's per-peer messages, and nothing else.

Two transports hand the execution layer the same interface (``post`` a batch of sends and
receives, get back one ``Pending`` per message, ``wait`` each when its data is needed; headers and
each call's payloads travel under tags of their own):

- ``P2P``: point-to-point over the process group (gloo on CPU, NCCL on GPU). Every wait is bounded
  by the call's timeout and a failure names the peer and what the call was doing.
- ``Simulated``: a whole world in one process; a posted receive is filled from the matching send.

Why point to point only: a collective (all_to_all_single) sends every message before anyone can
check the others' headers, so a disagreement would reach gloo's size check (a process abort);
point to point lets a rank send each message only once its receiver's header agrees, and still
post every receive at once (docs/BENCHMARKS.md has the comparison).
"""

from __future__ import annotations

import time
from datetime import timedelta
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

HEADER_TAG = 0x6870  # headers and payloads never match each other's receives
PAYLOAD_TAG = 0x10000  # payload tags run from here: one per call between a pair of ranks
HEADER_BYTES = 128  # a header's room at the front of its message: a payload after it is aligned

Tags = int | Mapping[int, int]  # one tag, or one per peer


class TransformError(RuntimeError):
    """A distributed transform failed: a peer did not arrive in time, died, or disagreed."""


def default_timeout(group: dist.ProcessGroup | None = None) -> float:
    """The process group's own timeout in seconds (what its collectives would wait)."""
    try:
        pg = group or dist.group.WORLD
        # WORLD is None before init_process_group: the AttributeError is caught below
        backend = pg._get_backend(torch.device("cpu") if dist.get_backend(pg) == "gloo"  # type: ignore[union-attr]
                                  else torch.device("cuda"))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return dist.default_pg_timeout.total_seconds()


class Deadline:
    """One call's time budget: every wait of the call draws on the same ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def left(self) -> float:
        return max(self._end - time.monotonic(), 0.05)


class Pending:
    """One posted message; ``wait`` returns when its data has moved, or raises TransformError."""

    def __init__(self, work: dist.Work | None, peer: int, kind: str, what: str, deadline: Deadline,
                 on_device: bool) -> None:
        self._work, self.peer, self._kind, self._what = work, peer, kind, what
        self._deadline, self._on_device = deadline, on_device
        self._error: str | None = None  # a failed wait fails again (its buffer was never filled)

    def renew(self, what: str, deadline: Deadline) -> Pending:
        """A receive posted ahead, now part of the call ``what``: its waits draw on that call's time."""
        self._what, self._deadline = what, deadline
        return self

    def done(self) -> bool:
        """Whether the message has moved (or failed), without waiting."""
        return self._work is None or self._error is not None or self._work.is_completed()

    def wait(self) -> None:
        if self._error is not None:
            raise TransformError(self._error)
        if self._work is None:
            return
        work, self._work = self._work, None
        try:
            if self._on_device:
                # NCCL: wait() orders the current stream after the transfer and returns at once;
                # the process group's watchdog enforces the timeout
                work.wait()
            else:
                work.wait(timedelta(seconds=self._deadline.left()))
        except RuntimeError as e:
            self._error = _failure(self._what, self._kind, self.peer, self._deadline.timeout, e)
            raise TransformError(self._error) from None


def _failure(what: str, kind: str, peer: int, timeout: float, error: Exception) -> str:
    text = str(error)
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        why = (f"rank {peer} did not take part within {timeout:g} s (it raised an error of its own, "
               f"called another transform or direction, skipped a call, or hangs)")
    elif "closed" in text.lower() or "reset" in text.lower() or "broken pipe" in text.lower():
        why = f"rank {peer} died or closed its connection"
    else:
        why = f"the transport failed ({text.splitlines()[0] if text else type(error).__name__})"
    return f"rank {dist.get_rank()}: {what}: {kind} rank {peer} failed: {why}"


def keep(*objects: Any) -> None:
    """Keep a failed call's buffers and posted messages alive for good: a message still posted
    may yet move, and gloo stalls the pair if a posted receive's buffer is freed."""
    _KEPT.append(objects)


_KEPT: list[tuple[Any, ...]] = []


class P2P:
    """Point-to-point transport over ``group`` (peers are global ranks)."""

    def __init__(self, group: dist.ProcessGroup | None, timeout: float | None) -> None:
        self.group = group
        self.timeout = default_timeout(group) if timeout is None else timeout
        self._host_ok: bool | None = None
        self._group_ranks: tuple[dist.ProcessGroup, Callable[[int], int]] | None = None

    def deadline(self) -> Deadline:
        return Deadline(self.timeout)

    def payload_tags(self, peers: Sequence[int]) -> dict[int, int]:
        """The tags of this call's payloads with each peer: a count of the calls the pair has
        made (both sides count every call they share), so a send its receiver refused (a call
        that raised) never matches a receive of a later call. Wraps after 2^20 calls."""
        tags = {}
        for p in peers:
            link = self.link(p)
            tags[p] = PAYLOAD_TAG + link.calls % (1 << 20)
            link.calls += 1
        return tags

    def post(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
             tag: Tags, what: str, deadline: Deadline) -> tuple[list[Pending], list[Pending]]:
        """Post every message of the batch at once; NCCL needs them in one group (two ranks that
        send to each other before receiving would otherwise deadlock), gloo starts each at once."""
        tag_of = _tag_of(tag)
        if not sends and not recvs:
            return [], []
        on_device = (list(sends) + list(recvs))[0][1].is_cuda
        try:
            if on_device:
                ops = [dist.P2POp(dist.isend, t, peer, self.group, tag_of(peer)) for peer, t in sends]
                ops += [dist.P2POp(dist.irecv, t, peer, self.group, tag_of(peer)) for peer, t in recvs]
                works = dist.batch_isend_irecv(ops)
            else:  # straight to the process group: torch.distributed's wrappers cost more than gloo
                pg, rank_in = self._pg()
                works = [pg.send([t], rank_in(peer), tag_of(peer)) for peer, t in sends]
                works += [pg.recv([t], rank_in(peer), tag_of(peer)) for peer, t in recvs]
        except RuntimeError as e:  # e.g. a peer already gone: gloo fails at posting
            peer = (list(sends) + list(recvs))[0][0]
            raise TransformError(_failure(what, "posting to", peer, deadline.timeout, e)) from None
        pend = [Pending(w, peer, "send to", what, deadline, on_device) for w, (peer, _) in zip(works, sends)]
        pend += [Pending(w, peer, "receive from", what, deadline, on_device)
                 for w, (peer, _) in zip(works[len(sends):], recvs)]
        return pend[:len(sends)], pend[len(sends):]

    def _pg(self) -> tuple[dist.ProcessGroup, Callable[[int], int]]:
        """The process group and its rank of each global rank."""
        if self._group_ranks is None:
            pg = self.group or dist.distributed_c10d._get_default_group()
            self._group_ranks = (pg, lru_cache(maxsize=None)(lambda r: dist.get_group_rank(pg, r)))
        return self._group_ranks

    def link(self, peer: int) -> Link:
        """This rank's header traffic with ``peer`` over this group (one per pair, kept across
        calls and transforms: headers between a pair match in order)."""
        pg = self._pg()[0]  # the group itself: a re-created default group starts afresh
        key = (id(pg), peer)
        link = _links.get(key)
        if link is None or link.group is not pg:
            link = _links[key] = Link(pg, peer)
        return link

    def host_ok(self) -> bool:
        """Whether the group moves host tensors (gloo, or "cpu:gloo,cuda:nccl"): then headers stay
        on the host; an NCCL-only group needs them on the device (one sync per call to read)."""
        if self._host_ok is None:
            backend = str(dist.get_backend(self.group))
            self._host_ok = "gloo" in backend or "cpu" in backend
        return self._host_ok


_links: dict[tuple[int, int], Link] = {}  # (id of the group, peer) -> Link


@dataclass
class Slot:
    """One posted receive of a peer's header message: ``room`` bytes (the header, then room for a
    payload)."""

    buf: torch.Tensor
    room: int
    pending: Any  # Pending (None until an NCCL header round posts it)


class Link:
    """This rank's traffic with one peer over one group: the count of calls the pair made (the
    payloads' tags), and the headers: the receive of the peer's next header message, posted
    ahead with room for the payload the peer sent lately (so a repeated call's payload rides in its
    header: one message, already expected), and the room the peer said its own next receive from
    this rank has. Every header receive has at least DEFAULT_ROOM, so a sender that has heard
    nothing newer fills no more. Only host headers are received ahead: a pending NCCL receive would
    hold up the stream's later sends."""

    def __init__(self, group: Any, peer: int) -> None:
        self.group, self.peer = group, peer
        self.calls = 0  # calls that crossed the wire made with the peer (its payload tags count them)
        self.sent = 0  # header messages sent to the peer so far
        self.posted = 0  # header receives posted from the peer so far
        self.their = (-1, DEFAULT_ROOM)  # (index of this rank's send it is for, room), from the peer
        self.ahead: Slot | None = None
        self.spare: list[torch.Tensor] = []
        self.recent: deque[int] = deque(maxlen=8)  # payload bytes expected from the peer lately

    def send_room(self) -> int:
        """Room of the receive the peer posted for this rank's next header message."""
        index, room = self.their
        return room if index == self.sent else DEFAULT_ROOM

    def learn(self, index: int, room: int) -> None:
        if index >= 0:
            self.their = (index, room)

    def take(self, transport: P2P, what: str, deadline: Deadline) -> Slot:
        """This call's receive of the peer's header (host headers): the one posted ahead, or one
        posted now."""
        if self.ahead is not None:
            slot, self.ahead = self.ahead, None
            slot.pending.renew(what + " (header)", deadline)
            return slot
        return self._post(DEFAULT_ROOM, transport, what + " (header)", deadline)

    def plan_ahead(self, expect: int) -> tuple[int, int]:
        """(index, room) of the receive ``post_ahead`` will post, for this call's header to tell
        the peer; ``expect``: payload bytes this call expects from the peer."""
        self.recent.append(expect)
        room = HEADER_BYTES + min(ROOM_MAX, -(-max(self.recent) * 5 // 4 // 4096) * 4096)  # 25% slack
        return self.posted, max(room, DEFAULT_ROOM)

    def unasked(self) -> None:
        """The peer sent this call's payload on its own by choice: the receives posted ahead need
        no room for it."""
        if self.recent:
            self.recent[-1] = 0

    def post_ahead(self, room: int, transport: P2P, deadline: Deadline) -> None:
        self.ahead = self._post(room, transport, "a later call (header)", deadline)

    def _post(self, room: int, transport: P2P, what: str, deadline: Deadline) -> Slot:
        fit = next((i for i, b in enumerate(self.spare) if b.numel() >= room), None)
        buf = self.spare.pop(fit) if fit is not None else torch.empty(room, dtype=torch.uint8)
        pending = transport.post([], [(self.peer, buf[:room])], HEADER_TAG, what, deadline)[1][0]
        self.posted += 1
        return Slot(buf, room, pending)

    def give(self, buf: torch.Tensor) -> None:
        """A slot's buffer, read and done with: kept for a later receive (two cover a call and
        the one posted ahead)."""
        self.spare.append(buf)
        self.spare.sort(key=lambda b: -b.numel())
        del self.spare[2:]  # the largest: a smaller receive fits in them too


DEFAULT_ROOM = HEADER_BYTES + (16 << 10)  # every header receive has this room at least
ROOM_MAX = 64 << 20  # payloads larger than this never ride in a header (they go on their own)
# Payloads (or pieces, on average) this big go on their own, straight from and into the tensors
# (engine.Message). Measured on gloo: pieces of 512 KiB beat packing clearly, 128 KiB ones lose.
IN_PLACE_MIN = 192 << 10
MAX_PIECES = 1024  # pieces of one message (each has a tag of its own: piece_tag)


def piece_tag(tag: int, i: int) -> int:
    """The tag of piece ``i`` of a payload tagged ``tag``: piece 0 keeps it, the others are above
    every payload tag (PAYLOAD_TAG + 2^20 < 2^21), distinct, and below 2^31 (i < MAX_PIECES)."""
    return tag + (i << 21)


def _tag_of(tag: Tags) -> Callable[[int], int]:
    """Each peer's tag: one for all, or one per peer."""
    return (lambda p: tag) if isinstance(tag, int) else tag.__getitem__


class Simulated:
    """In-process transport for ``Transform.simulate``: one rank's ``post`` records its sends and
    receives; ``deliver`` then fills every receive from its matching send."""

    def __init__(self) -> None:
        self._sends: dict[tuple[int, int, int], torch.Tensor] = {}  # (from, to, tag)
        self._recvs: list[tuple[int, int, int, torch.Tensor]] = []
        self.rank = -1  # the rank whose messages the next post carries

    def deadline(self) -> Deadline:
        return Deadline(1.0)

    def host_ok(self) -> bool:
        return True

    def payload_tags(self, peers: Sequence[int]) -> dict[int, int]:
        return {p: PAYLOAD_TAG for p in peers}

    def post(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
             tag: Tags, what: str, deadline: Deadline) -> tuple[list[Pending], list[Pending]]:
        tag_of = _tag_of(tag)
        for peer, t in sends:
            self._sends[(self.rank, peer, tag_of(peer))] = t
        self._recvs += [(peer, self.rank, tag_of(peer), t) for peer, t in recvs]
        return ([Pending(None, p, "", what, deadline, False) for p, _ in sends],
                [Pending(None, p, "", what, deadline, False) for p, _ in recvs])

    def deliver(self) -> None:
        for peer, rank, tag, t in self._recvs:
            src = self._sends.pop((peer, rank, tag), None)
            if src is None or src.numel() != t.numel():
                raise TransformError(f"plan mismatch: rank {rank} expects {t.numel()} elements from rank "
                                     f"{peer}, which sends {None if src is None else src.numel()}")
            t.copy_(src)
        if self._sends:
            (rank, peer, _), _ = next(iter(self._sends.items()))
            raise TransformError(f"plan mismatch: rank {rank} sends to rank {peer}, which expects nothing")
        self._recvs = []
