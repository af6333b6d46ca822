"""hpcomm-bench: time a Transform between any two layouts beside the baselines a user would write.

    hpcomm-bench --src "cp=4,cp_mode=zigzag" --dst "cp=4,cp_mode=contiguous"   # 4 local gloo ranks
    hpcomm-bench --src "dp=4,dp_assign=balanced" --dst "cp=2,tp=2" --sweep --backward --plot bw.png
    hpcomm-bench --src "dp=2" --dst "cp=2" --placement noncolocated --json out.json
    hpcomm-bench --json | jq .                        # the rows as one JSON document on stdout
    hpcomm-bench --wide                               # every column: each method's time and ratio
    hpcomm-bench --preset targets                     # hpcomm's CPU performance targets, PASS/MISS
    hpcomm-bench --preset megatron                    # Megatron-style cases: which transport wins
    torchrun --nproc-per-node 8 -m hpcomm.tools.bench --src "dp=8" --dst "cp=4,tp=2"  # NCCL on GPUs

A layout spec is comma-separated key=value pairs: ``dp``, ``cp``, ``tp`` degrees (a Layout.grid in
Megatron order, TP fastest) with ``cp_mode`` (zigzag | contiguous), ``tp_mode`` (sp | replicate |
hidden) and ``dp_assign`` (contiguous | round_robin | balanced); or ``rows=K``, a flat split of the
rows over K ranks (Layout.contiguous). The global tensor is [rows, hidden]; rows are THD-packed
sequences (``--seq-lens``, or ``--num-seqs`` ragged lengths summing to ``--rows``, drawn from a
seeded log-normal so every run and every rank gets the same lengths). ``--placement colocated``
puts both layouts on ranks from 0, ``noncolocated`` the destination on the ranks after the
source's; a local run spawns exactly the ranks a case needs (under torchrun the world must be that
size), so a preset may run some cases on 4 ranks and others on 6.

Methods, each verified once against hpcomm's output (and hpcomm against slicing the global tensor)
before anything is timed:
- hpcomm: ``Transform(src, dst)(x)`` (into a preallocated output when the engine accepts ``out=``);
- a2a: per-destination index lists, ``index_select`` into a send buffer, ``all_to_all_single`` with
  split sizes, ``index_copy_`` into the output (every source row served by the same replica hpcomm
  picks, so both move the same bytes);
- allgather: ``all_gather`` of every rank's shard padded to the largest, then index the local rows;
- dtensor: ``DTensor.redistribute`` when both layouts are placements on one 1-D mesh over the
  world (Shard(0) with torch.chunk sizes, Shard(1) of the hidden dim, Replicate), n/a otherwise;
- copy: when the plan sends nothing off-rank (``Plan.crosses_wire()`` False), ``copy_`` (one
  contiguous run) or ``index_select`` of the rows this rank keeps into a preallocated output:
  the floor of a transform that only copies; n/a when something crosses the wire.
References (not transforms, not verified):
- wire: one ``all_to_all_single`` of exactly the elements hpcomm's plan sends to each peer,
  preallocated, no pack or unpack: what the collective transport alone costs, so hp/wire shows
  what hpcomm spends beyond moving its bytes;
- wire_p2p: the same per-peer messages as one ``batch_isend_irecv`` (receives and sends posted
  together, then every one waited): what the point-to-point transport hpcomm uses alone costs;
  p2p/wire compares the two transports on the plan's exact bytes;
- unchecked: hpcomm's own engine with its per-call headers replaced by nothing (every payload sent
  at once, nothing checked; not a mode hpcomm offers): hp/unc is what the safety protocol costs.
Baselines keep every buffer preallocated across iterations (the best a careful user does); index
lists are built once, untimed, as hpcomm's plan is.

Timing: ``--warmup`` rounds, then ``--iters`` rounds; in each round every method runs once (or
``--burst`` times back to back, timed together) after a barrier (interleaved, so drift hits all
alike), and an iteration's time is the max over ranks; the table shows the median. On a shared
machine the spread is wide: compare ratios from one run, not times across runs. nccl-tests units:
size is the bytes of the logical global tensor, algbw = size / time, busbw = algbw * f with f =
(most bytes any rank sends or receives off-rank, from the plan) / size, stated per row. ``hp/X`` =
hpcomm time / X time (< 1: hpcomm faster). The table shows hpcomm's time and its ratio to each
requested method, within 120 columns; ``--wide`` adds each method's own time, the element count,
the rows, f and p2p/wire.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TextIO

import numpy as np
import torch
import torch.distributed as dist

from hpcomm import protocol
from hpcomm.tools.launch import World
from hpcomm.layout import Layout
from hpcomm.transform import Transform

if TYPE_CHECKING:
    from torch.distributed.tensor import Placement

METHODS = ("hpcomm", "a2a", "allgather", "dtensor", "copy", "wire", "wire_p2p", "unchecked")
BASELINES = ("a2a", "allgather", "dtensor", "copy")  # compute the transform; verified against hpcomm
REFERENCES = ("wire", "wire_p2p", "unchecked")  # timed, never verified
WIRE = REFERENCES[:2]  # the transports alone
COMPARED = METHODS[1:]  # every method shown beside hpcomm
LABEL = {"a2a": "a2a", "allgather": "ag", "dtensor": "dt", "copy": "copy", "wire": "wire",
         "wire_p2p": "p2p", "unchecked": "unc"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
GRID_KEYS = {"dp", "cp", "tp", "cp_mode", "tp_mode", "dp_assign"}
INT_KEYS = {"dp", "cp", "tp", "rows"}
MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    """One case of a preset: the layouts, the methods timed beside hpcomm, the sizes."""

    name: str
    src: str
    dst: str
    methods: tuple[str, ...]
    placement: str = "colocated"
    sweep: bool = False  # sizes from SWEEP_MIN_ROWS doubling to --rows
    equal_lens: bool = False  # one equal-length sequence per source rank instead of ragged ones


@dataclass(frozen=True)
class Target:
    """hpcomm time / ``baseline`` time <= ``ratio`` at every forward size >= ``min_size`` bytes of
    ``case`` (``largest_only``: at the largest size of the run only)."""

    name: str
    case: str
    baseline: str
    ratio: float
    min_size: int = 0
    largest_only: bool = False


CP = ("cp=4,cp_mode=zigzag", "cp=4,cp_mode=contiguous")
TARGETS = (  # (name, src, dst, baseline, target ratio hpcomm / baseline) at --rows; hpcomm.selfcheck
    # runs these cases over NCCL
    ("CP zigzag -> CP contiguous", *CP, "a2a", 1.1),
    ("DP balanced -> CP zigzag", "dp=4,dp_assign=balanced", "cp=4,cp_mode=zigzag", "allgather", 0.5),
    ("rows split -> hidden split", "rows=4", "tp=4,tp_mode=hidden", "dtensor", 1.0),
)
NO_WIRE_CASE = "DP=4 -> DP=2 x TP=2 SP, equal lengths (nothing off-rank)"
SWEEP_MIN_ROWS = 64  # 64 KiB at the presets' 1 KiB rows
PRESETS = {
    "targets": tuple(Case(name, src, dst, (base, *REFERENCES) if name == TARGETS[0][0] else (base, *WIRE),
                          sweep=name == TARGETS[0][0])
                     for name, src, dst, base, _ in TARGETS) + (
        Case(NO_WIRE_CASE, "dp=4", "dp=2,tp=2", ("copy",), equal_lens=True),
    ),
    "megatron": (
        Case("encoder DP=4 -> LLM DP=2 x TP=2 replicated", "dp=4", "dp=2,tp=2,tp_mode=replicate",
             ("a2a", *WIRE)),
        Case("encoder DP=4 -> LLM DP=2 x TP=2 SP", "dp=4", "dp=2,tp=2", ("a2a", *WIRE)),
        Case("fan-in DP=4 -> DP=2, non-colocated", "dp=4", "dp=2", ("a2a", *WIRE),
             placement="noncolocated"),
        Case("fan-in DP=4 -> TP=2 replicated, non-colocated", "dp=4", "tp=2,tp_mode=replicate",
             ("a2a", *WIRE), placement="noncolocated"),
        Case("fan-out DP=2 -> DP=2 x TP=2 SP, non-colocated", "dp=2", "dp=2,tp=2", ("a2a", *WIRE),
             placement="noncolocated"),
        Case("CP zigzag -> CP contiguous", *CP, ("a2a", *WIRE)),
    ),
}
PRESET_TARGETS = tuple(Target(name, name, base, ratio, largest_only=True)
                       for name, _, _, base, ratio in TARGETS) + (
    Target("(a) CP sweep, every size >= 4 MiB", TARGETS[0][0], "wire", 1.2, min_size=4 * MiB),
    Target("(b) CP sweep, every size", TARGETS[0][0], "a2a", 1.0),
    Target("(c) colocated, nothing off-rank", NO_WIRE_CASE, "copy", 1.2),
    # the CP sweep's messages are an eighth of the tensor each
    Target("(d) safety protocol, messages >= 1 MiB", TARGETS[0][0], "unchecked", 1.05, min_size=8 * MiB),
)


# ---------------------------------------------------------------------------------------------------
# cases: layout specs, sequence lengths, layouts


def parse_spec(text: str) -> dict[str, Any]:
    """"cp=2,tp=2,tp_mode=hidden" -> {"cp": 2, "tp": 2, "tp_mode": "hidden"}."""
    spec = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS | {"rows"}:
            raise ValueError(f"bad layout item {item!r} in {text!r}; expected key=value with key in "
                             f"{sorted(GRID_KEYS | {'rows'})}")
        spec[key] = int(value) if key in INT_KEYS else value.strip()
    if "rows" in spec and len(spec) > 1:
        raise ValueError(f"rows=K is a flat split of the rows and takes no other keys: {text!r}")
    if not spec:
        raise ValueError("empty layout spec")
    return spec


def spec_size(spec: dict[str, Any]) -> int:
    if "rows" in spec:
        return spec["rows"]
    return spec.get("dp", 1) * spec.get("cp", 1) * spec.get("tp", 1)


def build_layout(spec: dict[str, Any], ranks: list[int], seq_lens: list[int], hidden: int) -> Layout:
    if spec_size(spec) != len(ranks):
        raise ValueError(f"layout {spec} needs {spec_size(spec)} ranks but gets {len(ranks)} "
                         f"(ranks {ranks})")
    if "rows" in spec:
        return Layout.contiguous(ranks, sum(seq_lens))
    tp_mode = spec.get("tp_mode", "sp")
    return Layout.grid(seq_lens, dp=spec.get("dp", 1), cp=spec.get("cp", 1), tp=spec.get("tp", 1),
                       cp_mode=spec.get("cp_mode", "zigzag"), tp_mode=tp_mode,
                       dp_assign=spec.get("dp_assign", "contiguous"), ranks=ranks,
                       num_cols=hidden if tp_mode == "hidden" else None)


def ragged_lens(num_rows: int, num_seqs: int, seed: int = 0) -> list[int]:
    """num_seqs lengths >= 1 summing to num_rows, log-normal (sigma 0.75) like packed documents."""
    if num_seqs < 1 or num_rows < num_seqs:
        raise ValueError(f"cannot cut {num_rows} rows into {num_seqs} sequences of >= 1 row")
    weights = np.random.default_rng(seed).lognormal(0.0, 0.75, num_seqs)
    spare = num_rows - num_seqs
    lens = 1 + np.floor(weights / weights.sum() * spare).astype(np.int64)
    lens[: num_rows - int(lens.sum())] += 1  # the rounding remainder, one row each to the first
    return lens.tolist()


def world_size_needed(cfg: dict[str, Any]) -> int:
    """Ranks a case runs on: colocated, both layouts start at rank 0; noncolocated, the destination
    takes the ranks after the source's."""
    src, dst = spec_size(cfg["src"]), spec_size(cfg["dst"])
    return max(src, dst) if cfg["placement"] == "colocated" else src + dst


def case_layouts(cfg: dict[str, Any], world_size: int) -> tuple[Layout, Layout]:
    need = world_size_needed(cfg)
    if need != world_size:
        raise ValueError(f"{cfg['src_text']!r} -> {cfg['dst_text']!r} {cfg['placement']} needs {need} "
                         f"ranks, the world has {world_size}")
    src_size = spec_size(cfg["src"])
    first_dst = 0 if cfg["placement"] == "colocated" else src_size
    src_ranks = list(range(src_size))
    dst_ranks = list(range(first_dst, first_dst + spec_size(cfg["dst"])))
    return (build_layout(cfg["src"], src_ranks, cfg["seq_lens"], cfg["hidden"]),
            build_layout(cfg["dst"], dst_ranks, cfg["seq_lens"], cfg["hidden"]))


# ---------------------------------------------------------------------------------------------------
# per-rank geometry shared by the baselines


def local_cols(layout: Layout, rank: int, hidden: int) -> tuple[int, int]:
    c = layout.cols(rank) if rank in layout.ranks else None
    return (0, hidden) if c is None else c


def local_tensor(layout: Layout, x_global: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank's shard, or the zero-row tensor a rank outside the layout passes."""
    if rank in layout.ranks:
        return layout.shard(x_global, rank).contiguous()
    return x_global[:0]


def replicated(layout: Layout, hidden: int) -> bool:
    """Some element is held by more than one rank."""
    held = 0
    for r in layout.ranks:
        c0, c1 = local_cols(layout, r, hidden)
        held += layout.local_num_rows(r) * (c1 - c0)
    return held > layout.num_rows * hidden


def full_width_source(src: Layout, hidden: int) -> bool:
    return all(local_cols(src, r, hidden) == (0, hidden) for r in src.ranks)


def serving_rank(src: Layout, dst: Layout, d: int) -> np.ndarray:
    """For each row of destination d (local order), the source rank that sends it: d itself when it
    holds the row, else the holder at position (d's position % holders), hpcomm's replica rule."""
    rows = dst.rows(d).numpy()
    held = np.zeros((len(src.ranks), len(rows)), dtype=bool)
    for i, s in enumerate(src.ranks):
        where = np.zeros(src.num_rows, dtype=bool)
        where[src.rows(s).numpy()] = True
        held[i] = where[rows]
    pick = (dst.index(d) % held.sum(0))[None, :]
    chosen = np.asarray(src.ranks)[np.argmax(np.cumsum(held, 0) > pick, 0)]
    if d in src.ranks:
        chosen[held[src.index(d)]] = d
    return chosen


class A2A:
    """index_select -> all_to_all_single -> index_copy_, with index lists and buffers built once."""

    def __init__(self, src: Layout, dst: Layout, rank: int, world_size: int, x: torch.Tensor,
                 hidden: int) -> None:
        dev = x.device
        pos = np.full(src.num_rows, -1, dtype=np.int64)
        if rank in src.ranks:
            pos[src.rows(rank).numpy()] = np.arange(src.local_num_rows(rank))
        self.send = []  # (dst rank, local source rows, c0, c1) in rank order
        recv_idx: list[list[int] | np.ndarray] = [[] for _ in range(world_size)]
        for d in dst.ranks:
            chosen = serving_rank(src, dst, d)
            c0, c1 = local_cols(dst, d, hidden)
            rows = dst.rows(d).numpy()
            if rank in src.ranks:
                self.send.append((d, torch.from_numpy(pos[rows[chosen == rank]]).to(dev), c0, c1))
            if d == rank:
                for s in range(world_size):
                    recv_idx[s] = np.flatnonzero(chosen == s)
        self.send.sort(key=lambda t: t[0])
        send_counts = dict((d, len(i) * (c1 - c0)) for d, i, c0, c1 in self.send)
        self.send_splits = [send_counts.get(d, 0) for d in range(world_size)]
        c0, c1 = local_cols(dst, rank, hidden)
        self.width = c1 - c0
        self.recv_splits = [len(i) * self.width for i in recv_idx]
        self.recv_idx = torch.from_numpy(np.concatenate(recv_idx).astype(np.int64)).to(dev)
        self.send_buf = x.new_empty(sum(self.send_splits))
        self.recv_buf = x.new_empty(sum(self.recv_splits))
        self.x_grad_buf = x.new_empty(x.shape)
        self.out = x.new_empty(dst.local_num_rows(rank) if rank in dst.ranks else 0, self.width)

    def _send_views(self, buf: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, int, torch.Tensor]]:
        off = 0
        for d, idx, c0, c1 in self.send:
            n = len(idx) * (c1 - c0)
            yield idx, c0, c1, buf[off:off + n].view(len(idx), c1 - c0)
            off += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for idx, c0, c1, view in self._send_views(self.send_buf):
            torch.index_select(x[:, c0:c1], 0, idx, out=view)
        dist.all_to_all_single(self.recv_buf, self.send_buf, self.recv_splits, self.send_splits)
        return self.out.index_copy_(0, self.recv_idx, self.recv_buf.view(-1, self.width))

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        """The reverse exchange: each destination row's gradient goes back to the rank that served
        it and is added there (a row served to several destinations gets their sum)."""
        torch.index_select(grad_out, 0, self.recv_idx, out=self.recv_buf.view(-1, self.width))
        dist.all_to_all_single(self.send_buf, self.recv_buf, self.send_splits, self.recv_splits)
        grad_x = self.x_grad_buf.zero_()
        for idx, c0, c1, view in self._send_views(self.send_buf):
            grad_x[:, c0:c1].index_add_(0, idx, view)
        return grad_x


class AllGather:
    """all_gather every rank's shard (padded to the largest), then index this rank's rows."""

    def __init__(self, src: Layout, dst: Layout, rank: int, world_size: int, x: torch.Tensor,
                 hidden: int) -> None:
        counts = [src.local_num_rows(r) if r in src.ranks else 0 for r in range(world_size)]
        self.max_rows, self.num_rows = max(counts), counts[rank]
        slot = np.full(src.num_rows, -1, dtype=np.int64)
        for s in src.ranks:  # the row's first source holder: replicas gather redundantly, as a user's
            rows = src.rows(s).numpy()
            fresh = slot[rows] < 0
            slot[rows[fresh]] = s * self.max_rows + np.flatnonzero(fresh)
        rows = dst.rows(rank).numpy() if rank in dst.ranks else np.zeros(0, np.int64)
        self.idx = torch.from_numpy(slot[rows]).to(x.device)
        self.c0, self.c1 = local_cols(dst, rank, hidden)
        self.padded = x.new_zeros(self.max_rows, hidden)
        self.gathered = x.new_empty(world_size * self.max_rows, hidden)
        self.out = x.new_empty(len(rows), self.c1 - self.c0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.padded[:self.num_rows].copy_(x)
        _all_gather_single(self.gathered, self.padded)
        return torch.index_select(self.gathered[:, self.c0:self.c1], 0, self.idx, out=self.out)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Scatter-add the local gradient into a global buffer, reduce_scatter back to the owners."""
        self.gathered.zero_()[:, self.c0:self.c1].index_add_(0, self.idx, grad_out)
        _reduce_scatter_single(self.padded, self.gathered)
        return self.padded[:self.num_rows]


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor) -> None:
    # all_gather_into_tensor is deprecated from torch 2.13 on; hpcomm supports torch >= 2.4
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp)


def _reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, inp)


def dtensor_placement(layout: Layout, world_size: int, hidden: int) -> Placement | None:
    """The DTensor placement on a 1-D mesh over the world that gives every rank exactly its shard
    in ``layout`` (Shard uses torch.chunk sizes, not tensor_split), or None."""
    from torch.distributed.tensor import Replicate, Shard

    if layout.ranks != tuple(range(world_size)):
        return None
    n = layout.num_rows

    def chunk(total: int, i: int) -> tuple[int, int]:
        size = -(-total // world_size)
        return min(i * size, total), min((i + 1) * size, total)

    def holds(r: int, lo: int, hi: int) -> bool:
        s, l = layout.runs(r)
        return (hi == lo and len(s) == 0) or (len(s) == 1 and s[0] == lo and l[0] == hi - lo)

    cols = [local_cols(layout, r, hidden) for r in layout.ranks]
    if all(c == (0, hidden) for c in cols):
        if all(holds(r, 0, n) for r in layout.ranks):
            return Replicate()
        if all(holds(r, *chunk(n, r)) for r in layout.ranks):
            return Shard(0)
        return None
    if all(holds(r, 0, n) and cols[r] == chunk(hidden, r) for r in layout.ranks):
        return Shard(1)
    return None


def wire_splits(t: Transform, rank: int, world_size: int, hidden: int, backward: bool
                ) -> tuple[list[int], list[int]]:
    """Elements hpcomm's plan of one direction sends to and receives from each rank (backward:
    the gradient plan of the transform's convention, not the transpose of forward)."""
    plan = t.spec.rank_plan(rank, backward)
    unit = 1 if t.plan.col_mode else hidden
    send_splits, recv_splits = [0] * world_size, [0] * world_size
    for peer, seg in plan.sends:
        send_splits[peer] = seg.units() * unit
    for peer, seg in plan.recvs:
        recv_splits[peer] = seg.units() * unit
    return send_splits, recv_splits


class Wire:
    """One all_to_all_single per direction of the element counts hpcomm's plans send and receive
    per peer, into buffers preallocated once."""

    def __init__(self, t: Transform, rank: int, world_size: int, x: torch.Tensor, hidden: int,
                 backward: bool) -> None:
        self.directions = []
        for grad in (False, True)[:1 + backward]:
            send_splits, recv_splits = wire_splits(t, rank, world_size, hidden, grad)
            self.directions.append((x.new_zeros(sum(send_splits)), x.new_zeros(sum(recv_splits)),
                                    send_splits, recv_splits))

    def run(self) -> None:
        for send_buf, recv_buf, send_splits, recv_splits in self.directions:
            dist.all_to_all_single(recv_buf, send_buf, recv_splits, send_splits)


class WireP2P:
    """The same per-peer messages as ``Wire``, as one batch_isend_irecv per direction (hpcomm's
    transport): receives and sends posted together, then every one waited for."""

    def __init__(self, t: Transform, rank: int, world_size: int, x: torch.Tensor, hidden: int,
                 backward: bool) -> None:
        self.directions = []
        for grad in (False, True)[:1 + backward]:
            send_splits, recv_splits = wire_splits(t, rank, world_size, hidden, grad)
            ops = [dist.P2POp(dist.irecv, buf, peer) for peer, buf in self._views(x, recv_splits)]
            ops += [dist.P2POp(dist.isend, buf, peer) for peer, buf in self._views(x, send_splits)]
            self.directions.append(ops)

    @staticmethod
    def _views(x: torch.Tensor, splits: list[int]) -> list[tuple[int, torch.Tensor]]:
        buf = x.new_zeros(sum(splits))
        ends = np.cumsum(splits).tolist()
        return [(peer, buf[end - n:end]) for peer, (n, end) in enumerate(zip(splits, ends)) if n]

    def run(self) -> None:
        for ops in self.directions:
            if ops:  # batch_isend_irecv rejects an empty list
                for work in dist.batch_isend_irecv(ops):
                    work.wait()


class _NoHeaders(protocol.Exchange):
    """Stands in for a call's protocol (protocol.Exchange): no header is sent or checked, and every
    pair's payloads are posted as if its headers agreed."""

    def __init__(self, transport: Any, rank: int, *args: Any, **kwargs: Any) -> None:
        self.rank, self._transport, self._what = rank, transport, "unchecked"
        self.peers: list[int] = []
        self._verdicts: dict[int, str | None] = {}
        self._tags: dict[int, tuple[int, int]] = {}
        self._lost = False

    def verdict(self, peer: int) -> str | None:
        return None

    def sent(self) -> None:
        pass


class Unchecked:
    """A second Transform of the same layouts whose calls run with the protocol replaced by
    ``_NoHeaders`` (patched for the call only); forward into a preallocated output, as hpcomm's."""

    def __init__(self, t: Transform, x: torch.Tensor, gy: torch.Tensor, grad: bool, backward: bool) -> None:
        self.t, self.x, self.gy, self.grad, self.backward = t, x, gy, grad, backward
        self.out = torch.empty_like(gy)

    def run(self) -> None:
        saved, protocol.Exchange = protocol.Exchange, _NoHeaders  # type: ignore[misc]
        try:
            if self.backward:
                torch.autograd.backward(self.t(self.x.detach().requires_grad_(self.grad)), self.gy)
            else:
                with torch.no_grad():
                    self.t(self.x, out=self.out)
        finally:
            protocol.Exchange = saved  # type: ignore[misc]


class Copy:
    """A transform whose plan moves nothing off-rank, by hand: ``copy_`` of the one contiguous run
    of local rows this rank keeps, else ``index_select`` of them, into a preallocated output."""

    def __init__(self, src: Layout, dst: Layout, rank: int, x: torch.Tensor) -> None:
        pos = np.full(src.num_rows, -1, dtype=np.int64)
        if rank in src.ranks:
            pos[src.rows(rank).numpy()] = np.arange(src.local_num_rows(rank))
        keep = pos[dst.rows(rank).numpy()] if rank in dst.ranks else np.zeros(0, np.int64)
        self.num_in = x.shape[0]
        run = len(keep) > 0 and bool(np.all(np.diff(keep) == 1))
        self.run = (int(keep[0]), int(keep[0]) + len(keep)) if run else None
        self.idx = torch.from_numpy(keep).to(x.device)
        self.out = x.new_empty(len(keep), *x.shape[1:])
        self.grad_x = x.new_empty(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.run is not None:
            return self.out.copy_(x[self.run[0]:self.run[1]])
        return torch.index_select(x, 0, self.idx, out=self.out)

    def backward(self, grad_out: torch.Tensor) -> torch.Tensor:
        """Rows no destination keeps get zeros (the plan's fill), the kept ones their gradient."""
        if self.run == (0, self.num_in):
            return self.grad_x.copy_(grad_out)
        return self.grad_x.zero_().index_copy_(0, self.idx, grad_out)


class DTensorRedistribute:
    def __init__(self, src_placement: Placement, dst_placement: Placement, world_size: int,
                 x: torch.Tensor, shape: tuple[int, int]) -> None:
        from torch.distributed.tensor import DTensor, init_device_mesh

        self.from_local = DTensor.from_local
        self.mesh = init_device_mesh(x.device.type, (world_size,))
        self.src, self.dst, self.shape = [src_placement], [dst_placement], shape
        self.stride = (shape[1], 1)  # the contiguous [rows, hidden] global tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch annotates shape as torch.Size; DTensor accepts any tuple of ints
        dt = self.from_local(x, self.mesh, self.src, run_check=False, shape=self.shape, stride=self.stride)  # type: ignore[arg-type]
        return dt.redistribute(self.mesh, self.dst).to_local()


# ---------------------------------------------------------------------------------------------------
# one case on one rank


def held_gradient(dst: Layout, gy_global: torch.Tensor, hidden: int) -> torch.Tensor:
    """The gradient of X under hpcomm's default convention ("replicated") when every destination
    holder of an element carries the same gradient (each rank's is its slice of ``gy_global``):
    that gradient for every element some destination holds, zero for the others; each source
    replica receives all of it."""
    held = torch.zeros_like(gy_global, dtype=torch.bool)
    for d in dst.ranks:
        c0, c1 = local_cols(dst, d, hidden)
        held[dst.rows(d).to(held.device), c0:c1] = True
    return torch.where(held, gy_global, torch.zeros_like(gy_global))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _all_true(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if a.shape != b.shape:
        return False
    if exact:
        return torch.equal(a, b)
    # gradients of replicated destinations are sums of several contributions, added in an order
    # that differs between methods: agree to a few ulps of the dtype
    tol = torch.finfo(a.dtype).eps * 8
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


@dataclass
class Prepared:
    """One case on one rank: a zero-argument runner per method (forward, or forward+backward
    returning the source gradient), which methods matched hpcomm, and why the others are n/a."""

    runners: dict[str, Callable[[], Any]]  # method -> zero-argument runner
    verified: dict[str, bool]
    na: dict[str, str]
    transform: Transform
    device: torch.device
    size: int
    count: int
    out_arg: bool

    @property
    def timed(self) -> list[str]:
        return [m for m in METHODS if m in self.runners and self.verified.get(m, m in REFERENCES)]


def prepare(rank: int, world_size: int, cfg: dict[str, Any]) -> Prepared:
    """Build every method for ``cfg`` and verify each once (collective: every rank calls it)."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg.get("device", "cpu"))
    dtype, hidden = DTYPES[cfg["dtype"]], cfg["hidden"]
    src, dst = case_layouts(cfg, world_size)
    num_rows = src.num_rows
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    x_global = torch.randn(num_rows, hidden, generator=gen).to(device=device, dtype=dtype)
    gy_global = torch.randn(num_rows, hidden, generator=gen).to(device=device, dtype=dtype)
    x = local_tensor(src, x_global, rank)
    gy = local_tensor(dst, gy_global, rank)
    expected = local_tensor(dst, x_global, rank)
    backward = cfg["backward"]

    t = Transform(src, dst, backend=cfg.get("backend", "auto"))
    takes_out = "out" in inspect.signature(Transform.__call__).parameters
    y_buf = torch.empty_like(expected)

    def hpcomm_fwd() -> torch.Tensor:
        with torch.no_grad():
            return t(x, out=y_buf) if takes_out else t(x)

    def hpcomm_fwd_bwd() -> torch.Tensor:
        leaf = x.detach().requires_grad_(rank in src.ranks)
        torch.autograd.backward(t(leaf), gy)
        return leaf.grad if leaf.grad is not None else torch.zeros_like(x)

    runners: dict[str, Callable[[], Any]] = {"hpcomm": hpcomm_fwd_bwd if backward else hpcomm_fwd}
    reason = {}
    full_width = full_width_source(src, hidden)
    # a source replica that did not serve a row gets no gradient from the hand-written baselines,
    # while hpcomm's default gives every replica the full gradient: not the same function; and
    # they add the gradients of a row's destination replicas, where hpcomm's default reads one
    replicated_src = replicated(src, hidden)
    replicated_dst = replicated(dst, hidden)
    for name, cls in (("a2a", A2A), ("allgather", AllGather)):
        if name not in cfg["methods"]:
            continue
        if not full_width:
            reason[name] = "source splits the hidden dim"
            continue
        if backward and (replicated_src or replicated_dst):
            which = "source" if replicated_src else "destination"
            reason[name] = f"replicated {which}: gradient convention differs"
            continue
        impl = cls(src, dst, rank, world_size, x, hidden)
        if backward:
            def baseline_fwd_bwd(impl: A2A | AllGather = impl) -> torch.Tensor:
                impl.forward(x)
                return impl.backward(gy)
            runners[name] = baseline_fwd_bwd
        else:
            runners[name] = lambda impl=impl: impl.forward(x)  # type: ignore[misc]
    if "dtensor" in cfg["methods"]:
        placements = (dtensor_placement(src, world_size, hidden),
                      dtensor_placement(dst, world_size, hidden))
        if None in placements:
            reason["dtensor"] = "not one placement pair on a 1-D mesh"
        else:
            dt = DTensorRedistribute(*placements, world_size, x, (num_rows, hidden))  # type: ignore[arg-type]  # no None here
            if backward:
                def dtensor_fwd_bwd(dt: DTensorRedistribute = dt) -> torch.Tensor | None:
                    leaf = x.detach().requires_grad_()
                    torch.autograd.backward(dt.forward(leaf), gy)
                    return leaf.grad
                runners["dtensor"] = dtensor_fwd_bwd
            else:
                runners["dtensor"] = lambda dt=dt: dt.forward(x)  # type: ignore[misc]

    if "copy" in cfg["methods"]:
        if t.plan.crosses_wire():
            reason["copy"] = "the plan sends rows off-rank"
        elif not full_width:
            reason["copy"] = "source splits the hidden dim"
        elif backward and replicated_src:
            reason["copy"] = "replicated source: gradient convention differs"
        else:
            copy = Copy(src, dst, rank, x)
            if backward:
                def copy_fwd_bwd(copy: Copy = copy) -> torch.Tensor:
                    copy.forward(x)
                    return copy.backward(gy)
                runners["copy"] = copy_fwd_bwd
            else:
                runners["copy"] = lambda copy=copy: copy.forward(x)  # type: ignore[misc]
    if "wire" in cfg["methods"]:
        runners["wire"] = Wire(t, rank, world_size, x, hidden, backward).run
    if "wire_p2p" in cfg["methods"]:
        runners["wire_p2p"] = WireP2P(t, rank, world_size, x, hidden, backward).run
    if "unchecked" in cfg["methods"]:
        runners["unchecked"] = Unchecked(Transform(src, dst, backend=cfg.get("backend", "auto")), x, gy,
                                         rank in src.ranks, backward).run

    # verify once: hpcomm against slicing the global tensor, each baseline against hpcomm
    with torch.no_grad():
        y_ref = (t(x, out=torch.empty_like(expected)) if takes_out else t(x)).clone()
    ok = torch.equal(y_ref, expected)
    ref = y_ref
    if backward:
        ref = runners["hpcomm"]().clone()
        ok &= _same(ref, local_tensor(src, held_gradient(dst, gy_global, hidden), rank), False)
    verified = {"hpcomm": _all_true(ok, device)}
    for name in BASELINES:
        if name in runners:
            with torch.no_grad() if not backward else torch.enable_grad():
                got = runners[name]()
            verified[name] = _all_true(_same(got, ref, exact=not backward), device)
    return Prepared(runners, verified,
                    {m: reason.get(m, "not requested") for m in COMPARED if m not in runners},
                    t, device, num_rows * hidden * x_global.element_size(), num_rows * hidden,
                    takes_out)


def time_once(p: Prepared, method: str, burst: int = 1) -> float:
    """Seconds per call on this rank of ``burst`` calls back to back, started right after a barrier."""
    dist.barrier()
    _sync(p.device)
    start = time.perf_counter()
    for _ in range(burst):
        p.runners[method]()
    _sync(p.device)
    return (time.perf_counter() - start) / burst


def run_case(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Verify, then time every method on this rank; returns the same summary on every rank."""
    p = prepare(rank, world_size, cfg)
    timed = p.timed
    for _ in range(cfg["warmup"]):
        for m in timed:
            p.runners[m]()
    times: dict[str, list[float]] = {m: [] for m in timed}
    for _ in range(cfg["iters"]):
        for m in timed:
            times[m].append(time_once(p, m, cfg.get("burst", 1)))
    per_iter = torch.tensor([times[m] for m in timed], dtype=torch.float64, device=p.device)
    dist.all_reduce(per_iter, op=dist.ReduceOp.MAX)
    median_us = {m: statistics.median(per_iter[i].tolist()) * 1e6 for i, m in enumerate(timed)}

    st, t = p.transform.stats(rank), p.transform
    unit_bytes = p.size // p.count * (1 if t.plan.col_mode else cfg["hidden"])
    wire = torch.tensor([max(st["sent"], st["received"]) * unit_bytes], dtype=torch.float64,
                        device=p.device)
    dist.all_reduce(wire, op=dist.ReduceOp.MAX)
    return {"rows": t.src.num_rows, "hidden": cfg["hidden"], "dtype": cfg["dtype"],
            "size": p.size, "count": p.count, "max_wire_bytes": int(wire.item()),
            "pass": "fwd+bwd" if cfg["backward"] else "fwd", "time_us": median_us,
            "iteration_us": {m: [v * 1e6 for v in per_iter[i].tolist()] for i, m in enumerate(timed)},
            "verified": p.verified, "na": p.na, "out_arg": p.out_arg}


# ---------------------------------------------------------------------------------------------------
# reporting


def size_text(size: int) -> str:
    """8388608 -> "8 MiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.4g} {unit}"
        value /= 1024
    return f"{value:.4g} GiB"


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Add algbw, busbw, f, the ratios hpcomm time / method time and the point-to-point transport's
    time over the collective's."""
    t = result["time_us"]
    size = result["size"]
    result["busbw_factor"] = result["max_wire_bytes"] / size
    result["algbw_GBps"] = {m: size / (us * 1e3) for m, us in t.items()}
    result["busbw_GBps"] = {m: bw * result["busbw_factor"] for m, bw in result["algbw_GBps"].items()}
    result["ratio"] = {m: t["hpcomm"] / t[m] for m in COMPARED if m in t and "hpcomm" in t}
    if "wire" in t and "wire_p2p" in t:
        result["p2p_over_wire"] = t["wire_p2p"] / t["wire"]
    return result


WIDTH = 120  # of every line of the default table and its legend


def columns(methods: Sequence[str], wide: bool) -> list[tuple[str, int]]:
    """(name, width) of the table's columns. By default: the size, hpcomm's time and bandwidths,
    and its ratio to each method of ``methods`` compared with it (at most 113 characters); wide:
    every column, for every method."""
    if wide:
        return [("size(B)", 12), ("count", 10), ("rows", 8), ("pass", 7), ("time(us)", 10),
                ("algbw", 7), ("busbw", 7), ("f", 5),
                *((name, width) for m in COMPARED
                  for name, width in ((f"{LABEL[m]}(us)", 10), (f"hp/{LABEL[m]}", 7))),
                ("p2p/wire", 8), ("verified", 9)]
    return [("size(B)", 12), ("pass", 7), ("time(us)", 10), ("algbw", 7), ("busbw", 7),
            *((f"hp/{LABEL[m]}", 7) for m in COMPARED if m in methods), ("verified", 9)]


def header(cols: Sequence[tuple[str, int]]) -> str:
    return " ".join(name.rjust(width) for name, width in cols)


def format_row(r: dict[str, Any], cols: Sequence[tuple[str, int]]) -> str:
    t = r["time_us"]
    hp = t.get("hpcomm")
    cells = {"size(B)": str(r["size"]), "count": str(r["count"]), "rows": str(r["rows"]),
             "pass": r["pass"], "time(us)": f"{hp:.1f}" if hp else "FAIL",
             "algbw": f"{r['algbw_GBps'].get('hpcomm', 0):.2f}",
             "busbw": f"{r['busbw_GBps'].get('hpcomm', 0):.2f}", "f": f"{r['busbw_factor']:.2f}",
             "p2p/wire": f"{r['p2p_over_wire']:.2f}x" if "p2p_over_wire" in r else "-"}
    for m in COMPARED:
        if m in r["na"]:
            us = ratio = "n/a"
        elif not r["verified"].get(m, m in REFERENCES):
            us, ratio = "WRONG", "-"
        else:
            us, ratio = f"{t[m]:.1f}", f"{r['ratio'][m]:.2f}x" if m in r["ratio"] else "-"
        cells[f"{LABEL[m]}(us)"], cells[f"hp/{LABEL[m]}"] = us, ratio
    bad = [m for m, ok in r["verified"].items() if not ok]
    cells["verified"] = "FAIL:" + "/".join(bad) if bad else "ok"
    return " ".join(cells[name].rjust(width) for name, width in cols)


def legend(cfg: dict[str, Any], world_size: int, backend: str, wide: bool) -> list[str]:
    lens = cfg["seq_lens"]
    shown = ",".join(map(str, lens[:8])) + (",..." if len(lens) > 8 else "")
    methods = [m for m in COMPARED if wide or m in cfg["methods"]]
    items = [
        f"src {cfg['src_text']!r} -> dst {cfg['dst_text']!r}, {cfg['placement']}, {world_size} "
        f"ranks ({backend}), {cfg['dtype']} [rows, {cfg['hidden']}], {len(lens)} seqs ({shown})",
        f"median of {cfg['iters']} iterations after {cfg['warmup']} warmup, barrier before each, "
        "max over ranks",
        "size = bytes of the global tensor; time(us) = hpcomm's; algbw = size / time (GB/s); "
        "busbw = algbw * f, f = most bytes one rank sends or receives off-rank / size",
        "hp/X = hpcomm time / X time (< 1: hpcomm faster)"
        + ("; X(us) = X's time; p2p/wire = wire_p2p time / wire time" if wide else "")
        + ("; X: " + ", ".join(f"{LABEL[m]} = {m}" if LABEL[m] != m else m for m in methods)
           if methods else ""),
    ]
    return [line for item in items
            for line in textwrap.wrap(item, WIDTH, initial_indent="# ", subsequent_indent="#   ")]


def plot(results: list[dict[str, Any]], path: str) -> None:
    """algbw vs size, one panel per case, one line per method and pass: each method one hue, its
    forward line dark and solid with circles, its forward+backward line light and dashed with
    squares (no two lines share a colour); one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    palette = plt.get_cmap("tab20")  # 20 colours, in pairs: a dark and a light shade of each hue
    style = {"fwd": (0, "-", "o"), "fwd+bwd": (1, "--", "s")}  # (shade, line style, marker)
    cases = list(dict.fromkeys(r["case"] for r in results))
    with plt.rc_context({"font.size": 10}):
        fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases) + 2.5, 5), squeeze=False)
        lines = {}
        for ax, case in zip(axes[0], cases):
            for i, m in enumerate(METHODS):
                for pas, (shade, linestyle, marker) in style.items():
                    pts = sorted((r["size"], r["algbw_GBps"][m]) for r in results
                                 if r["case"] == case and r["pass"] == pas and m in r["algbw_GBps"])
                    if pts:
                        lines[f"{m} {pas}"], = ax.plot(
                            *zip(*pts), color=palette(2 * i + shade), linewidth=2,
                            linestyle=linestyle, marker=marker)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: size_text(int(v))))
            ax.set_yscale("log")
            ax.set_xlabel("size of the global tensor (bytes)")
            ax.set_ylabel("algbw = size / time (GB/s)")
            ax.set_title(case)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle("hpcomm-bench: bandwidth by tensor size (higher is better)")
        fig.legend(lines.values(), lines.keys(), loc="center right")
        fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# driver


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpcomm-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default="dp=4,dp_assign=balanced", help="source layout spec")
    p.add_argument("--dst", default="cp=2,tp=2", help="destination layout spec")
    p.add_argument("--placement", choices=("colocated", "noncolocated"), default="colocated",
                   help="colocated: both layouts from rank 0; noncolocated: the destination on the "
                   "ranks after the source's")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths (overrides --rows/--num-seqs)")
    p.add_argument("--rows", type=int, default=65536, help="total rows (largest size with --sweep)")
    p.add_argument("--num-seqs", type=int, default=16, help="ragged sequences per size")
    p.add_argument("--seed", type=int, default=0, help="seed of the ragged lengths and the data")
    p.add_argument("--hidden", type=int, default=256, help="elements per row (last dim)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="element type")
    p.add_argument("--sweep", action="store_true", help="sizes from --min-rows doubling to --rows")
    p.add_argument("--min-rows", type=int, default=1024, help="smallest size of --sweep, in rows")
    p.add_argument("--nproc", type=int, help="local gloo ranks (default: as many as the layouts "
                   "name; ignored under torchrun)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    p.add_argument("--iters", type=int, default=20, help="timed rounds; the table shows the median")
    p.add_argument("--burst", type=int, default=1, help="calls back to back per timed sample, as a "
                   "training step makes them (single calls after a barrier also time the barrier's "
                   "skew between ranks, which can dominate below a few MiB)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--backend", default="auto", help="hpcomm kernel backend")
    p.add_argument("--wide", action="store_true", help="the full table: each method's own time "
                   "beside its ratio, the element count, rows, f and p2p/wire (about 230 columns)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write every row, with every measurement, as JSON to FILE; without FILE, "
                   "print the JSON document to stdout and the tables to stderr")
    p.add_argument("--plot", help="write algbw vs size (PNG) to this file")
    p.add_argument("--preset", choices=sorted(PRESETS), help="targets: hpcomm's CPU performance "
                   "targets, PASS/MISS per target; megatron: Megatron-style boundaries, which transport "
                   "(all_to_all_single or batch_isend_irecv) moves the plan's bytes faster. Fixes the "
                   "layouts, placements, methods and fp32; --rows (default 64 Ki) and --hidden "
                   "(default 256: 1 KiB rows) set the size the targets are stated for; the targets' CP "
                   f"case sweeps from {SWEEP_MIN_ROWS} rows. --num-seqs, --sweep, --iters, --warmup, "
                   "--backward, --wide, --json, --plot still apply")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown or "hpcomm" not in methods:
        p.error(f"--methods must include hpcomm and only name {', '.join(METHODS)}; got {args.methods}")
    args.methods = methods
    if args.sweep and args.seq_lens:
        p.error("--sweep draws lengths per size from --rows/--num-seqs; drop --seq-lens")
    if args.preset and args.seq_lens:
        p.error("a preset draws its own lengths from --rows/--num-seqs; drop --seq-lens")
    if args.preset:
        args.dtype = "float32"
    return args


def case_sizes(args: argparse.Namespace, case: Case) -> list[list[int]]:
    """The sequence lengths of each size a case runs at."""
    if args.seq_lens:
        return [[int(v) for v in args.seq_lens.split(",")]]
    if case.equal_lens:
        k = spec_size(parse_spec(case.src))
        return [[args.rows // k + (i < args.rows % k) for i in range(k)]]
    rows = [args.rows]
    first = SWEEP_MIN_ROWS if case.sweep else args.min_rows if args.sweep else None
    if first is not None:
        rows = [r for r in (first << k for k in range(64)) if r < args.rows] + rows
    return [ragged_lens(n, args.num_seqs, args.seed) for n in rows]


def case_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One config per (case, size, pass), each with the world size it runs on."""
    if args.preset:
        cases: Sequence[Case] = PRESETS[args.preset]
    else:
        cases = [Case(f"{args.src} -> {args.dst}", args.src, args.dst, tuple(args.methods), args.placement)]
    passes = [False, True] if args.backward else [False]
    out = []
    for case in cases:
        for lens in case_sizes(args, case):
            for backward in passes:
                cfg = {"case": case.name, "src_text": case.src, "dst_text": case.dst,
                       "src": parse_spec(case.src), "dst": parse_spec(case.dst),
                       "placement": case.placement, "seq_lens": lens, "hidden": args.hidden,
                       "dtype": args.dtype, "warmup": args.warmup, "iters": args.iters, "burst": args.burst,
                       "backward": backward, "seed": args.seed,
                       "methods": ["hpcomm"] + [m for m in case.methods if m != "hpcomm"],
                       "backend": args.backend}
                cfg["world_size"] = (int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ
                                     else args.nproc or world_size_needed(cfg))
                out.append(cfg)
    return out


def local_threads(world_size: int) -> int:
    """Threads per rank of a local world. Its workers import torch before World can set
    OMP_NUM_THREADS, so each would run as many threads as there are cores; oversubscribed, pack and
    index_select run ~10x slower. Share the cores out, as torchrun's OMP_NUM_THREADS=1 does."""
    return max(1, (os.cpu_count() or 1) // world_size)


def run_all(cfgs: list[dict[str, Any]], worlds: Callable[[int], World] | None = None,
            wide: bool = False, out: TextIO | None = None) -> list[dict[str, Any]]:
    """Every case on the torchrun world (RANK set), on ``worlds(n)`` (an existing local World of n
    ranks), or on fresh local gloo worlds, each closed once the next case needs another size;
    rows in order. Prints each case's table to ``out`` (default: stdout) as its rows come."""
    torchrun = "RANK" in os.environ
    quiet = torchrun and dist.get_rank() != 0

    def print_fn(line: str) -> None:
        if not quiet:
            print(line, file=out, flush=True)
    owned: World | None = None
    results, last_case, explained = [], None, set()
    try:
        for cfg in cfgs:
            size = cfg["world_size"]
            if torchrun:
                comm = f"{dist.get_backend()}, torchrun"
                cfg["device"] = (f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl"
                                 else "cpu")
                raw = run_case(dist.get_rank(), size, cfg)
            else:
                cfg["threads"] = local_threads(size)
                comm = f"gloo, local processes, {cfg['threads']} thread(s) each"
                if worlds is not None:
                    world = worlds(size)
                else:
                    if owned is not None and owned.world_size != size:
                        owned.__exit__(None, None, None)
                        owned = None
                    world = owned = owned or World(size, pg_timeout=600)
                raw = world.run(run_case, cfg, timeout=3600)[0]
            if cfg["case"] != last_case:
                cols = columns(cfg["methods"], wide)
                print_fn("\n".join(legend(cfg, size, comm, wide)))
                print_fn(header(cols))
                last_case = cfg["case"]
            r = summarize(raw)
            r.update(case=cfg["case"], src=cfg["src_text"], dst=cfg["dst_text"],
                     placement=cfg["placement"], world_size=size, seq_lens=cfg["seq_lens"])
            results.append(r)
            print_fn(format_row(r, cols))
            for m, why in r["na"].items():
                if why != "not requested" and (cfg["case"], m, why) not in explained:
                    explained.add((cfg["case"], m, why))
                    print_fn(f"#   {m}: n/a ({why})")
    finally:
        if owned is not None:
            owned.__exit__(None, None, None)
    return results


def target_report(results: list[dict[str, Any]]) -> list[str]:
    """One line per target and size, then the target's verdict line, which alone ends in PASS or
    MISS (PASS when every size passes; hpcomm.selfcheck counts these)."""
    lines = ["# targets: ratio = hpcomm time / baseline time, forward, medians from this one run",
             "# n/a: no size of this run applies to the target, or its baseline did not run"]
    for tg in PRESET_TARGETS:
        rows = [r for r in results
                if r["case"] == tg.case and r["pass"] == "fwd" and r["size"] >= tg.min_size]
        if tg.largest_only and rows:
            rows = [max(rows, key=lambda r: r["size"])]
        worst: tuple[float, int] | None = None
        missing = False
        for r in rows:
            ratio = r["ratio"].get(tg.baseline)
            if ratio is None:
                missing = True
                continue
            worst = max(worst or (ratio, r["size"]), (ratio, r["size"]))
            lines.append(f"  {tg.name:38s} {size_text(r['size']):>9}  "
                         f"hpcomm {r['time_us']['hpcomm']:8.1f} us  "
                         f"{tg.baseline:>9} {r['time_us'][tg.baseline]:8.1f} us  ratio {ratio:5.2f}x  "
                         f"({'pass' if ratio <= tg.ratio else 'miss'})")
        where = (" at the largest size" if tg.largest_only else
                 f" at sizes >= {size_text(tg.min_size)}" if tg.min_size else " at every size")
        if worst is None or missing:
            verdict = "n/a"
        else:
            verdict = (f"worst {worst[0]:.2f}x at {size_text(worst[1])}: "
                       f"{'PASS' if worst[0] <= tg.ratio else 'MISS'}")
        lines.append(f"TARGET {tg.name}: hpcomm/{tg.baseline} <= {tg.ratio:g}{where}: {verdict}")
    return lines


def transport_report(results: list[dict[str, Any]]) -> list[str]:
    """Per case, then per pass and size: which transport moves the plan's bytes faster."""
    lines = []
    rows = [r for r in results if "p2p_over_wire" in r]
    if rows:
        lines.append("# transport: wire = all_to_all_single, p2p = batch_isend_irecv, same per-peer bytes")
    case = None
    for r in rows:
        if r["case"] != case:
            case = r["case"]
            lines.append(f"  {case}")
        q = r["p2p_over_wire"]
        winner = ("tie (within 5%)" if abs(q - 1) < 0.05 else f"p2p faster by {1 / q - 1:.0%}" if q < 1
                  else f"all_to_all_single faster by {q - 1:.0%}")
        t = r["time_us"]
        lines.append(f"    {r['pass']:7s} {size_text(r['size']):>9}  wire {t['wire']:9.1f} us  "
                     f"p2p {t['wire_p2p']:9.1f} us  p2p/wire {q:5.2f}x  {winner}")
    return lines


def main(argv: Sequence[str] | None = None, worlds: Callable[[int], World] | None = None) -> int:
    """The CLI; ``worlds(n)``: an existing local World of n ranks to run on (tests share theirs
    instead of spawning new ones)."""
    args = parse_args(argv)
    try:
        cfgs = case_configs(args)
        for cfg in cfgs:  # specs that do not fit the world fail here, before any process starts
            case_layouts(cfg, cfg["world_size"])
    except ValueError as e:
        print(f"hpcomm-bench: {e}", file=sys.stderr)
        return 2
    owns_group = "RANK" in os.environ and not dist.is_initialized()
    if owns_group:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=600))
    # --json without a file: stdout carries the JSON document alone, the tables go to stderr
    out = sys.stderr if args.json == "-" else sys.stdout
    results = run_all(cfgs, worlds, args.wide, out)
    is_root = not dist.is_initialized() or dist.get_rank() == 0
    if is_root:
        report = transport_report(results)
        if args.preset == "targets":
            report += target_report(results)
        if results and not results[0]["out_arg"]:
            report.append("# note: Transform.__call__ has no out=; hpcomm allocates its output every call")
        for line in report:
            print(line, file=out)
        if args.json == "-":
            print(json.dumps(results, indent=1))
        elif args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
            print(f"wrote every row as JSON to {args.json}", file=out)
        if args.plot:
            plot(results, args.plot)
            print(f"wrote the plot to {args.plot}", file=out)
    if owns_group:
        dist.destroy_process_group()
    ok = all(all(r["verified"].values()) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
