"""Layouts: which rows (and which column range) of a logical global tensor each rank holds.

A layout describes a logical tensor X with ``num_rows`` rows (dim 0). Rank r holds
``X[rows(r)][..., c0:c1]`` with ``rows(r)`` in the layout's local order and ``(c0, c1) = cols(r)``
(default: the whole last dim). Rows are stored as runs ``(start, length)`` so structured layouts cost
O(runs), not O(rows). Layouts are pure data: immutable, hashable, and free of torch.distributed.

Chunking follows ``torch.tensor_split``: n items in k parts gives the first ``n % k`` parts one extra.
"""

from __future__ import annotations

import hashlib
import heapq
import numbers
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

_I64 = np.int64

RowsLike = Sequence[int] | np.ndarray | torch.Tensor
# (range index, piece start, piece end, bin or interval) of every piece of a cut
Pieces = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------------
# run arithmetic (shared by builders, select, nesting and the holder index)


def split_points(n: int, k: int) -> np.ndarray:
    """Boundaries [k + 1] of n items tensor_split into k parts."""
    i = np.arange(k + 1, dtype=_I64)
    return i * (n // k) + np.minimum(i, n % k)


def merge_runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop empty runs and fuse runs that continue each other (local order is kept)."""
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    if len(starts) < 2:
        return starts.astype(_I64), lengths.astype(_I64)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] != starts[:-1] + lengths[:-1]
    heads = np.flatnonzero(new)
    ends = np.add.reduceat(lengths, heads)
    return starts[heads].astype(_I64), ends.astype(_I64)


def split_at(starts: np.ndarray, ends: np.ndarray, bps: np.ndarray) -> Pieces:
    """Cut each non-empty range [starts[i], ends[i]) at the sorted breakpoints ``bps``.

    Returns (range index, piece start, piece end, bin) for every piece, in range order, where bin j
    means ``bps[j] <= piece < bps[j + 1]``. Ranges must lie inside [bps[0], bps[-1]].
    """
    first = np.searchsorted(bps, starts, "right") - 1
    last = np.searchsorted(bps, ends, "left")
    counts = np.maximum(last - first, 0)
    idx = np.repeat(np.arange(len(starts), dtype=_I64), counts)
    bins = first[idx] + ragged_arange(counts)
    return idx, np.maximum(starts[idx], bps[bins]), np.minimum(ends[idx], bps[bins + 1]), bins


def compose_runs(inner_starts: np.ndarray, inner_lengths: np.ndarray, outer_starts: np.ndarray,
                 outer_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map runs given in the local index space of a rank (whose runs are ``outer``) to global rows."""
    bounds = np.concatenate([[0], np.cumsum(outer_lengths)]).astype(_I64)
    keep = inner_lengths > 0
    inner_starts, inner_lengths = inner_starts[keep], inner_lengths[keep]
    _, ps, pe, bins = split_at(inner_starts, inner_starts + inner_lengths, bounds)
    return merge_runs(outer_starts[bins] + (ps - bounds[bins]), pe - ps)


def union_runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint runs covering the union of (possibly overlapping) runs; touching runs fuse."""
    keep = lengths > 0
    starts, ends = starts[keep], (starts + lengths)[keep]
    if len(starts) == 0:
        return starts.astype(_I64), ends.astype(_I64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] > reach[:-1]
    heads = np.flatnonzero(new)
    tails = np.append(heads[1:], len(starts)) - 1
    return starts[heads].astype(_I64), (reach[tails] - starts[heads]).astype(_I64)


def runs_from_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compress a row list (local order) into maximal runs of consecutive increasing rows."""
    if len(rows) == 0:
        return np.zeros(0, _I64), np.zeros(0, _I64)
    new = np.ones(len(rows), dtype=bool)
    new[1:] = rows[1:] != rows[:-1] + 1
    heads = np.flatnonzero(new)
    lengths = np.diff(np.append(heads, len(rows)))
    return rows[heads].astype(_I64), lengths.astype(_I64)


def ragged_arange(counts: np.ndarray) -> np.ndarray:
    """0 .. counts[i] - 1 for every i, back to back: each item's position within its group."""
    counts = np.asarray(counts, _I64)
    return np.arange(int(counts.sum()), dtype=_I64) - np.repeat(np.cumsum(counts) - counts, counts)


def expand_runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.repeat(starts, lengths) + ragged_arange(lengths)


# ---------------------------------------------------------------------------------------------------
# validation helpers: every message names the offending rank or value


def _check_int(value: object, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _check_ranks(ranks: Iterable[int], what: str = "ranks") -> tuple[int, ...]:
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable):
        raise TypeError(f"{what} must be a sequence of ints, got {ranks!r}")
    ranks = tuple(_check_int(r, f"rank {r!r} in {what}") for r in ranks)
    if not ranks:
        raise ValueError(f"{what} is empty: a layout needs at least one rank")
    seen = set()
    for r in ranks:
        if r in seen:
            raise ValueError(f"rank {r} appears twice in {what}")
        seen.add(r)
    return ranks


def _check_lengths(lengths: object, what: str) -> tuple[int, ...]:
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    if isinstance(lengths, np.ndarray):
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Iterable):
        raise TypeError(f"{what} must be a sequence of ints, got {lengths!r}")
    return tuple(_check_int(n, f"{what}[{i}]") for i, n in enumerate(lengths))


def _as_row_array(rows: object, rank: int | str, what: str = "rows") -> np.ndarray:
    if isinstance(rows, torch.Tensor):
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise TypeError(f"{what} of rank {rank} must be an integer tensor, got {rows.dtype}")
        return rows.detach().cpu().reshape(-1).numpy().astype(_I64)
    if isinstance(rows, np.ndarray):
        if not np.issubdtype(rows.dtype, np.integer):
            raise TypeError(f"{what} of rank {rank} must be integers, got dtype {rows.dtype}")
        return rows.reshape(-1).astype(_I64)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise TypeError(f"{what} of rank {rank} must be a sequence of ints, got {rows!r}")
    rows = list(rows)
    for v in rows:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{what} of rank {rank} must be ints, got {v!r}")
    return np.asarray(rows, dtype=_I64).reshape(-1)


def _check_rows(rows: np.ndarray, num_rows: int, rank: int | str, what: str = "rows") -> None:
    if len(rows) == 0:
        return
    bad = rows[(rows < 0) | (rows >= num_rows)]
    if len(bad):
        raise ValueError(f"{what} of rank {rank}: row {int(bad[0])} is out of range [0, {num_rows})")
    sorted_rows = np.sort(rows)
    dup = sorted_rows[1:][sorted_rows[1:] == sorted_rows[:-1]]
    if len(dup):
        raise ValueError(f"{what} of rank {rank}: row {int(dup[0])} appears twice")


# ---------------------------------------------------------------------------------------------------


# kinds: how each kind of layout places rows on rank positions


class Kind:
    """How one kind of layout places rows on its rank positions 0..num_positions-1. Subclasses are
    frozen dataclasses whose fields are the kind's parameters, so layouts compare and hash by
    value; derived arrays are cached on the (immutable) instance. Adding a kind is one subclass."""

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    @property
    def num_positions(self) -> int:
        raise NotImplementedError

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of position ``pos``'s rows in local order (may hold empty runs)."""
        raise NotImplementedError

    def all_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position, start, length) of every position's merged runs, positions in order."""
        per = [merge_runs(*self.runs(p)) for p in range(self.num_positions)]
        pos = np.repeat(np.arange(len(per), dtype=_I64), [len(s) for s, _ in per])
        return (pos, np.concatenate([s for s, _ in per] + [np.zeros(0, _I64)]),
                np.concatenate([n for _, n in per] + [np.zeros(0, _I64)]))

    def covers_all(self) -> bool:
        """True when every row has a holder by construction (no need to read the runs)."""
        return False

    def holder_index(self, layout: Layout) -> HolderIndex | ChunkIndex:
        return HolderIndex(layout)


@dataclass(frozen=True)
class Replicated(Kind):
    rows: int
    positions: int

    num_rows = property(lambda self: self.rows)  # type: ignore[assignment]
    num_positions = property(lambda self: self.positions)  # type: ignore[assignment]

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array([0], _I64), np.array([self.rows], _I64)

    def covers_all(self) -> bool:
        return True

    def holder_index(self, layout: Layout) -> ChunkIndex:
        return ChunkIndex(np.array([self.rows], _I64), 1, lambda s, j: np.zeros_like(j),
                          replicas=self.positions)


@dataclass(frozen=True)
class Blocks(Kind):
    """Position i holds the consecutive rows [bounds[i], bounds[i + 1]) (contiguous, dp_by_rank)."""

    sizes: tuple[int, ...]

    num_rows = property(lambda self: int(self.bounds[-1]))  # type: ignore[assignment]
    num_positions = property(lambda self: len(self.sizes))  # type: ignore[assignment]

    @cached_property
    def bounds(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes, dtype=_I64)]).astype(_I64)

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        return self.bounds[pos:pos + 1], np.array([self.sizes[pos]], _I64)

    def all_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sizes = np.asarray(self.sizes, _I64)
        keep = np.flatnonzero(sizes > 0)
        return keep, self.bounds[keep], sizes[keep]

    def covers_all(self) -> bool:
        return True

    def holder_index(self, layout: Layout) -> ChunkIndex:
        return ChunkIndex(np.asarray(self.sizes, _I64), 1, lambda s, j: s)


@dataclass(frozen=True)
class FromRows(Kind):
    """Explicit runs per position: ((starts, lengths), ...)."""

    rows: int
    position_runs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

    num_rows = property(lambda self: self.rows)  # type: ignore[assignment]
    num_positions = property(lambda self: len(self.position_runs))  # type: ignore[assignment]

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        s, n = self.position_runs[pos]
        return np.asarray(s, _I64), np.asarray(n, _I64)


@dataclass(frozen=True)
class _Sequences(Kind):
    """Base of the kinds over packed sequences (samples) ``lens``, sequence s at ``offsets[s]``."""

    lens: tuple[int, ...]
    positions: int

    num_rows = property(lambda self: sum(self.lens))  # type: ignore[assignment]
    num_positions = property(lambda self: self.positions)  # type: ignore[assignment]

    @cached_property
    def lens_array(self) -> np.ndarray:
        return np.asarray(self.lens, _I64)

    @cached_property
    def offsets(self) -> np.ndarray:
        return (np.cumsum(self.lens_array) - self.lens_array).astype(_I64)

    def covers_all(self) -> bool:
        return True


@dataclass(frozen=True)
class DP(_Sequences):
    """Whole samples per position; ``assign`` is contiguous, round_robin or balanced."""

    assign: str

    @cached_property
    def owner(self) -> np.ndarray:
        """[samples] position holding each sample."""
        lens, k, s = self.lens_array, self.positions, len(self.lens)
        if self.assign == "contiguous":
            return np.repeat(np.arange(k, dtype=_I64), np.diff(split_points(s, k)))
        if self.assign == "round_robin":
            return np.arange(s, dtype=_I64) % k
        owner = np.empty(s, _I64)
        heap = [(0, r) for r in range(k)]  # (rows so far, position): ties go to the earlier rank
        for sample in np.lexsort((np.arange(s), -lens)).tolist():
            load, r = heapq.heappop(heap)
            owner[sample] = r
            heapq.heappush(heap, (load + int(lens[sample]), r))
        return owner

    @cached_property
    def _by_owner(self) -> tuple[np.ndarray, np.ndarray]:
        """(samples sorted by (owner, index), first entry of each position) for O(1) lookup."""
        order = np.argsort(self.owner, kind="stable")
        return order, np.searchsorted(self.owner[order], np.arange(self.positions + 1))

    def samples(self, pos: int) -> np.ndarray:
        """Sample indices held by position ``pos``, increasing (the local order)."""
        order, first = self._by_owner
        return order[first[pos]:first[pos + 1]]

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        samples = self.samples(pos)
        return self.offsets[samples], self.lens_array[samples]

    def holder_index(self, layout: Layout) -> ChunkIndex:
        owner = self.owner
        return ChunkIndex(self.lens_array, 1, lambda s, j: owner[s])


@dataclass(frozen=True)
class CP(_Sequences):
    """Each sequence tensor_split into 2k (zigzag: position i holds chunks i and 2k-1-i) or k
    (contiguous) chunks."""

    mode: str

    @property
    def parts(self) -> int:
        return 2 * self.positions if self.mode == "zigzag" else self.positions

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        parts, lens = self.parts, self.lens_array
        chunks = [pos, parts - 1 - pos] if self.mode == "zigzag" else [pos]
        base, extra = lens // parts, lens % parts
        starts = [self.offsets + j * base + np.minimum(j, extra) for j in chunks]
        lengths = [base + (j < extra) for j in chunks]
        # local order: for each sequence, chunk i then chunk parts-1-i
        return np.stack(starts, 1).reshape(-1), np.stack(lengths, 1).reshape(-1)

    def holder_index(self, layout: Layout) -> ChunkIndex:
        parts = self.parts
        if self.mode == "zigzag":
            return ChunkIndex(self.lens_array, parts, lambda s, j: np.minimum(j, parts - 1 - j))
        return ChunkIndex(self.lens_array, parts, lambda s, j: j)


@dataclass(frozen=True)
class Select(Kind):
    """Global row j is ``parent``'s row rows[j]; positions are the parent's."""

    parent: Layout
    rows: tuple[int, ...]

    num_rows = property(lambda self: len(self.rows))  # type: ignore[assignment]
    num_positions = property(lambda self: len(self.parent.ranks))  # type: ignore[assignment]

    @cached_property
    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(self.rows, _I64)
        order = np.argsort(rows, kind="stable")
        return rows[order], order

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        sorted_rows, order = self._sorted
        ps, pl = self.parent.runs(self.parent.ranks[pos])
        lo = np.searchsorted(sorted_rows, ps, "left")
        hi = np.searchsorted(sorted_rows, ps + pl, "left")
        # within a parent run the local order is increasing parent row, so take matches in order
        return runs_from_rows(order[expand_runs(lo, hi - lo)])


@dataclass(frozen=True)
class Nest(Kind):
    """``outer``'s positions are groups; ``inner[g]`` lays out group g's rows (in its local order)
    over real ranks; positions follow ``ranks``."""

    outer: Layout
    inner: tuple[Layout, ...]
    ranks: tuple[int, ...]

    num_rows = property(lambda self: self.outer.num_rows)  # type: ignore[assignment]
    num_positions = property(lambda self: len(self.ranks))  # type: ignore[assignment]

    @cached_property
    def _group_of(self) -> dict[int, int]:
        return {r: g for g, lay in enumerate(self.inner) for r in lay.ranks}

    def runs(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        rank = self.ranks[pos]
        g = self._group_of[rank]
        return compose_runs(*self.inner[g].runs(rank), *self.outer.runs(self.outer.ranks[g]))


# ---------------------------------------------------------------------------------------------------


class Layout:
    """Rows and column range of a logical [num_rows, ..., num_cols] tensor held by each rank.

    Build with the classmethods (``from_rows``, ``replicated``, ``contiguous``, ``dp``,
    ``dp_by_rank``, ``cp``, ``grid``) and ``select``/``nest``; modify with ``with_cols`` and
    ``as_partial``. ``kind`` places the rows on rank positions (``ranks[pos]``).
    """

    def __init__(self, kind: Kind, ranks: tuple[int, ...],
                 cols: tuple[tuple[int, int], ...] | None = None, num_cols: int | None = None,
                 partial: bool = False) -> None:
        if kind.num_positions != len(ranks):
            raise ValueError(f"{type(kind).__name__} places rows on {kind.num_positions} positions, "
                             f"but {len(ranks)} ranks were given")
        self.kind, self.num_rows, self.ranks = kind, kind.num_rows, ranks
        self._cols, self.num_cols, self.partial = cols, num_cols, bool(partial)
        self._key = (kind, ranks, cols, num_cols, self.partial)
        self._hash = hash(self._key)
        self._rank_pos = {r: i for i, r in enumerate(ranks)}
        # per-rank merged runs, filled on demand: at most one entry per rank of this layout
        self._runs_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- identity ---------------------------------------------------------------------------------

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self._hash == other._hash and self._key == other._key

    def fingerprint(self) -> int:
        """A digest of the layout that is equal across processes (``hash`` of strings is salted per
        process), used to check that ranks run the same transform."""
        def stable(v: object) -> object:
            if isinstance(v, Layout):
                return ("Layout", stable(v._key))
            if isinstance(v, Kind):
                return (type(v).__name__, *(stable(getattr(v, f.name)) for f in fields(v)))  # type: ignore[arg-type]
            if isinstance(v, tuple):
                return tuple(stable(e) for e in v)
            return v
        digest = hashlib.blake2b(repr(stable(self._key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, "_runs_cache"):
            raise AttributeError("Layout is immutable")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        extra = (f", cols={dict(zip(self.ranks, self._cols))}" if self._cols else "") + (
            ", partial" if self.partial else "")
        return f"Layout.{type(self.kind).__name__}(ranks={list(self.ranks)}, num_rows={self.num_rows}{extra})"

    # -- builders ---------------------------------------------------------------------------------

    @classmethod
    def from_rows(cls, rows: Mapping[int, RowsLike], num_rows: int,
                  cols: Mapping[int, tuple[int, int]] | None = None, num_cols: int | None = None,
                  partial: bool = False) -> Layout:
        """rows: rank -> global row indices in local order; cols: rank -> (start, stop) on the last dim."""
        if not isinstance(rows, Mapping):
            raise TypeError(f"rows must map rank -> row indices, got {type(rows).__name__}")
        num_rows = _check_int(num_rows, "num_rows")
        ranks = _check_ranks(rows.keys(), "ranks of rows")
        spec = []
        for r in ranks:
            arr = _as_row_array(rows[r], r)
            _check_rows(arr, num_rows, r)
            s, n = runs_from_rows(arr)
            spec.append((tuple(s.tolist()), tuple(n.tolist())))
        layout = cls(FromRows(num_rows, tuple(spec)), ranks, partial=partial)
        return layout.with_cols(cols, num_cols) if cols is not None or num_cols is not None else layout

    @classmethod
    def replicated(cls, ranks: Sequence[int], num_rows: int) -> Layout:
        """Every rank holds rows 0..num_rows-1."""
        ranks = _check_ranks(ranks)
        return cls(Replicated(_check_int(num_rows, "num_rows"), len(ranks)), ranks)

    @classmethod
    def contiguous(cls, ranks: Sequence[int], num_rows: int) -> Layout:
        """Rows tensor_split into len(ranks) parts, part i to ranks[i]."""
        ranks = _check_ranks(ranks)
        num_rows = _check_int(num_rows, "num_rows")
        return cls(Blocks(tuple(np.diff(split_points(num_rows, len(ranks))).tolist())), ranks)

    @classmethod
    def dp(cls, ranks: Sequence[int], sample_lens: Sequence[int], assign: str = "contiguous") -> Layout:
        """Whole samples per rank. assign: "contiguous" | "round_robin" | "balanced"."""
        ranks = _check_ranks(ranks)
        lens = _check_lengths(sample_lens, "sample_lens")
        if assign not in ("contiguous", "round_robin", "balanced"):
            raise ValueError(f"unknown dp assign {assign!r}; expected contiguous, round_robin or balanced")
        return cls(DP(lens, len(ranks), assign), ranks)

    @classmethod
    def dp_by_rank(cls, lens_by_rank: Mapping[int, Sequence[int]]) -> Layout:
        """Each rank holds its own samples: ``lens_by_rank`` maps rank -> its sample lengths (what
        ``hpcomm.gather_lengths`` returns). Samples are ordered by ascending rank, each rank's in
        its own order, so rank r holds one block of consecutive rows; ranks ascend."""
        if not isinstance(lens_by_rank, Mapping):
            raise TypeError(f"lens_by_rank must map rank -> sample lengths, got "
                            f"{type(lens_by_rank).__name__}")
        ranks = _check_ranks(sorted(_check_int(r, f"rank {r!r} of lens_by_rank")
                                    for r in lens_by_rank), "ranks of lens_by_rank")
        sizes = tuple(sum(_check_lengths(lens_by_rank[r], f"sample lengths of rank {r}"))
                      for r in ranks)
        return cls(Blocks(sizes), ranks)

    @classmethod
    def cp(cls, ranks: Sequence[int], seq_lens: Sequence[int], mode: str = "zigzag") -> Layout:
        """THD-packed sequences, each cut separately. mode: "zigzag" | "contiguous"."""
        ranks = _check_ranks(ranks)
        lens = _check_lengths(seq_lens, "seq_lens")
        if mode not in ("zigzag", "contiguous"):
            raise ValueError(f"unknown cp mode {mode!r}; expected zigzag or contiguous")
        return cls(CP(lens, len(ranks), mode), ranks)

    def select(self, rows: RowsLike) -> Layout:
        """A layout whose global row j is this layout's row rows[j]; each rank keeps the selected rows
        it holds, in its local order (used for the image-token positions of an LLM layout)."""
        arr = _as_row_array(rows, "select", what="select rows")
        try:
            _check_rows(arr, self.num_rows, "-", what="select rows")
        except ValueError as e:
            raise ValueError(str(e).replace(" of rank -", "")) from None
        return Layout(Select(self, tuple(arr.tolist())), self.ranks, self._cols, self.num_cols,
                      self.partial)

    @classmethod
    def nest(cls, outer: Layout, inner: Sequence[Layout], ranks: Sequence[int] | None = None) -> Layout:
        """Compose: outer.ranks are virtual groups; inner[i] lays out the rows group i holds (in its
        local order) over real ranks. ``ranks`` optionally fixes the order of the result's ranks."""
        inner = tuple(inner)
        if len(inner) != len(outer.ranks):
            raise ValueError(f"nest needs one inner layout per outer rank ({len(outer.ranks)}), "
                             f"got {len(inner)}")
        all_ranks: list[int] = []
        for g, lay in zip(outer.ranks, inner):
            held = outer.local_num_rows(g)
            if lay.num_rows != held:
                raise ValueError(f"inner layout for group {g} has {lay.num_rows} rows, but the group "
                                 f"holds {held}")
            all_ranks.extend(lay.ranks)
        all_ranks_t = _check_ranks(all_ranks, "ranks of the inner layouts")
        if ranks is not None:
            order = _check_ranks(ranks)
            if sorted(order) != sorted(all_ranks_t):
                raise ValueError(f"ranks {list(order)} must be a permutation of the inner layouts' "
                                 f"ranks {list(all_ranks_t)}")
            all_ranks_t = order
        cols = num_cols = None
        if any(lay.has_cols for lay in inner):
            widths = {lay.num_cols for lay in inner if lay.has_cols}
            if len(widths) != 1:
                raise ValueError(f"inner layouts disagree on num_cols: {sorted(widths)}")  # type: ignore[type-var]
            num_cols = widths.pop()
            by_rank = {r: lay.cols(r) or (0, num_cols) for lay in inner for r in lay.ranks}
            cols = tuple(by_rank[r] for r in all_ranks_t)
        # a layout with cols has num_cols, so by_rank holds (int, int) pairs
        return cls(Nest(outer, inner, all_ranks_t), all_ranks_t, cols, num_cols)  # type: ignore[arg-type]

    @classmethod
    def grid(cls, seq_lens: Sequence[int], dp: int = 1, cp: int = 1, tp: int = 1,
             cp_mode: str = "zigzag", tp_mode: str = "sp", dp_assign: str = "contiguous",
             ranks: Sequence[int] | None = None, order: str = "tp-cp-dp",
             num_cols: int | None = None) -> Layout:
        """A DP x CP x TP mesh over THD-packed sequences (samples).

        DP hands whole samples to DP groups (``dp_assign``); CP cuts each sequence of a DP group over
        its CP ranks (``cp_mode``); TP then either splits each CP rank's rows contiguously
        (``tp_mode="sp"``, Megatron sequence parallelism), replicates them (``"replicate"``), or
        splits the last dim (``"hidden"``, needs ``num_cols``). ``order`` lists the dims fastest
        first (Megatron's default is "tp-cp-dp": TP neighbours are adjacent ranks); rank
        (d, c, t) is ``ranks[flat index]``, ``ranks`` defaulting to range(dp * cp * tp).

        Example: an encoder ``Layout.dp(range(4), lens)`` and an LLM
        ``Layout.grid(lens, cp=2, tp=2)`` on the same 4 ranks: ranks 0, 1 are CP rank 0 (TP 0, 1).
        """
        dp = _check_int(dp, "dp", 1)
        cp = _check_int(cp, "cp", 1)
        tp = _check_int(tp, "tp", 1)
        if tp_mode not in ("sp", "replicate", "hidden"):
            raise ValueError(f"unknown tp_mode {tp_mode!r}; expected sp, replicate or hidden")
        if tp_mode == "hidden" and num_cols is None:
            raise ValueError("tp_mode='hidden' needs num_cols (the size of the last dim)")
        dims = order.split("-")
        if sorted(dims) != ["cp", "dp", "tp"]:
            raise ValueError(f"order {order!r} must be a permutation of tp, cp, dp joined by '-'")
        size = dp * cp * tp
        ranks = _check_ranks(range(size) if ranks is None else ranks)
        if len(ranks) != size:
            raise ValueError(f"grid dp={dp} x cp={cp} x tp={tp} needs {size} ranks, got {len(ranks)}")
        degree = {"dp": dp, "cp": cp, "tp": tp}
        stride, acc = {}, 1
        for d in dims:
            stride[d] = acc
            acc *= degree[d]

        def rank_at(d: int, c: int, t: int) -> int:
            return ranks[d * stride["dp"] + c * stride["cp"] + t * stride["tp"]]

        lens = _check_lengths(seq_lens, "seq_lens")
        outer = cls.dp(range(dp), lens, dp_assign)
        dp_groups = []
        for d in range(dp):  # type: ignore[assignment]  # d was a dim name (str) above
            group_lens = [lens[s] for s in outer.kind.samples(d)]  # type: ignore[attr-defined]
            cp_layout = cls.cp(range(cp), group_lens, cp_mode)
            tp_layouts = []
            for c in range(cp):
                tp_ranks = [rank_at(d, c, t) for t in range(tp)]  # type: ignore[arg-type]
                n = cp_layout.local_num_rows(c)
                if tp_mode == "sp":
                    tp_layouts.append(cls.contiguous(tp_ranks, n))
                else:
                    lay = cls.replicated(tp_ranks, n)
                    if tp_mode == "hidden":
                        bounds = split_points(num_cols, tp)  # type: ignore[arg-type]  # hidden: not None
                        lay = lay.with_cols({r: (int(bounds[t]), int(bounds[t + 1]))
                                             for t, r in enumerate(tp_ranks)}, num_cols)
                    tp_layouts.append(lay)
            dp_groups.append(cls.nest(cp_layout, tp_layouts))
        layout = cls.nest(outer, dp_groups, ranks)
        if num_cols is not None and not layout.has_cols:
            layout = layout.with_cols(None, num_cols)
        return layout

    # -- modifiers --------------------------------------------------------------------------------

    def with_cols(self, cols: Mapping[int, tuple[int, int]] | None, num_cols: int | None) -> Layout:
        """Give ranks column ranges (start, stop) on the last dim of size num_cols (missing ranks,
        or cols=None: the whole dim)."""
        num_cols = _check_int(num_cols, "num_cols")
        cols = dict(cols or {})
        for r in cols:
            if r not in self._rank_pos:
                raise ValueError(f"cols names rank {r}, which is not in the layout's ranks "
                                 f"{list(self.ranks)}")
        out = []
        for r in self.ranks:
            c = cols.get(r, (0, num_cols))
            if not isinstance(c, (tuple, list)) or len(c) != 2:
                raise TypeError(f"cols of rank {r} must be a (start, stop) pair, got {c!r}")
            c0 = _check_int(c[0], f"column start of rank {r}")
            c1 = _check_int(c[1], f"column stop of rank {r}")
            if c1 < c0:
                raise ValueError(f"column range of rank {r} is reversed: ({c0}, {c1})")
            if c1 > num_cols:
                raise ValueError(f"column range of rank {r} ({c0}, {c1}) goes beyond num_cols={num_cols}")
            out.append((c0, c1))
        return Layout(self.kind, self.ranks, tuple(out), num_cols, self.partial)

    def as_partial(self, partial: bool = True) -> Layout:
        """Holders of a row hold partial sums of it; a transform from here delivers the sum."""
        return Layout(self.kind, self.ranks, self._cols, self.num_cols, partial)

    # -- queries ----------------------------------------------------------------------------------

    @property
    def has_cols(self) -> bool:
        return self._cols is not None

    def cols(self, rank: int) -> tuple[int, int] | None:
        """(start, stop) of rank's columns on the last dim, or None for the whole dim."""
        return self.cols_at(self.index(rank))

    def cols_at(self, pos: int) -> tuple[int, int] | None:
        """``cols`` of the rank at position ``pos`` of ``ranks``."""
        return None if self._cols is None else self._cols[pos]

    def has_rank(self, rank: int) -> bool:
        """Whether ``rank`` is one of the layout's ranks (it may hold zero rows)."""
        return rank in self._rank_pos

    def index(self, rank: int) -> int:
        """Position of ``rank`` in ``ranks``."""
        try:
            return self._rank_pos[rank]
        except (KeyError, TypeError):
            raise ValueError(f"rank {rank!r} is not in this layout's ranks {list(self.ranks)}") from None

    def runs(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of rank's rows in local order, merged; empty if rank holds nothing."""
        hit = self._runs_cache.get(rank)
        if hit is not None:
            return hit
        if rank not in self._rank_pos:
            return np.zeros(0, _I64), np.zeros(0, _I64)
        s, n = merge_runs(*self.kind.runs(self._rank_pos[rank]))
        s.flags.writeable = n.flags.writeable = False
        self._runs_cache[rank] = (s, n)
        return s, n

    def all_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position, start, length) of every rank's merged runs, by position then local order."""
        return self._all_runs

    @cached_property
    def _all_runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.kind.all_runs()
        for a in out:
            a.flags.writeable = False
        return out

    def rows(self, rank: int) -> torch.Tensor:
        """Global row indices held by ``rank``, in local order (int64)."""
        return torch.from_numpy(expand_runs(*self.runs(rank)))

    def local_num_rows(self, rank: int) -> int:
        return int(self.runs(rank)[1].sum())

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank's local tensor of the global ``x``: ``x[rows(rank)][..., c0:c1]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"shard expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] != self.num_rows:
            raise ValueError(f"shard expects a tensor with {self.num_rows} rows, got shape "
                             f"{tuple(x.shape)}")
        local = x[self.rows(rank).to(x.device)]
        c = self.cols(rank) if rank in self._rank_pos else None
        if c is not None:
            if x.shape[-1] != self.num_cols:
                raise ValueError(f"last dim {x.shape[-1]} != num_cols {self.num_cols}")
            local = local[..., c[0]:c[1]]
        return local

    # -- coverage and the holder index (used by the planner) ---------------------------------------

    def covered_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted, disjoint runs of rows held by at least one rank."""
        if self.kind.covers_all():
            full = (np.array([0], _I64), np.array([self.num_rows], _I64))
            return full if self.num_rows else (np.zeros(0, _I64), np.zeros(0, _I64))
        _, starts, lengths = self.all_runs()
        return union_runs(starts, lengths)

    @cached_property
    def holder_index(self) -> HolderIndex | ChunkIndex:
        """Who holds which rows: closed form for the chunked kinds (cost proportional to what is
        asked, never to the world), a materialized index over every rank's runs otherwise."""
        return self.kind.holder_index(self)


class ChunkIndex:
    """Holders of a layout made of sequences each tensor_split into ``parts`` chunks, chunk j of
    sequence s held by the rank at position ``owner(s, j)`` (or by all ``replicas`` positions).
    Intervals are (sequence, chunk) pairs, numbered ``s * parts + j``."""

    def __init__(self, lens: np.ndarray, parts: int, owner: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 replicas: int = 0) -> None:
        self.lens, self.parts, self.owner, self.replicas = lens, parts, owner, replicas
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(_I64)

    def split(self, starts: np.ndarray, ends: np.ndarray) -> Pieces:
        """Cut ranges at chunk bounds: (range index, piece start, piece end, interval)."""
        ridx, ps, pe, seq = split_at(starts, ends, self.offsets)
        length, off = self.lens[seq], self.offsets[seq]
        q, r = length // self.parts, length % self.parts
        j0 = _chunk_of(ps - off, q, r)
        j1 = _chunk_of(pe - 1 - off, q, r) + 1
        counts = j1 - j0
        piece = np.repeat(np.arange(len(ps), dtype=_I64), counts)
        j = j0[piece] + ragged_arange(counts)
        qq, rr, oo = q[piece], r[piece], off[piece]
        c0 = oo + j * qq + np.minimum(j, rr)
        c1 = c0 + qq + (j < rr)
        return (ridx[piece], np.maximum(ps[piece], c0), np.minimum(pe[piece], c1),
                seq[piece] * self.parts + j)

    def holders_of(self, interval: int) -> tuple[int, ...]:
        if self.replicas:
            return tuple(range(self.replicas))
        s, j = divmod(interval, self.parts)
        return (int(self.owner(np.array([s]), np.array([j]))[0]),)


def _chunk_of(pos: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Chunk holding position ``pos`` of a sequence tensor_split into chunks of q+1 (the first r)
    and q rows."""
    big = r * (q + 1)
    return np.where(pos < big, pos // (q + 1), r + (pos - big) // np.maximum(q, 1))


class HolderIndex:
    """For every elementary row interval of a layout, the positions (in ``layout.ranks``) of the
    ranks that hold it: ``bps`` are the interval bounds, ``holders[ptr[b]:ptr[b + 1]]`` the holders
    of interval b in increasing position."""

    def __init__(self, layout: Layout) -> None:
        owner, starts, lengths = layout.all_runs()
        ends = starts + lengths
        self.bps = np.unique(np.concatenate([starts, ends, [0, layout.num_rows]])).astype(_I64)
        idx, _, _, bins = split_at(starts, ends, self.bps)
        order = np.lexsort((owner[idx], bins))
        self.holders = owner[idx][order]
        self.ptr = np.searchsorted(bins[order], np.arange(len(self.bps)), "left").astype(_I64)

    def split(self, starts: np.ndarray, ends: np.ndarray) -> Pieces:
        """Cut ranges at interval bounds: (range index, piece start, piece end, interval)."""
        return split_at(starts, ends, self.bps)

    def holders_of(self, interval: int) -> tuple[int, ...]:
        return tuple(self.holders[self.ptr[interval]:self.ptr[interval + 1]].tolist())
