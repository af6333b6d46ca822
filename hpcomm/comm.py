"""Transport: moves the per-peer slices of flat send buffers into flat receive buffers.

``exchange`` issues one grouped send/recv (``batch_isend_irecv``: NCCL's grouped P2P on GPU, gloo
on CPU) per call; ``simulate_exchange`` does the same for a whole simulated world in one process.
Both take the buffers and splits that the engine produced from the plan, so the simulated and the
distributed paths differ only here.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist

Splits = Sequence[tuple[int, int, int]]  # (peer, offset, numel)


class Handle:
    """Outstanding transfers of one exchange; ``wait`` blocks until all of them are done."""

    def __init__(self, works: list):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []


def exchange(send_buf: torch.Tensor, sends: Splits, recv_buf: torch.Tensor, recvs: Splits,
             group=None) -> Handle:
    """Post every send and receive of this rank as one group; peers are global ranks."""
    ops = [dist.P2POp(dist.isend, send_buf[off:off + n], peer, group) for peer, off, n in sends]
    ops += [dist.P2POp(dist.irecv, recv_buf[off:off + n], peer, group) for peer, off, n in recvs]
    return Handle(dist.batch_isend_irecv(ops) if ops else [])


def simulate_exchange(sends: Mapping[int, tuple[torch.Tensor, Splits]],
                      recvs: Mapping[int, tuple[torch.Tensor, Splits]]) -> None:
    """In-process transport: every receive slice is filled from its matching send slice."""
    posted = {(rank, peer): (buf, off, n) for rank, (buf, splits) in sends.items()
              for peer, off, n in splits}
    for rank, (buf, splits) in recvs.items():
        for peer, off, n in splits:
            src_buf, src_off, src_n = posted.pop((peer, rank))
            if src_n != n:
                raise RuntimeError(f"plan mismatch: rank {peer} sends {src_n} elements to rank {rank}, "
                                   f"which expects {n}")
            buf[off:off + n].copy_(src_buf[src_off:src_off + n])
    if posted:
        (rank, peer), _ = next(iter(posted.items()))
        raise RuntimeError(f"plan mismatch: rank {rank} sends to rank {peer}, which expects nothing")
