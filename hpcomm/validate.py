"""Cross-rank checks: the in-band header every call exchanges with its peers (always on), and the
full fingerprint agreement of ``validate=True`` (for debugging).

Header: in every call that moves anything off-rank, each rank of the transform sends every other
one header message: the transform's fingerprint, direction, call number, dtype, device, trailing
shape; the element counts and payload tag the pair uses; whether the payload rides behind the
header and the room of the receive posted for the peer's next header; whether the sender's own
input check failed. Three rules make that safe without an extra round trip (``Round``):

- A payload rides in its header's message only within the room the receiver announced for that
  very message (receives are posted ahead, ``comm.Link``), so no message exceeds its receive
  (gloo aborts the process otherwise), and a repeated call is one message per peer.
- A payload too big for that is sent only once the receiver's header agrees with the sender's
  (``Round.agrees``, the same verdict on both sides), into a receive of exactly its size.
- Every rank sees every header and applies the same rule (``odd_ones``), so all raise alike; a
  payload is used only once its sender's header agrees.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hpcomm.comm import HEADER_BYTES, HEADER_TAG, Slot, TransformError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
          torch.float8_e4m3fn, torch.float8_e5m2]
DEVICE_TYPES = ["cpu", "cuda", "meta", "xpu", "mps"]
_MAGIC = 0x68_70_63_6F_6D_6D  # "hpcomm": a stray message of the right size is still caught
# header fields
(MAGIC, FINGERPRINT, BACKWARD, SEQ, DTYPE, DEVICE, SHAPE,  # the call: equal on every rank
 SENDS, EXPECTS, TAG,  # the pair's payload: what each side sends and expects, and its tag
 INLINE, NEXT_INDEX, NEXT_ROOM,  # 1: the payload rides here (2: on its own by choice); next room
 FAILED) = range(14)
HEADER_LEN = 14
_HEADER_WORDS = HEADER_BYTES // 8


@lru_cache(maxsize=256)  # a call's trailing shape is digested every call: mostly the same few
def digest(text: str) -> int:
    """A 63-bit digest equal across processes (``hash`` of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)


def device_code(device: torch.device) -> int:
    return DEVICE_TYPES.index(device.type) if device.type in DEVICE_TYPES else len(DEVICE_TYPES)


def describe_call(fields: Sequence[int]) -> str:
    direction = "backward" if fields[BACKWARD] else "forward"
    return f"{direction} call #{fields[SEQ]} of transform {fields[FINGERPRINT]:016x}"


# why a rank's own check failed, as its header tells its peers (index = the FAILED field)
REASONS = ("", "its input check", "a meta tensor as input", "an input with the wrong number of rows",
           "an input with the wrong width", "an input that is not a tensor with a row dim",
           "a bad out= or out_rows=")


def failure(exc: Exception, reason: int) -> Exception:
    """Tag a local check's error with the reason its header reports."""
    exc.hpcomm_reason = reason  # type: ignore[attr-defined]
    return exc


def header(fingerprint: int, backward: bool, seq: int, x: torch.Tensor | None, trailing: Sequence[int],
           failed: int = 0) -> list[int]:
    """This rank's header, its per-pair fields still unset (-1); ``failed``: this rank's own
    input check failed, for this reason (REASONS)."""
    pair = [-1] * (FAILED - SENDS)
    if failed or x is None:
        return [_MAGIC, fingerprint, int(backward), seq, -1, -1, -1, *pair, failed or 1]
    return [_MAGIC, fingerprint, int(backward), seq, dtype_code(x.dtype), device_code(x.device),
            digest(repr(tuple(trailing))), *pair, 0]


def disagreement(me: int, mine: Sequence[int], peer: int, theirs: Sequence[int]) -> str | None:
    """What differs between this rank's header for ``peer`` and the one ``peer`` sent; the same
    text (up to the order of the two ranks) on both sides."""
    if theirs[MAGIC] != _MAGIC:
        return f"rank {peer} sent something that is not an hpcomm header (another library's message?)"
    if theirs[FAILED]:
        reason = REASONS[theirs[FAILED]] if 0 < theirs[FAILED] < len(REASONS) else REASONS[1]
        return f"rank {peer} failed its own input check: it passed {reason} (its error says more)" \
            if theirs[FAILED] > 1 else f"rank {peer} failed its own input check (its error says why)"
    if mine[FAILED]:
        return None  # this rank raises its own error
    if mine[FINGERPRINT] != theirs[FINGERPRINT] or mine[BACKWARD] != theirs[BACKWARD] or mine[SEQ] != theirs[SEQ]:
        if mine[BACKWARD] != theirs[BACKWARD]:  # with a new transform every step, too
            hint = " (a rank skipped a backward, or ran one the others did not)"
        elif mine[FINGERPRINT] == theirs[FINGERPRINT]:
            hint = " (the ranks made different numbers of calls)"
        else:
            hint = " (different layouts, e.g. built from different lengths, or different options)"
        return f"rank {me} is in {describe_call(mine)}, rank {peer} in {describe_call(theirs)}{hint}"
    if mine[DTYPE] != theirs[DTYPE]:
        return f"rank {me} passes {dtype_name(mine[DTYPE])}, rank {peer} passes {dtype_name(theirs[DTYPE])}"
    if mine[DEVICE] != theirs[DEVICE]:
        return (f"rank {me} passes a {device_name(mine[DEVICE])} tensor, rank {peer} a "
                f"{device_name(theirs[DEVICE])} tensor")
    if mine[SHAPE] != theirs[SHAPE]:
        return f"ranks {me} and {peer} pass different trailing shapes"
    if mine[SENDS] != theirs[EXPECTS] or mine[EXPECTS] != theirs[SENDS]:
        return (f"rank {me} sends {mine[SENDS]} and expects {mine[EXPECTS]} elements, rank {peer} "
                f"expects {theirs[EXPECTS]} and sends {theirs[SENDS]}")
    if mine[TAG] != theirs[TAG]:  # e.g. one of them made a call of another transform alone
        return (f"ranks {me} and {peer} count different numbers of calls made together "
                f"({mine[TAG]} and {theirs[TAG]}): one of them made a call the other did not")
    return None


def odd_ones(rows: Mapping[int, Sequence[int]]) -> list[str]:
    """Every rank's header (the per-pair fields aside) -> what the ranks that differ from the
    majority differ in; the same list on every rank that sees the same rows."""
    keys = {r: tuple(row[:SENDS]) + (row[FAILED],) for r, row in rows.items()}
    values = list(keys.values())
    majority = max(values, key=values.count)
    leader = next(r for r, k in keys.items() if k == majority)
    problems = []
    for r, key in keys.items():
        if key != majority:
            text = disagreement(leader, rows[leader], r, rows[r])
            problems.append(text or f"rank {r} failed its own input check")
    return problems


class Round:
    """One call's headers with every other rank of the transform.

    Each peer gets one header message; a payload rides in it (``INLINE``) when it fits the room of
    the receive the peer posted for it (``Link.send_room``). Each peer's header arrives in the
    receive this rank posted ahead (``Link``); the header says how much room the receive posted for
    the next message has, which is sized from the payloads of recent calls, so a repeated call's
    payloads travel in their headers.

    ``agrees(peer)`` waits for one peer's header and says whether the pair may exchange payloads
    (both sides compute the same answer, so a payload is sent exactly when its receive expects it);
    ``problems()`` waits for every header and lists what differs, the same list on every rank."""

    def __init__(self, rank: int, peers: Sequence[int], transport: Any, what: str, deadline: Any,
                 device: torch.device, ahead: bool) -> None:
        self.rank, self._transport, self._what, self._deadline = rank, transport, what, deadline
        self._ahead = ahead  # host headers: received ahead, payloads may ride in them
        self.links = {p: transport.link(p) for p in peers}
        self._host = transport.host_ok()
        if self._host:
            self.slots = {p: link.take(transport, what, deadline) for p, link in self.links.items()}
        else:  # NCCL: a header's receive goes in one group with the header sends (see send)
            self.slots = {p: Slot(torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device), HEADER_BYTES, None)
                          for p in peers}
        self.mine: dict[int, list[int]] = {}
        self._device = device
        self._sent: list[Any] = []
        self._rows: dict[int, list[int]] = {}
        self._verdict: dict[int, bool] = {}

    def send_room(self, peer: int) -> int:
        """Payload bytes that may ride in this rank's header message to ``peer``."""
        return self.links[peer].send_room() - HEADER_BYTES if self._ahead else -1

    def recv_room(self, peer: int) -> int:
        """Payload bytes ``peer``'s header message to this rank has room for."""
        return self.slots[peer].room - HEADER_BYTES if self._ahead else -1

    def send(self, head: list[int], pairs: Mapping[int, tuple[int, int, int]], expect: Mapping[int, int],
             inline: Sequence[int] = (), pack: Callable[[int], torch.Tensor] | None = None,
             own: Collection[int] = ()) -> None:
        """Send each peer this rank's header: ``head`` with the pair's (sends, expects, tag); to
        the peers in ``inline`` with the payload ``pack(peer)`` returns behind it (a uint8 buffer:
        HEADER_BYTES of room, then the payload), each sent as soon as it is packed; ``own``: peers
        whose payload goes on its own by this rank's choice, even if it would fit (its receiver
        then stops making room for it). Then post the receives of the peers' next headers (room for
        ``expect`` bytes, recent calls considered)."""
        peers = list(self.links)
        ahead = {p: self.links[p].plan_ahead(expect.get(p, 0)) if self._ahead else (-1, -1) for p in peers}
        for p in peers:
            row = list(head)
            row[SENDS:FAILED] = [*pairs.get(p, (-1, -1, -1)), 1 if p in inline else 2 if p in own else 0,
                                 *ahead[p]]
            self.mine[p] = row
        words = np.zeros((len(peers), _HEADER_WORDS), dtype=np.int64)
        words[:, :HEADER_LEN] = [self.mine[p] for p in peers]
        heads = dict(zip(peers, torch.from_numpy(words).view(torch.uint8)))
        # first the headers a payload of its own waits for, then those carrying their payload, then
        # the rest (only the final check reads them)
        alone = [p for p in peers if p not in inline]
        if not self._host:  # NCCL: sends and receives in one group, or two ranks wait on each other
            sent, got = self._transport.post([(p, heads[p].to(self._device)) for p in peers],
                                             [(p, self.slots[p].buf) for p in peers], HEADER_TAG,
                                             self._what + " (header)", self._deadline)
            self._sent = sent
            for p, pending in zip(peers, got):
                self.slots[p].pending = pending
            return
        self._post([(p, heads[p]) for p in alone if p in pairs and pairs[p][0] > 0])
        for p in inline:
            message = pack(p)  # type: ignore[misc]
            message[:HEADER_BYTES].copy_(heads[p])
            self._post([(p, message)])
        self._post([(p, heads[p]) for p in alone if not (p in pairs and pairs[p][0] > 0)])
        if self._ahead:  # after the sends: they are what peers wait for
            for p in peers:
                self.links[p].post_ahead(ahead[p][1], self._transport, self._deadline)

    def _post(self, messages: list[tuple[int, torch.Tensor]]) -> None:
        for p, _ in messages:
            self.links[p].sent += 1
        self._sent += self._transport.post(messages, [], HEADER_TAG, self._what + " (header)", self._deadline)[0]

    def theirs(self, peer: int) -> list[int]:
        if peer not in self._rows:
            slot = self.slots[peer]
            slot.pending.wait()
            row = slot.buf[:HEADER_LEN * 8].view(torch.int64).tolist()
            if row[MAGIC] == _MAGIC:
                self.links[peer].learn(row[NEXT_INDEX], row[NEXT_ROOM])
                if row[INLINE] == 2 and self._ahead:
                    self.links[peer].unasked()
            self._rows[peer] = row
        return self._rows[peer]

    def carried(self, peer: int) -> bool:
        """Whether ``peer``'s header message carried its payload (after ``agrees``)."""
        return bool(self.theirs(peer)[INLINE] == 1)

    def inline(self, peer: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self.slots[peer].buf
        return buf[HEADER_BYTES:HEADER_BYTES + numel * dtype.itemsize].view(dtype)

    def arrived(self, peer: int) -> bool:
        """Whether a peer's header is here already (without waiting)."""
        return peer in self._rows or self.slots[peer].pending.done()

    def agrees(self, peer: int) -> bool:
        if peer not in self._verdict:
            self._verdict[peer] = disagreement(self.rank, self.mine[peer], peer, self.theirs(peer)) is None
        return self._verdict[peer]

    def verdict(self, peer: int) -> bool:
        """``agrees``, with a peer whose header never came counted as disagreeing."""
        try:
            return self.agrees(peer)
        except TransformError:
            return False

    def problems(self, pairs: Sequence[int]) -> list[str]:
        """Every rank's odd ones out; if none, what differs with the peers in ``pairs`` (those a
        payload is exchanged with)."""
        rows = {p: self.theirs(p) for p in self.links}
        rows[self.rank] = next(iter(self.mine.values()))
        problems = odd_ones(rows)  # the same on every rank: all raise alike
        if not problems:
            problems = [text for p in pairs
                        if (text := disagreement(self.rank, self.mine[p], p, rows[p])) is not None]
        self.sent()
        return problems

    def sent(self) -> None:
        """Wait for this rank's headers to leave (a send whose work is dropped never goes out)."""
        for pending in self._sent:
            pending.wait()

    def release(self) -> None:
        """The call is done with the headers' buffers: the links reuse the host ones."""
        for p, slot in self.slots.items():
            if self._host:
                self.links[p].give(slot.buf)

    def settle(self) -> bool:
        """After a failure: wait for every header both ways; False if some never moved (then this
        round must stay alive: a receive or send dropped in flight would stall gloo's pair)."""
        ok = True
        for pending in [*self._sent, *(slot.pending for slot in self.slots.values() if slot.pending)]:
            try:
                pending.wait()
            except TransformError:
                ok = False
        return ok


def dtype_name(code: int) -> str:
    return str(DTYPES[code]) if 0 <= code < len(DTYPES) else "another dtype"


def device_name(code: int) -> str:
    return DEVICE_TYPES[code] if 0 <= code < len(DEVICE_TYPES) else "another device's"


# -- validate=True: the full cross-rank check ------------------------------------------------------

_SHOWN_DIMS = 8
_FIELDS = 7 + _SHOWN_DIMS


def _dims(row: list[int]) -> str:
    shown = row[7:7 + min(row[6], _SHOWN_DIMS)]
    return str(shown)[:-1] + (", ...]" if row[6] > _SHOWN_DIMS else "]")


def gather(fields: list[int], ranks: Sequence[int], transport: Any) -> list[list[int]]:
    """Every participant's int64 fields on every participant: each sends its own to the first
    participant, which sends the stacked table back to all (point to point, so ranks outside the
    transform need not take part)."""
    rank = dist.get_rank()
    leader = ranks[0]
    table = torch.empty(len(ranks), len(fields), dtype=torch.int64)
    deadline = transport.deadline()
    if rank == leader:
        table[ranks.index(rank)] = torch.tensor(fields)
        others = [(p, table[i]) for i, p in enumerate(ranks) if p != rank]
        for pending in transport.post([], others, HEADER_TAG + 2, "validation", deadline)[1]:
            pending.wait()
        for pending in transport.post([(p, table.view(-1)) for p, _ in others], [], HEADER_TAG + 3,
                                      "validation", deadline)[0]:
            pending.wait()
    else:
        for pending in transport.post([(leader, torch.tensor(fields))], [], HEADER_TAG + 2, "validation",
                                      deadline)[0]:
            pending.wait()
        for pending in transport.post([], [(leader, table.view(-1))], HEADER_TAG + 3, "validation",
                                      deadline)[1]:
            pending.wait()
    return table.tolist()


def agree(fingerprint: int, ranks: Sequence[int], rank: int, x: torch.Tensor, trailing: Sequence[int],
          backward: bool, error: Exception | None, transport: Any, extra: int = 0) -> None:
    """Cross-rank validation: every participant raises the same error if any disagrees on the
    transform, direction, dtype, device or trailing shape, or failed its own check. ``extra``: a
    flag a rank raises for a check of its own (e.g. replicas' gradients differ)."""
    ok = error is None
    dims = list(trailing)
    fields = [fingerprint, int(backward), int(not ok) | (extra << 1)]
    if ok:
        fields += [dtype_code(x.dtype), device_code(x.device), digest(repr(dims)), len(dims), *dims[:_SHOWN_DIMS]]
    fields += [-1] * (_FIELDS - len(fields))
    table = gather(fields, ranks, transport)
    problems = []
    keys = [tuple(row[:2]) for row in table]
    majority = max(keys, key=keys.count)  # name the odd ones out, not the leader
    agreeing = [r for r, key in zip(ranks, keys) if key == majority]
    for r, row, key in zip(ranks, table, keys):
        if key != majority:
            problems.append(f"rank {r} calls a different transform (or direction) than ranks {agreeing}")
        elif row[2] & 1:
            problems.append(f"rank {r} failed its own input check")
        elif row[2] >> 1:
            problems.append(f"rank {r}: destination replicas' gradients differ under grad='replicated' "
                            f"(they hold partial gradients: use grad='sum')")
    good = [(r, row) for r, row in zip(ranks, table) if not row[2] & 1]
    for r, row in good[1:]:
        r0, row0 = good[0]
        if row[3] != row0[3]:
            problems.append(f"rank {r} passes {dtype_name(row[3])}, rank {r0} passes {dtype_name(row0[3])}")
        if row[4] != row0[4]:
            problems.append(f"rank {r} passes a {device_name(row[4])} tensor, rank {r0} a "
                            f"{device_name(row0[4])} tensor")
        if row[5] != row0[5]:
            problems.append(f"rank {r} passes trailing dims {_dims(row)}, rank {r0} passes {_dims(row0)}")
    if problems:
        detail = str(error) if error is not None else "; ".join(problems)
        raise ValueError(f"hpcomm validation failed on rank {rank}: {detail}"
                         + (f" (all problems: {'; '.join(problems)})" if error is not None else ""))
