"""Transport: moves each rank's per-peer messages.

``exchange`` issues one grouped send/recv (``batch_isend_irecv``: NCCL's grouped P2P on GPU, gloo
on CPU) per call and returns a handle whose ``wait`` enforces a timeout; ``simulate_exchange`` does
the same for a whole simulated world in one process; ``agree`` gathers one small fingerprint per
participant to all participants (point to point, so ranks outside the transform need not take
part). The engine hands both paths the same messages, so simulation differs only here.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

Messages = Sequence[tuple[int, torch.Tensor]]  # (peer global rank, contiguous 1-D tensor)


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


class Handle:
    """Outstanding transfers of one exchange; ``wait`` blocks until all are done, or raises
    TransformError naming the peers still outstanding once ``timeout`` seconds have passed."""

    def __init__(self, works: list[dist.Work], peers: Sequence[tuple[str, int | str]], timeout: float,
                 what: str, device_wait: bool = False) -> None:
        self._works, self._peers, self._timeout, self._what = works, peers, timeout, what
        self._device_wait = device_wait

    def wait(self) -> None:
        deadline = time.monotonic() + self._timeout
        failed = []
        # gloo completes a work only inside wait(), so each is waited on in turn; after the first
        # timeout the rest get a short grace period, to name exactly the peers that are missing
        for work, (kind, peer) in zip(self._works, self._peers):
            try:
                if self._device_wait:
                    # NCCL: wait() only orders the current stream after the transfer (the host
                    # goes on); the process group's watchdog enforces its timeout
                    work.wait()
                else:
                    work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.05)))
            except RuntimeError as e:
                failed.append((f"{kind} {peer}", e))
        self._works = []
        if failed:
            raise TransformError(
                f"rank {dist.get_rank()}: {self._what} did not complete within {self._timeout:g} s; "
                f"failed: {', '.join(name for name, _ in failed)} (first error: {failed[0][1]})")


def exchange(sends: Messages, recvs: Messages, group: dist.ProcessGroup | None = None,
             timeout: float | None = None,
             what: str = "transform") -> Handle:
    """Post every send and receive of this rank as one group (peers are global ranks)."""
    ops = [dist.P2POp(dist.isend, t, peer, group) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for peer, t in recvs]
    peers = [("send to", p) for p, _ in sends] + [("receive from", p) for p, _ in recvs]
    try:
        works = dist.batch_isend_irecv(ops) if ops else []
    except RuntimeError as e:  # e.g. a peer already gone: gloo fails at posting
        raise TransformError(f"rank {dist.get_rank()}: {what} could not post its transfers ({e})") from None
    on_gpu = any(t.is_cuda for _, t in list(sends) + list(recvs))
    return Handle(works, peers, default_timeout(group) if timeout is None else timeout, what, on_gpu)


def collective(op: Callable[..., Any], args: tuple[Any, ...],
               group: dist.ProcessGroup | None = None, timeout: float | None = None,
               what: str = "transform") -> Handle:
    """Post one collective (all_to_all_single, all_gather_into_tensor, broadcast) over the group:
    the same transfer as ``exchange`` when every member takes part, and NCCL's algorithms beat
    point to point."""
    try:
        work = op(*args, group=group, async_op=True)
    except RuntimeError as e:
        raise TransformError(f"rank {dist.get_rank()}: {what} could not post its {op.__name__} "
                             f"({e})") from None
    return Handle([work], [(op.__name__, "over the group")], default_timeout(group) if timeout is None
                  else timeout, what, args[0].is_cuda)


def simulate_exchange(sends: Mapping[int, Messages], recvs: Mapping[int, Messages]) -> None:
    """In-process transport: every posted receive is filled from its matching send."""
    posted = {(rank, peer): t for rank, msgs in sends.items() for peer, t in msgs}
    for rank, msgs in recvs.items():
        for peer, t in msgs:
            src = posted.pop((peer, rank))
            if src.numel() != t.numel():
                raise TransformError(f"plan mismatch: rank {peer} sends {src.numel()} elements to "
                                     f"rank {rank}, which expects {t.numel()}")
            t.copy_(src)
    if posted:
        (rank, peer), _ = next(iter(posted.items()))
        raise TransformError(f"plan mismatch: rank {rank} sends to rank {peer}, which expects nothing")


def agree(fingerprint: torch.Tensor, participants: Sequence[int],
          group: dist.ProcessGroup | None = None,
          timeout: float | None = None) -> torch.Tensor:
    """All participants' int64 fingerprints, [len(participants), k], on every participant: each
    sends its own to the first participant, which sends the stacked result back to all."""
    rank = dist.get_rank()
    leader = participants[0]
    table = torch.empty(len(participants), fingerprint.numel(), dtype=torch.int64)
    if rank == leader:
        others = [(p, table[i]) for i, p in enumerate(participants) if p != rank]
        table[participants.index(rank)] = fingerprint
        exchange([], others, group, timeout, "validation").wait()
        exchange([(p, table.view(-1)) for p, _ in others], [], group, timeout, "validation").wait()
    else:
        exchange([(leader, fingerprint.contiguous())], [], group, timeout, "validation").wait()
        exchange([], [(leader, table.view(-1))], group, timeout, "validation").wait()
    return table
