"""Per-rank sequence metadata for attention kernels on a CP or DP destination layout, padded CP
layouts for kernels that need every sequence divisible by 2 * CP, and ``gather_lengths``, which
turns per-rank data loading into the global sample list.

Rows are THD-packed tokens of sequences ``seq_lens`` (sequence s is rows ``offsets[s]`` ..
``offsets[s] + seq_lens[s] - 1``). ``seq_metadata`` describes a rank's local tensor: which
sequences it holds pieces of, where each piece starts (``cu_seqlens``), and each row's position
in its sequence (``position_ids``, for RoPE). With zigzag CP the two chunks of a sequence are
adjacent in local order, so a sequence is one piece of the local tensor.

``padded_cp`` pads each sequence up to a multiple (default 2 * CP for zigzag, CP for contiguous),
cuts the padded sequences, and gives the transform a destination layout over the real rows only:
pad rows are never sent. ``PaddedCP.pad`` writes the transform's output into a zero tensor of the
padded local size; to skip that copy, let the transform write there itself:
``t(x, out=zeros, out_rows=padded.real_positions(rank))``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hpcomm.layout import Layout, _check_lengths, ragged_arange


@dataclass(frozen=True)
class SeqMetadata:
    """One rank's view of its local rows.

    seq_ids: [pieces] sequences the rank holds rows of, in local order.
    cu_seqlens: [pieces + 1] int32 offsets of the pieces in the local tensor (varlen attention).
    position_ids: [local rows] int64 position of each row within its sequence.
    """

    seq_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor


def seq_metadata(layout: Layout, seq_lens: Sequence[int], rank: int) -> SeqMetadata:
    """Metadata of ``rank``'s local rows in ``layout`` over sequences ``seq_lens``. A sequence
    split into pieces that are not adjacent in local order appears once per piece."""
    lens = np.asarray(_check_lengths(seq_lens, "seq_lens"), np.int64)
    if int(lens.sum()) != layout.num_rows:
        raise ValueError(f"seq_lens sum to {int(lens.sum())}, but the layout has {layout.num_rows} rows")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    rows = layout.rows(rank).numpy()
    seq = np.searchsorted(np.cumsum(lens), rows, "right")
    new_piece = np.ones(len(rows), bool)
    new_piece[1:] = seq[1:] != seq[:-1]
    heads = np.flatnonzero(new_piece)
    cu = np.append(heads, len(rows)).astype(np.int32)
    return SeqMetadata(torch.from_numpy(seq[heads].astype(np.int64)), torch.from_numpy(cu),
                       torch.from_numpy(rows - starts[seq]))


@dataclass(frozen=True, eq=False)
class PaddedCP:
    """A CP layout over padded sequences and its real-row destination layout.

    layout: over the real rows (``sum(seq_lens)``); rank r holds the real rows of its padded
      chunks in padded local order. Use it as the transform's destination.
    padded: the CP layout over the padded rows (``sum(padded_lens)``).
    """

    seq_lens: tuple[int, ...]
    padded_lens: tuple[int, ...]
    padded: Layout

    @cached_property
    def _real(self) -> tuple[np.ndarray, np.ndarray]:
        """(is real, real row) for every padded row."""
        lens, plens = np.asarray(self.seq_lens, np.int64), np.asarray(self.padded_lens, np.int64)
        seq = np.repeat(np.arange(len(plens)), plens)
        offset = ragged_arange(plens)
        real_start = np.cumsum(lens) - lens
        return offset < lens[seq], real_start[seq] + offset

    @cached_property
    def layout(self) -> Layout:
        is_real, real_row = self._real
        rows = {}
        for r in self.padded.ranks:
            p = self.padded.rows(r).numpy()
            rows[r] = real_row[p[is_real[p]]]
        return Layout.from_rows(rows, sum(self.seq_lens))

    def real_positions(self, rank: int) -> torch.Tensor:
        """[real local rows] int64: where ``rank``'s real rows sit in its padded local tensor."""
        is_real, _ = self._real
        return torch.from_numpy(np.flatnonzero(is_real[self.padded.rows(rank).numpy()]))

    def pad(self, y: torch.Tensor, rank: int) -> torch.Tensor:
        """y: [real local rows, ...] (the transform's output) -> [padded local rows, ...], pad rows
        zero. Differentiable (the pad rows get no gradient)."""
        n = self.padded.local_num_rows(rank)
        index = self.real_positions(rank).to(y.device)
        if y.shape[0] != len(index):
            raise ValueError(f"rank {rank}: y has {y.shape[0]} rows, the layout gives it {len(index)}")
        return y.new_zeros((n, *y.shape[1:])).index_copy(0, index, y)

    def metadata(self, rank: int) -> SeqMetadata:
        """Metadata of the padded local tensor (pad rows continue their sequence's positions)."""
        return seq_metadata(self.padded, self.padded_lens, rank)


def padded_cp(seq_lens: Sequence[int], ranks: Sequence[int], mode: str = "zigzag",
              multiple: int | None = None) -> PaddedCP:
    """Pad every sequence up to a multiple of ``multiple`` (default 2 * CP for zigzag, CP for
    contiguous) and cut it over ``ranks`` with ``Layout.cp``."""
    lens = _check_lengths(seq_lens, "seq_lens")
    k = len(ranks)
    multiple = (2 * k if mode == "zigzag" else k) if multiple is None else multiple
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    padded_lens = tuple(-(-n // multiple) * multiple for n in lens)
    return PaddedCP(lens, padded_lens, Layout.cp(ranks, padded_lens, mode))


def gather_lengths(local_lens: Sequence[int] | torch.Tensor | np.ndarray, group: Any = None,
                   timeout: float = 60.0) -> dict[int, list[int]]:
    """Every rank's sample lengths, on every rank of ``group`` (default: the world).

    Returns ``{global rank: its local_lens}`` in ascending rank order, so
    ``Layout.dp_by_rank(result)`` is the layout of per-rank loaded samples and
    ``[n for lens in result.values() for n in lens]`` the global sample order. Collective: a tiny
    all_gather of (count, ok) per rank, then one of the lengths padded to the longest list. Bad
    lengths on any rank raise on every rank, naming it; a rank that does not join within
    ``timeout`` seconds turns into a TimeoutError instead of a hang.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gather_lengths needs an initialized torch.distributed process group")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    rank = dist.get_rank()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(
        range(dist.get_world_size()))
    error: Exception | None = None
    try:
        lens = _check_lengths(local_lens, f"local_lens of rank {rank}")
    except (TypeError, ValueError) as e:  # still take part, so the other ranks learn who failed
        error, lens = e, ()
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(group) == "nccl" else torch.device("cpu"))
    heads = _all_gather(torch.tensor([len(lens), error is None], dtype=torch.int64, device=device),
                        group, timeout, rank, "counts")
    if error is not None:
        raise error
    bad = [r for r, ok in zip(ranks, heads[:, 1].tolist()) if not ok]
    if bad:
        raise ValueError(f"gather_lengths: rank(s) {bad} passed invalid local_lens (their own error "
                         f"names the value)")
    counts = heads[:, 0].tolist()
    body = torch.zeros(max(counts), dtype=torch.int64, device=device)
    body[:len(lens)] = torch.tensor(lens, dtype=torch.int64)
    table = _all_gather(body, group, timeout, rank, "lengths").tolist()
    return {r: table[i][:counts[i]] for i, r in sorted(enumerate(ranks), key=lambda p: p[1])}


def _all_gather(t: torch.Tensor, group: Any, timeout: float, rank: int, what: str) -> torch.Tensor:
    """[group size, *t.shape]: t of every rank of the group, waiting at most ``timeout`` seconds."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    start = time.monotonic()
    try:
        dist.all_gather(parts, t, group=group, async_op=True).wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        # gloo says "Operation timed out!"; other backends only tell by the clock
        if "timed out" in str(e).lower() or time.monotonic() - start >= timeout:
            raise TimeoutError(f"gather_lengths on rank {rank}: no answer within {timeout} s while "
                               f"gathering the {what}; a rank of the group did not call it or "
                               f"died") from e
        raise RuntimeError(f"gather_lengths on rank {rank} failed while gathering the {what}: "
                           f"{e}") from e
    return torch.stack(parts)
