"""The per-call protocol: what a call says to each data peer before any payload moves.

In every call that crosses the wire, each rank sends each of its data peers in that direction
(the ranks it sends rows to or receives rows from) one header on the host channel, and receives
one from each; nobody else hears of the call. A header holds the transform's fingerprint, the
direction and call number, dtype, device type and trailing shape, the element counts each side
sends and expects, the pair's count of calls made together, and whether the sender's own input
check failed. Both sides of a pair apply the same rule to the same two headers, so they reach the
same verdict; a payload is posted only for a pair that agrees. So every payload is exactly the size
its receive expects (gloo aborts the process otherwise, and NCCL may not check), nothing is posted
that its peer will not match within the call, and nothing stays posted between calls.

A rank raises when a pair of its own disagrees, after finishing its payloads with the pairs that
agree (their numbers are exact). A rank that exchanges nothing with the rank at fault returns.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from hpcomm.comm import HEADER_BYTES, Deadline, Messages, P2P, Pending, TransformError, keep

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
          torch.float8_e4m3fn, torch.float8_e5m2]
DEVICE_TYPES = ["cpu", "cuda", "meta", "xpu", "mps"]
_MAGIC = 0x68_70_63_6F_6D_6D  # "hpcomm": a stray message of the right size is still caught
# header fields: the call's (equal on every rank), then the pair's
(MAGIC, FINGERPRINT, BACKWARD, SEQ, DTYPE, DEVICE, SHAPE,
 SENDS, EXPECTS, PAIR_CALL, FAILED) = range(11)
_WORDS = HEADER_BYTES // 8

# why a rank's own check failed, as its header tells its peers (index = the FAILED field)
REASONS = ("", "its input check", "a meta tensor as input", "an input with the wrong number of rows",
           "an input with the wrong width", "an input that is not a tensor with a row dim",
           "a bad out= or out_rows=")

NAMES: dict[int, str] = {}  # fingerprint -> the name a Transform was given in this process
_MAX_NAMES = 4096  # bounded: a loop that builds a named transform every step keeps the recent ones


def name_transform(fingerprint: int, name: str) -> None:
    NAMES.pop(fingerprint, None)
    NAMES[fingerprint] = name
    if len(NAMES) > _MAX_NAMES:
        NAMES.pop(next(iter(NAMES)))


@lru_cache(maxsize=256)  # a call's trailing shape is digested every call: mostly the same few
def digest(text: str) -> int:
    """A 63-bit digest equal across processes (``hash`` of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype) if dtype in DTYPES else len(DTYPES)


def device_code(device: torch.device) -> int:
    return DEVICE_TYPES.index(device.type) if device.type in DEVICE_TYPES else len(DEVICE_TYPES)


def dtype_name(code: int) -> str:
    return str(DTYPES[code]) if 0 <= code < len(DTYPES) else "another dtype"


def device_name(code: int) -> str:
    return DEVICE_TYPES[code] if 0 <= code < len(DEVICE_TYPES) else "another device's"


def transform_name(fingerprint: int) -> str:
    """How errors name a transform: the name it was given, and the fingerprint ``repr`` shows."""
    name = NAMES.get(fingerprint)
    return f"transform {name!r} ({fingerprint:016x})" if name else f"transform {fingerprint:016x}"


def describe_call(fields: Sequence[int] | np.ndarray) -> str:
    direction = "backward" if fields[BACKWARD] else "forward"
    return f"{direction} call #{fields[SEQ]} of {transform_name(fields[FINGERPRINT])}"


def payload_tag(call: Sequence[int], count: int, pair_call: int) -> int:
    """The gloo tag of a payload of ``count`` elements in the call ``call`` (its header's shared
    fields) between a pair at its ``pair_call``-th call: equal on both sides exactly when their
    headers agree on these (but for a 2^-30 chance), in [2^30, 2^31), above every header tag."""
    return (1 << 30) | (digest(repr((*call, count, pair_call))) & ((1 << 30) - 1))


def failure(exc: Exception, reason: int) -> Exception:
    """Tag a local check's error with the reason its header reports."""
    exc.hpcomm_reason = reason  # type: ignore[attr-defined]
    return exc


def call_fields(fingerprint: int, backward: bool, seq: int, x: torch.Tensor | None,
                trailing: Sequence[int], failed: int = 0) -> list[int]:
    """The fields of this call's header that every pair shares; ``failed``: this rank's own input
    check failed, for this reason (REASONS)."""
    if failed or x is None:
        return [_MAGIC, fingerprint, int(backward), seq, -1, -1, -1]
    return [_MAGIC, fingerprint, int(backward), seq, dtype_code(x.dtype), device_code(x.device),
            digest(repr(tuple(trailing)))]


def disagreement(me: int, mine: Sequence[int] | np.ndarray, peer: int, theirs: Sequence[int] | np.ndarray
                 ) -> str | None:
    """What differs between this rank's header for ``peer`` and the one ``peer`` sent; the same
    facts on both sides (each names itself as this rank)."""
    if theirs[MAGIC] != _MAGIC:
        return f"rank {peer} sent something that is not an hpcomm header (another library's message?)"
    if theirs[FAILED]:
        reason = REASONS[theirs[FAILED]] if 0 < theirs[FAILED] < len(REASONS) else REASONS[1]
        return f"rank {peer} failed its own input check: it passed {reason} (its error says more)" \
            if theirs[FAILED] > 1 else f"rank {peer} failed its own input check (its error says why)"
    if mine[FAILED]:
        return None  # this rank raises its own error
    this = f"this rank ({me})"
    if mine[FINGERPRINT] != theirs[FINGERPRINT] or mine[BACKWARD] != theirs[BACKWARD] or mine[SEQ] != theirs[SEQ]:
        if mine[BACKWARD] != theirs[BACKWARD]:  # with a new transform every step, too
            hint = " (a rank skipped a backward, or ran one the others did not)"
        elif mine[FINGERPRINT] == theirs[FINGERPRINT]:
            hint = " (the ranks made different numbers of calls)"
        else:
            hint = " (different layouts, e.g. built from different lengths, or different options)"
        return f"{this} is in {describe_call(mine)}, rank {peer} in {describe_call(theirs)}{hint}"
    if mine[DTYPE] != theirs[DTYPE]:
        return f"{this} passes {dtype_name(mine[DTYPE])}, rank {peer} passes {dtype_name(theirs[DTYPE])}"
    if mine[DEVICE] != theirs[DEVICE]:
        return (f"{this} passes a {device_name(mine[DEVICE])} tensor, rank {peer} a "
                f"{device_name(theirs[DEVICE])} tensor")
    if mine[SHAPE] != theirs[SHAPE]:
        return f"{this} and rank {peer} pass different trailing shapes"
    if mine[SENDS] != theirs[EXPECTS] or mine[EXPECTS] != theirs[SENDS]:
        return (f"{this} sends {mine[SENDS]} and expects {mine[EXPECTS]} elements, rank {peer} "
                f"expects {theirs[EXPECTS]} and sends {theirs[SENDS]}")
    if mine[PAIR_CALL] != theirs[PAIR_CALL]:  # e.g. one of them made a call of another transform alone
        return (f"{this} and rank {peer} count different numbers of calls made together "
                f"({mine[PAIR_CALL]} and {theirs[PAIR_CALL]}): one of them made a call the other did not")
    return None


class Exchange:
    """One call's protocol on one rank, and all of its state: the headers to and from each data
    peer, each pair's verdict, and the posted payloads of the pairs that agree.

    ``sends`` / ``expects``: elements this rank sends to / expects from each data peer (a message
    to itself, a loopback, needs no header). The headers go out at once; ``problems`` waits for
    the peers' and says what differs; ``post`` posts the payloads of the pairs that agree."""

    def __init__(self, transport: P2P, rank: int, call: list[int], sends: dict[int, int],
                 expects: dict[int, int], what: str, deadline: Deadline, failed: int = 0) -> None:
        self.rank, self._transport, self._what, self._deadline = rank, transport, what, deadline
        self.peers = sorted((set(sends) | set(expects)) - {rank})
        words = np.zeros((len(self.peers), _WORDS), dtype=np.int64)
        for i, p in enumerate(self.peers):
            words[i, :FAILED + 1] = [*call, sends.get(p, 0), expects.get(p, 0), transport.pair_call(p), failed]
        self._mine = words
        self._theirs_buf = torch.empty((len(self.peers), HEADER_BYTES), dtype=torch.uint8)
        heads = torch.from_numpy(words.view(np.uint8))  # [peers, HEADER_BYTES]
        self._sent, got = transport.channel.post([(p, heads[i]) for i, p in enumerate(self.peers)],
                                                 [(p, self._theirs_buf[i]) for i, p in enumerate(self.peers)],
                                                 "", deadline) if self.peers else ([], [])
        self._got = dict(zip(self.peers, got))
        # gloo's payload tags: (tag of this rank's payload to the peer, tag of the peer's to it)
        self._tags = {p: (payload_tag(call, sends.get(p, -1), words[i, PAIR_CALL]),
                          payload_tag(call, expects.get(p, -1), words[i, PAIR_CALL]))
                      for i, p in enumerate(self.peers)}
        self._verdicts: dict[int, str | None] = {}
        self._lost = False  # a header never came, or posting failed: a TransformError

    def verdict(self, peer: int) -> str | None:
        """None if the pair agrees (waits for the peer's header), else what differs."""
        if peer == self.rank:
            return None
        if peer not in self._verdicts:
            i = self.peers.index(peer)
            try:
                self._got[peer].wait()
            except TransformError as e:
                self._lost = True
                self._verdicts[peer] = str(e)
                return self._verdicts[peer]
            theirs = self._theirs_buf[i].numpy().view(np.int64)
            self._verdicts[peer] = disagreement(self.rank, self._mine[i], peer, theirs)
        return self._verdicts[peer]

    def problems(self) -> list[str]:
        """What differs with each data peer (waits for every header); empty if all agree."""
        for p in self.peers:
            self.verdict(p)
        return [text for _, text in sorted(self._verdicts.items()) if text is not None]

    def error(self, problems: list[str]) -> Exception:
        kind = TransformError if self._lost else ValueError
        return kind(f"rank {self.rank}: {self._what} refused: " + "; ".join(problems))

    def post(self, sends: Messages, recvs: Messages) -> tuple[list[Pending], dict[int, Pending]]:
        """Post the payloads: the sends, and each peer's receive.

        Device path (NCCL has no tags): only the pairs that agree, all in one group, once every
        header is here; a pair that disagrees sends nothing and posts no receive. Host path
        (gloo): every payload at once, without waiting for the headers, each under a tag that
        digests the pair's header fields (``payload_tag``): a payload matches its receive only
        when the two headers agree on the call, the size and the pair's call count, so a
        disagreement never reaches gloo's size check (a process abort); what it left posted is
        kept (Call.release). The payloads' waits get a timeout of their own: a peer may post
        late, once a third rank's header timed out."""
        transport, deadline = self._transport, self._transport.deadline()
        peers = sorted({p for p, _ in [*sends, *recvs]})
        batches = [peers] if transport.grouped else [[p] for p in peers]
        sent: list[Pending] = []
        got: dict[int, Pending] = {}
        for batch in batches:
            ok = {p for p in batch if not transport.grouped or self.verdict(p) is None}
            out = [(p, t) for p, t in sends if p in ok]
            into = [(p, t) for p, t in recvs if p in ok]
            try:
                posted, received = transport.post(out, into, self._what, deadline, self._tags)
            except TransformError as e:  # reported with the other pairs' problems
                self._lost = True
                self._verdicts.update({p: str(e) for p in ok})
                continue
            sent += posted
            got.update({p: g for (p, _), g in zip(into, received)})
        return sent, got

    def sent(self) -> None:
        """Wait for this rank's headers to leave (after a call that went well, they have)."""
        for pending in self._sent:
            pending.wait()
