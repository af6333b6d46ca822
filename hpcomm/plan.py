"""Plans: what each rank sends, receives and copies locally to move a tensor between two layouts.

A plan is pure data computed from two layouts alone (no process group, no tensors). Each rank
builds only its own part (``Plan.rank_plan``), from the layouts' runs and holder indices, once per
plan. Caches: ``get_plan`` keeps the last 32 plans (each holds its rank parts and derived arrays);
``_choose`` keeps 16k column-choice results. Nothing cached changes after it is built.

Units: when neither layout splits columns, a "column" is the whole row (``col_mode`` False, every
window is (0, 1)); otherwise columns are elements of the last dim.

Wire format of the message from s to d: the segments d needs from s, ordered by (column window
start, global row), each ``[num_rows, *middle dims, num_cols]`` row-major, back to back. Sender and
receiver derive that order independently from the layouts, so nothing but the payload crosses.

Replica choice: a destination that holds a row in the source copies it locally; otherwise it reads
the row from the holder at position ``dst position % number of holders`` among the row's holders
(in source-rank order), which spreads destinations over replicas deterministically. Partial sources
send from every holder, and the destination adds the contributions in source-rank order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, NamedTuple, Sequence

import numpy as np

from hpcomm.layout import ChunkIndex, HolderIndex, Layout, ragged_arange, split_at, union_runs

_I64 = np.int64
_Arrays4 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Parts = tuple[tuple[int, int, int], ...]  # ((holder or destination position, c0, c1), ...)
Messages = tuple[tuple[int, "Segments"], ...]  # ((peer, Segments in wire order), ...), peers increasing
# (src rows, dst rows, num rows, src col, dst col, num cols, global rows) of local copies
LocalPieces = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class _MissingColumns(ValueError):
    def __init__(self, start: int, stop: int, rank: int) -> None:
        super().__init__(f"columns [{start}, {stop}) of a row of destination rank {rank} are held by "
                         f"no source rank")
        self.start, self.stop, self.rank = start, stop, rank


@dataclass(frozen=True, eq=False)
class Segments:
    """Row runs of one local tensor with a column window each: arrays of equal length (int64).
    ``row``/``num_rows`` index the local tensor's rows; ``col``/``num_cols`` are relative to the
    rank's own column range."""

    row: np.ndarray
    num_rows: np.ndarray
    col: np.ndarray
    num_cols: np.ndarray

    def __len__(self) -> int:
        return len(self.row)

    def units(self) -> int:
        """Rows x columns moved (multiply by the middle dims' size for elements)."""
        return int((self.num_rows * self.num_cols).sum())


_EMPTY = Segments(*(np.zeros(0, _I64),) * 4)


class Choice(NamedTuple):
    """Who supplies a destination's columns of one row (see ``Plan.choose``).

    parts: ((holder position, c0, c1), ...) in the order the contributions are applied.
    adds: some element sums several partial holders' contributions.
    """

    parts: tuple[tuple[int, int, int], ...]
    adds: bool


@dataclass(frozen=True, eq=False)
class RankPlan:
    """One rank's part of a plan.

    sends / recvs: (peer, Segments) in peer order; the Segments of a message are in wire order.
    local: (src Segments, dst Segments) pairs copied without a staging buffer.
    order: with ``accumulate``, the contributions in the order they are added: a peer's rank, or
    this rank for its local copy. zero_fill: the destination starts from zeros.
    """

    rank: int
    in_rows: int
    out_rows: int
    in_cols: int  # width of the local source in column units (1 when not col_mode)
    out_cols: int
    sends: tuple[tuple[int, Segments], ...]
    recvs: tuple[tuple[int, Segments], ...]
    local: tuple[Segments, Segments]
    accumulate: bool
    zero_fill: bool
    order: tuple[int, ...]

    def transpose(self) -> RankPlan:
        """The adjoint: every message reversed; each source element receives the sum of what was
        read from it (contributions in rank order), unread elements get zero."""
        peers = sorted({p for p, _ in self.sends} | ({self.rank} if len(self.local[0]) else set()))
        return RankPlan(self.rank, self.out_rows, self.in_rows, self.out_cols, self.in_cols,
                        sends=self.recvs, recvs=self.sends, local=(self.local[1], self.local[0]),
                        accumulate=True, zero_fill=True, order=tuple(peers))

    def stats(self) -> dict[str, int]:
        """Row x column units sent, received and copied locally (wire traffic only counts sends)."""
        return {"sent": sum(s.units() for _, s in self.sends),
                "received": sum(s.units() for _, s in self.recvs),
                "copied": self.local[0].units(),
                "messages_out": len(self.sends), "messages_in": len(self.recvs)}


class Plan:
    """Moves X from layout ``src`` to layout ``dst``. Pure data; rank parts are built on demand.

    fill_missing: destination rows no source holds become zeros instead of an error (used for
    gradients, where a source row no destination read simply gets no gradient).
    """

    def __init__(self, src: Layout, dst: Layout, fill_missing: bool = False) -> None:
        if not isinstance(src, Layout) or not isinstance(dst, Layout):
            raise TypeError(f"src and dst must be Layouts, got {type(src).__name__} and "
                            f"{type(dst).__name__}")
        if src.num_rows != dst.num_rows:
            raise ValueError(f"src has {src.num_rows} rows but dst has {dst.num_rows}")
        if src.has_cols and dst.has_cols and src.num_cols != dst.num_cols:
            raise ValueError(f"src has num_cols={src.num_cols} but dst has num_cols={dst.num_cols}")
        if dst.partial:
            raise ValueError("a destination layout cannot be partial (a transform delivers full rows)")
        self.src, self.dst, self.fill_missing = src, dst, fill_missing
        self.col_mode = src.has_cols or dst.has_cols
        # in col_mode one of the layouts has cols, and with them num_cols: an int either way
        self.num_cols: int = (src.num_cols if src.has_cols else dst.num_cols) if self.col_mode else 1  # type: ignore[assignment]
        # each rank's part, built on first request: at most one per rank of the transform
        self._rank_plans: dict[int, RankPlan] = {}
        if not fill_missing:
            self._check_coverage()
            if src.has_cols:
                self._check_column_coverage()
        self._frozen = True

    def __setattr__(self, name: str, value: object) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError("Plan is immutable")
        object.__setattr__(self, name, value)

    def _check_coverage(self) -> None:
        cs, cl = self.src.covered_runs()
        ds, dl = self.dst.covered_runs()
        if len(ds) == 0:
            return
        bps = np.unique(np.concatenate([cs, cs + cl, [0, self.src.num_rows]]))
        _, ps, _, bins = split_at(ds, ds + dl, bps)
        inside = np.zeros(len(bps), bool)
        inside[np.searchsorted(bps, cs)] = True
        bad = ~inside[bins]
        if bad.any():
            row = int(ps[bad][0])
            holders = [r for r in self.dst.ranks if row in set(self.dst.rows(r).tolist())]
            raise ValueError(f"destination row {row} (held by rank {holders[0]}) is held by no "
                             f"source rank")

    def _check_column_coverage(self) -> None:
        """Every column a destination wants of a row must be held by some source holder of it."""
        index = self.src.holder_index
        dst_index = self.dst.holder_index
        _, ps, pe, bins = index.split(np.array([0]), np.array([self.src.num_rows]))
        for start, stop, b in zip(ps.tolist(), pe.tolist(), bins.tolist()):
            holders = index.holders_of(b)
            spans = sorted(self.cols_of(self.src, h) for h in holders)
            reach = 0
            for c0, c1 in spans:
                if c0 > reach:
                    break
                reach = max(reach, c1)
            if reach >= self.num_cols or not holders:
                continue  # complete (or no row here: row coverage is checked separately)
            _, rows, _, dbins = dst_index.split(np.array([start]), np.array([stop]))
            for row, db in zip(rows.tolist(), dbins.tolist()):
                for d in dst_index.holders_of(db):
                    try:
                        self.choose(holders, d)
                    except _MissingColumns as e:
                        raise ValueError(f"columns [{e.start}, {e.stop}) of row {row} (held by destination "
                                         f"rank {e.rank}) are held by no source rank") from None

    def cols_of(self, layout: Layout, pos: int) -> tuple[int, int]:
        if not self.col_mode:
            return (0, 1)
        c = layout.cols_at(pos)
        return c if c is not None else (0, self.num_cols)

    def width(self, layout: Layout, rank: int) -> int:
        """Local width in column units of ``rank`` in ``layout``; for a rank outside the layout the
        full width, the logical trailing shape a non-member passes."""
        if not layout.has_rank(rank):
            return self.num_cols if self.col_mode else 1
        c0, c1 = self.cols_of(layout, layout.index(rank))
        return c1 - c0

    def holder_counts(self, rank: int) -> np.ndarray:
        """[local rows, local cols] (cols = 1 without column splits): how many destination ranks hold
        each element of ``rank``'s destination shard."""
        dst = self.dst
        if rank not in dst.ranks:
            return np.zeros((0, self.width(dst, rank)))
        index = dst.holder_index
        starts, lengths = dst.runs(rank)
        c0, c1 = self.cols_of(dst, dst.index(rank))
        local_off = np.cumsum(lengths) - lengths
        ridx, ps, pe, bins = index.split(starts, starts + lengths)
        counts = np.zeros((int(lengths.sum()), c1 - c0))
        col = np.arange(c0, c1)
        for b in np.unique(bins).tolist():
            per_col = np.zeros(c1 - c0)
            for h in index.holders_of(b):
                h0, h1 = self.cols_of(dst, h)
                per_col += (col >= h0) & (col < h1)
            for p in np.flatnonzero(bins == b).tolist():
                first = local_off[ridx[p]] + ps[p] - starts[ridx[p]]
                counts[first:first + pe[p] - ps[p]] = per_col
        return counts

    def crosses_wire(self) -> bool:
        """Whether some rank sends something to another rank (False: every rank at most copies
        locally, so no transport is needed). Pure data: every rank reaches the same answer without
        building the other ranks' plans. Cost: each destination rank's runs checked for containment
        in the same rank's source runs; the holder index is read only for partial sources and for
        fill_missing rows a rank does not hold itself."""
        return self._crosses_wire

    @cached_property
    def _crosses_wire(self) -> bool:
        src, dst = self.src, self.dst
        if not src.partial and src == dst:
            return False  # the identity: every rank copies its own rows (checked in O(1) by hash)
        for dpos, rank in enumerate(dst.ranks):
            want = self.cols_of(dst, dpos)
            if want[0] == want[1]:
                continue
            spos = src.index(rank) if src.has_rank(rank) else -1
            own = self.cols_of(src, spos) if spos >= 0 else (0, 0)
            own_cols = spos >= 0 and own[0] <= want[0] and want[1] <= own[1]
            src_runs = src.runs(rank)
            # a rank's rows are distinct, so as many as num_rows means all of them: whatever it
            # wants is local, and its destination runs need not be read
            if own_cols and not src.partial and int(src_runs[1].sum()) == src.num_rows:
                continue
            starts, lengths = dst.runs(rank)
            if not len(starts):
                continue
            ends = starts + lengths
            held = own_cols and _contained(starts, ends, *src_runs)
            if not src.partial and (held or not self.fill_missing):
                # without fill_missing every element has a source holder: a peer's unless held here
                if not held:
                    return True
                continue
            if self._peer_supplies(starts, ends, spos, want, own):
                return True
        return False

    def _peer_supplies(self, starts: np.ndarray, ends: np.ndarray, spos: int, want: tuple[int, int],
                       own: tuple[int, int]) -> bool:
        """Whether ``choose`` gives a source holder other than ``spos`` (-1: none) some element of
        the rows [starts, ends) x columns ``want`` of one destination rank."""
        index = self.src.holder_index
        _, _, _, bins = index.split(starts, ends)
        if not self.col_mode:
            count = index.counts(bins)
            mine = index.holds(bins, np.full(len(bins), spos, _I64))
            # a partial row sums every holder; a whole row comes from a peer where this rank lacks it
            return bool((count > mine).any() if self.src.partial else ((count > 0) & ~mine).any())
        for b in np.unique(bins).tolist():
            holders = index.holders_of(b)
            # columns a peer would supply: all (partial sums) or those this rank lacks
            if self.src.partial or spos not in holders:
                gaps = [want]
            else:
                gaps = [(want[0], min(want[1], own[0])), (max(want[0], own[1]), want[1])]
            for h in holders:
                h0, h1 = self.cols_of(self.src, h)
                if h != spos and any(max(h0, g0) < min(h1, g1) for g0, g1 in gaps):
                    return True
        return False

    # -- the one rule both sides of every message apply --------------------------------------------

    def choose(self, holders: tuple[int, ...], dst_pos: int) -> Choice:
        """Who supplies which columns of a row whose source holders (positions in src.ranks) are
        ``holders`` to destination position ``dst_pos``. Missing columns raise, or are left out
        with fill_missing. A pure function of the columns involved (cached in ``_choose``)."""
        rank = self.dst.ranks[dst_pos]
        me = self.src.index(rank) if self.src.has_rank(rank) else -1
        return _choose(tuple((h, *self.cols_of(self.src, h)) for h in holders),
                       self.cols_of(self.dst, dst_pos), me, dst_pos, rank, self.src.partial,
                       self.fill_missing)

    # -- per-rank plan ------------------------------------------------------------------------------

    def rank_plan(self, rank: int) -> RankPlan:
        """Rank's part of the plan (built once per plan and rank)."""
        hit = self._rank_plans.get(rank)
        if hit is None:
            hit = self._rank_plans[rank] = self._build(rank)
        return hit

    def _build(self, rank: int) -> RankPlan:
        src, dst = self.src, self.dst
        in_src, in_dst = src.has_rank(rank), dst.has_rank(rank)
        recvs, local_pairs, zero_fill, adds = self._receiver(rank) if in_dst else ((), [], False, False)
        sends = self._sender(rank) if in_src else ()
        in_rows, out_rows = src.local_num_rows(rank), dst.local_num_rows(rank)
        local = _local_segments(local_pairs)
        order: tuple[int, ...] = ()
        if adds:  # contributions are added in source-rank order; otherwise each lands once: a copy
            contributors = {p for p, _ in recvs} | ({rank} if len(local[0]) else set())
            order = tuple(r for r in src.ranks if r in contributors)
        return RankPlan(rank, in_rows, out_rows, self.width(src, rank), self.width(dst, rank),
                        sends=sends, recvs=recvs, local=local, accumulate=adds,
                        zero_fill=zero_fill or adds, order=order)

    @cached_property
    def _whole_rows(self) -> bool:
        """Every element of a row comes from one holder: ``choose`` reduces to a vectorized pick."""
        return not self.col_mode and not self.src.partial

    @cached_property
    def _rank_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(src ranks, dst ranks, source position of each destination position or -1)."""
        src_ranks, dst_ranks = np.asarray(self.src.ranks, _I64), np.asarray(self.dst.ranks, _I64)
        order = np.argsort(src_ranks)
        at = np.minimum(np.searchsorted(src_ranks[order], dst_ranks), len(order) - 1)
        return src_ranks, dst_ranks, np.where(src_ranks[order][at] == dst_ranks, order[at], -1)

    def _receiver(self, rank: int) -> tuple[Messages, list[LocalPieces], bool, bool]:
        """What ``rank`` receives (per peer, wire order) and copies locally, as destination."""
        src, dst = self.src, self.dst
        index = src.holder_index
        src_ranks, _, src_pos = self._rank_arrays
        dpos = dst.index(rank)
        dc0, dc1 = self.cols_of(dst, dpos)
        starts, lengths = dst.runs(rank)
        local_off = np.cumsum(lengths) - lengths
        ridx, ps, pe, bins = index.split(starts, starts + lengths)
        dst_rows = local_off[ridx] + (ps - starts[ridx])
        if self._whole_rows:
            holder = _pick(index, bins, np.full(len(bins), src_pos[dpos]), np.full(len(bins), dpos))
            piece = np.flatnonzero(holder >= 0)
            holder, c0, c1 = holder[piece], np.zeros(len(piece), _I64), np.ones(len(piece), _I64)
            adds = False
        else:
            choices, (piece, holder, c0, c1) = self._expand(
                bins, lambda b: self.choose(index.holders_of(b), dpos))
            adds = any(c.adds for c in choices)
        got = np.bincount(piece, (pe[piece] - ps[piece]) * (c1 - c0), len(ps))
        short = got < (pe - ps) * (dc1 - dc0)
        if short.any() and not self.fill_missing:
            raise ValueError(f"destination row {int(ps[short][0])} of rank {rank} is held by no "
                             f"source rank")
        peers = src_ranks[holder]
        mine = peers == rank
        local_pairs = []
        if mine.any():
            sel, p = np.flatnonzero(mine), piece[mine]
            spos_c0 = self.cols_of(src, src.index(rank))[0]
            local_pairs.append((_local_rows(src.runs(rank), ps[p]), dst_rows[p], pe[p] - ps[p],
                                c0[sel] - spos_c0, c0[sel] - dc0, c1[sel] - c0[sel], ps[p]))
        sel = np.flatnonzero(~mine)
        p = piece[sel]
        recvs = _messages(peers[sel], dst_rows[p], pe[p] - ps[p], c0[sel] - dc0, c1[sel] - c0[sel],
                          ps[p], c0[sel])
        return recvs, local_pairs, bool(short.any()), adds

    def _sender(self, rank: int) -> Messages:
        """What ``rank`` sends to each peer (wire order), as a source holder."""
        src, dst = self.src, self.dst
        src_index, dst_index = src.holder_index, dst.holder_index
        _, dst_ranks, src_pos = self._rank_arrays
        spos = src.index(rank)
        sc0 = self.cols_of(src, spos)[0]
        starts, lengths = src.runs(rank)
        local_off = np.cumsum(lengths) - lengths
        sidx, s_ps, s_pe, s_bins = src_index.split(starts, starts + lengths)
        didx, ps, pe, d_bins = dst_index.split(s_ps, s_pe)
        src_bins = s_bins[didx]
        src_rows = local_off[sidx[didx]] + (ps - starts[sidx[didx]])
        if self._whole_rows:
            # every (piece, destination holder) pair; keep those the rule gives to this rank
            count = dst_index.counts(d_bins)
            pair = np.repeat(np.arange(len(ps), dtype=_I64), count)
            d = dst_index.nth(d_bins[pair], ragged_arange(count))
            remote = np.flatnonzero(dst_ranks[d] != rank)  # a local copy is planned by the receiver
            pair, d = pair[remote], d[remote]
            chosen = np.flatnonzero(_pick(src_index, src_bins[pair], src_pos[d], d) == spos)
            piece, d = pair[chosen], d[chosen]
            c0, c1 = np.zeros(len(piece), _I64), np.ones(len(piece), _I64)
        else:
            def mine(pair: tuple[int, int]) -> Parts:
                sb, db = pair
                holders = src_index.holders_of(sb)
                out: list[tuple[int, int, int]] = []
                for d in dst_index.holders_of(db):
                    if dst.ranks[d] == rank:
                        continue  # a local copy, planned by the receiving side of this rank
                    out.extend((d, a, b) for h, a, b in self.choose(holders, d).parts if h == spos)
                return tuple(out)

            keys = np.stack([src_bins, d_bins], 1) if len(ps) else np.zeros((0, 2), _I64)
            piece, d, c0, c1 = self._expand_pairs(keys, mine)
        return _messages(dst_ranks[d], src_rows[piece], pe[piece] - ps[piece], c0 - sc0, c1 - c0,
                         ps[piece], c0)

    @staticmethod
    def _expand(keys: np.ndarray, fn: Callable[[int], Choice]) -> tuple[list[Choice], _Arrays4]:
        """Evaluate ``fn`` once per distinct key and expand its parts to every piece: returns the
        choices and (piece index, holder, c0, c1) arrays."""
        uniq, inverse = np.unique(keys, return_inverse=True)
        results = [fn(int(k)) for k in uniq]
        return results, _expand_results([c.parts for c in results], inverse)

    @staticmethod
    def _expand_pairs(keys: np.ndarray, fn: Callable[[tuple[int, int]], Parts]) -> _Arrays4:
        if len(keys) == 0:
            return (np.zeros(0, _I64),) * 4
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        results = [fn((int(a), int(b))) for a, b in uniq]
        return _expand_results(results, inverse.reshape(-1))


def _pick(index: HolderIndex | ChunkIndex, bins: np.ndarray, me: np.ndarray, dst_pos: np.ndarray
          ) -> np.ndarray:
    """``choose`` for whole rows, vectorized: the source holder position that destination position
    dst_pos[i] (whose own source position is me[i], -1 for none) reads interval bins[i] from: its
    own if it holds the row, else holder ``dst_pos % count`` in source-rank order; -1: no holder."""
    out = np.full(len(bins), -1, _I64)
    count = index.counts(bins)
    held = np.flatnonzero(count > 0)
    b, m, d = bins[held], me[held], dst_pos[held]
    out[held] = np.where(index.holds(b, m), m, index.nth(b, d % count[held]))
    return out


def _expand_results(results: Sequence[Parts], inverse: np.ndarray) -> _Arrays4:
    counts = np.array([len(r) for r in results], _I64)
    flat = np.array([t for r in results for t in r], _I64).reshape(-1, 3)
    first = np.cumsum(counts) - counts
    per_piece = counts[inverse]
    piece = np.repeat(np.arange(len(inverse), dtype=_I64), per_piece)
    rows = flat[first[inverse][piece] + ragged_arange(per_piece)] if len(piece) else np.zeros((0, 3), _I64)
    return piece, rows[:, 0], rows[:, 1], rows[:, 2]


def _contained(starts: np.ndarray, ends: np.ndarray, cover_starts: np.ndarray,
               cover_lengths: np.ndarray) -> bool:
    """Whether every range [starts, ends) lies inside the union of the cover runs."""
    us, ul = union_runs(cover_starts, cover_lengths)
    j = np.searchsorted(us, starts, "right") - 1
    return bool(((j >= 0) & (ends <= (us + ul)[np.maximum(j, 0)])).all()) if len(us) else False


def _local_rows(runs: tuple[np.ndarray, np.ndarray], global_rows: np.ndarray) -> np.ndarray:
    """Local positions of global rows that lie inside ``runs`` (each query inside one run)."""
    starts, lengths = runs
    local_off = np.cumsum(lengths) - lengths
    order = np.argsort(starts, kind="stable")
    j = order[np.searchsorted(starts[order], global_rows, "right") - 1]
    return local_off[j] + (global_rows - starts[j])


def _messages(peers: np.ndarray, row: np.ndarray, num_rows: np.ndarray, col: np.ndarray,
              num_cols: np.ndarray, global_row: np.ndarray, global_col: np.ndarray) -> Messages:
    """Per-peer Segments (peers increasing) in wire order: by (column window start, global row),
    neighbours that continue each other both locally and globally with the same window fused
    (the wire layout does not change)."""
    o = np.lexsort((global_row, global_col, peers))
    peers, row, num_rows, col, num_cols, global_row = (
        a[o] for a in (peers, row, num_rows, col, num_cols, global_row))
    if len(row) > 1:
        cont = ((peers[1:] == peers[:-1]) & (row[1:] == row[:-1] + num_rows[:-1])
                & (global_row[1:] == global_row[:-1] + num_rows[:-1]) & (col[1:] == col[:-1])
                & (num_cols[1:] == num_cols[:-1]))
        heads = np.flatnonzero(np.concatenate([[True], ~cont]))
        peers, row, col, num_cols = peers[heads], row[heads], col[heads], num_cols[heads]
        num_rows = np.add.reduceat(num_rows, heads)
    bounds = np.flatnonzero(np.concatenate([[True], peers[1:] != peers[:-1], [True]])) if len(
        peers) else np.zeros(1, _I64)
    return tuple((int(peers[a]), Segments(row[a:b], num_rows[a:b], col[a:b], num_cols[a:b]))
                 for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _local_segments(pairs: Sequence[LocalPieces]) -> tuple[Segments, Segments]:
    if not pairs:
        return _EMPTY, _EMPTY
    src_row, dst_row, n, scol, dcol, ncols, grow = (np.concatenate(a) for a in zip(*pairs))
    # fuse on the source side and the destination side at once: both rows must continue
    o = np.lexsort((grow, dcol))
    src_row, dst_row, n, scol, dcol, ncols = (a[o] for a in (src_row, dst_row, n, scol, dcol, ncols))
    if len(n) > 1:
        cont = ((src_row[1:] == src_row[:-1] + n[:-1]) & (dst_row[1:] == dst_row[:-1] + n[:-1])
                & (scol[1:] == scol[:-1]) & (dcol[1:] == dcol[:-1]) & (ncols[1:] == ncols[:-1]))
        heads = np.flatnonzero(np.concatenate([[True], ~cont]))
        src_row, dst_row, scol, dcol, ncols = (a[heads] for a in (src_row, dst_row, scol, dcol, ncols))
        n = np.add.reduceat(n, heads)
    return Segments(src_row, n, scol, ncols), Segments(dst_row, n, dcol, ncols)


@lru_cache(maxsize=1 << 14)
def _choose(holder_cols: tuple[tuple[int, int, int], ...], want: tuple[int, int], me: int,
            dst_pos: int, dst_rank: int, partial: bool, fill_missing: bool) -> Choice:
    """Plan.choose over explicit inputs: holder_cols ((holder, c0, c1), ...) in source-rank order,
    the destination's window ``want``, its own source position ``me`` (-1: none)."""
    want0, want1 = want
    hcols = {h: (c0, c1) for h, c0, c1 in holder_cols}
    cuts = sorted({want0, want1} | {c for h in hcols for c in hcols[h] if want0 < c < want1})
    out: list[tuple[int, int, int]] = []
    adds = False
    for a, b in zip(cuts[:-1], cuts[1:]):
        covering = [h for h in hcols if hcols[h][0] <= a and hcols[h][1] >= b]
        if not covering:
            if fill_missing:
                continue
            raise _MissingColumns(a, b, dst_rank)
        if partial:
            out.extend((h, a, b) for h in covering)
            adds |= len(covering) > 1
        else:
            h = me if me in covering else covering[dst_pos % len(covering)]
            out.append((h, a, b))
    # fuse adjacent windows of one holder, then order contributions by holder (rank order)
    out.sort(key=lambda t: (t[0], t[1]))
    fused: list[tuple[int, int, int]] = []
    for h, a, b in out:
        if fused and fused[-1][0] == h and fused[-1][2] == a:
            fused[-1] = (h, fused[-1][1], b)
        else:
            fused.append((h, a, b))
    return Choice(tuple(fused), adds)


@lru_cache(maxsize=32)
def get_plan(src: Layout, dst: Layout, fill_missing: bool = False) -> Plan:
    """The cached plan for a layout pair (layouts are hashable)."""
    return Plan(src, dst, fill_missing)
