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
from typing import Any, Mapping, Sequence

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


def _renew(slot: tuple[torch.Tensor, Pending], what: str, deadline: Deadline) -> tuple[torch.Tensor, Pending]:
    return slot[0], slot[1].renew(what + " (header)", deadline)


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

    def deadline(self) -> Deadline:
        return Deadline(self.timeout)

    def payload_tags(self, peers: Sequence[int]) -> dict[int, int]:
        """The tags of this call's payloads with each peer: a count of the calls the pair has
        made (both sides count every call they share), so a send its receiver refused (a call
        that raised) never matches a receive of a later call. Wraps after 2^20 calls."""
        key = id(self.group)
        tags = {}
        for p in peers:
            n = _pair_calls.get((key, p), 0)
            _pair_calls[(key, p)] = n + 1
            tags[p] = PAYLOAD_TAG + n % (1 << 20)
        return tags

    def post(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
             tag: Tags, what: str, deadline: Deadline) -> tuple[list[Pending], list[Pending]]:
        """Post every message of the batch at once; NCCL needs them in one group (two ranks that
        send to each other before receiving would otherwise deadlock), gloo starts each at once."""
        tag_of = (lambda p: tag) if isinstance(tag, int) else tag.__getitem__
        ops = [dist.P2POp(dist.isend, t, peer, self.group, tag_of(peer)) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group, tag_of(peer)) for peer, t in recvs]
        if not ops:
            return [], []
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:  # e.g. a peer already gone: gloo fails at posting
            peer = (list(sends) + list(recvs))[0][0]
            raise TransformError(_failure(what, "posting to", peer, deadline.timeout, e)) from None
        on_device = ops[0].tensor.is_cuda
        pend = [Pending(w, op.peer, "send to" if op.op is dist.isend else "receive from", what, deadline,
                        on_device) for w, op in zip(works, ops)]
        return pend[:len(sends)], pend[len(sends):]

    def inline_room(self) -> int:
        """Bytes of payload a header message may carry (0: none): the same on every rank of the
        group (every receive posted ahead has this room), bounded so that all of them together
        stay within 16 MiB. Only on the host, where headers are received ahead."""
        if not self.host_ok():
            return 0
        peers = max(dist.get_world_size(self.group) - 1, 1)
        return max(min(INLINE_MAX, (16 << 20) // peers) // 16 * 16, 0)

    def headers(self, peers: Sequence[int], what: str, deadline: Deadline, device: torch.device
                ) -> dict[int, tuple[torch.Tensor, Pending]]:
        """This call's receive of each peer's header message (the one the previous call posted
        ahead, or one posted now), and the next call's, posted ahead. With the receive already
        waiting, a peer's header goes out the moment it is ready (one hop, like a collective's own
        notification). Only host headers are received ahead: a pending NCCL receive would hold up
        the stream's later sends."""
        box = self._inbox()
        missing = [(p, torch.empty(self._room(), dtype=torch.uint8, device=device))
                   for p in peers if box is None or p not in box]
        posted = dict(zip((p for p, _ in missing), self.post([], missing, HEADER_TAG, what + " (header)", deadline)[1]))
        bufs = dict(missing)
        slots = {p: (bufs[p], posted[p]) if p in posted else _renew(box.pop(p), what, deadline)  # type: ignore[union-attr]
                 for p in peers}
        self._ahead(peers, deadline)
        return slots

    def _ahead(self, peers: Sequence[int], deadline: Deadline) -> None:
        """Post the receive of each peer's next header now, so that it waits long before the peer
        sends (posting it as the call ends measured slower: the peer may be sending already)."""
        box = self._inbox()
        if box is None:
            return
        new = [(p, torch.empty(self._room(), dtype=torch.uint8)) for p in peers if p not in box]
        for (p, buf), pending in zip(new, self.post([], new, HEADER_TAG, "a later call (header)", deadline)[1]):
            box[p] = (buf, pending)

    def _room(self) -> int:
        return HEADER_BYTES + self.inline_room()

    def _inbox(self) -> dict[int, tuple[torch.Tensor, Pending]] | None:
        if not self.host_ok():
            return None
        key = id(self.group)
        if key not in _inboxes or _inboxes[key][0] is not self.group:
            _inboxes[key] = (self.group, {})
        return _inboxes[key][1]

    def host_ok(self) -> bool:
        """Whether the group moves host tensors (gloo, or "cpu:gloo,cuda:nccl"): then headers stay
        on the host; an NCCL-only group needs them on the device (one sync per call to read)."""
        if self._host_ok is None:
            backend = str(dist.get_backend(self.group))
            self._host_ok = "gloo" in backend or "cpu" in backend
        return self._host_ok


_pair_calls: dict[tuple[int, int], int] = {}  # (id of the group, peer) -> calls made together
# id of the group -> (the group, {peer: its next header's receive, posted ahead})
_inboxes: dict[int, tuple[Any, dict[int, tuple[torch.Tensor, Pending]]]] = {}
INLINE_MAX = 256 << 10  # a payload up to this size rides in its header's message


class Simulated:
    """In-process transport for ``Transform.simulate``: one rank's ``post`` records its sends and
    receives; ``deliver`` then fills every receive from its matching send."""

    def __init__(self) -> None:
        self._sends: dict[tuple[int, int], torch.Tensor] = {}
        self._recvs: list[tuple[int, int, torch.Tensor]] = []
        self.rank = -1  # the rank whose messages the next post carries

    def deadline(self) -> Deadline:
        return Deadline(1.0)

    def payload_tags(self, peers: Sequence[int]) -> dict[int, int]:
        return {p: PAYLOAD_TAG for p in peers}

    def post(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
             tag: Tags, what: str, deadline: Deadline) -> tuple[list[Pending], list[Pending]]:
        for peer, t in sends:
            self._sends[(self.rank, peer)] = t
        self._recvs += [(peer, self.rank, t) for peer, t in recvs]
        return ([Pending(None, p, "", what, deadline, False) for p, _ in sends],
                [Pending(None, p, "", what, deadline, False) for p, _ in recvs])

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
