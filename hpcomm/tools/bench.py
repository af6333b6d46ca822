"""hpcomm-bench: time a Transform between any two layouts beside the baselines a user would write.

    hpcomm-bench --src "cp=4,cp_mode=zigzag" --dst "cp=4,cp_mode=contiguous"   # 4 local gloo ranks
    hpcomm-bench --src "dp=4,dp_assign=balanced" --dst "cp=2,tp=2" --sweep --backward --plot bw.png
    hpcomm-bench --src "dp=2" --dst "cp=2" --placement noncolocated --json out.json
    hpcomm-bench --preset targets                     # the issue's CPU targets, PASS/MISS per target
    torchrun --nproc-per-node 8 -m hpcomm.tools.bench --src "dp=8" --dst "cp=4,tp=2"  # NCCL on GPUs

A layout spec is comma-separated key=value pairs: ``dp``, ``cp``, ``tp`` degrees (a Layout.grid in
Megatron order, TP fastest) with ``cp_mode`` (zigzag | contiguous), ``tp_mode`` (sp | replicate |
hidden) and ``dp_assign`` (contiguous | round_robin | balanced); or ``rows=K``, a flat split of the
rows over K ranks (Layout.contiguous). The global tensor is [rows, hidden]; rows are THD-packed
sequences (``--seq-lens``, or ``--num-seqs`` ragged lengths summing to ``--rows``, drawn from a
seeded log-normal so every run and every rank gets the same lengths).

Methods, each verified once against hpcomm's output (and hpcomm against slicing the global tensor)
before anything is timed:
- hpcomm: ``Transform(src, dst)(x)`` (into a preallocated output when the engine accepts ``out=``);
- a2a: per-destination index lists, ``index_select`` into a send buffer, ``all_to_all_single`` with
  split sizes, ``index_copy_`` into the output (every source row served by the same replica hpcomm
  picks, so both move the same bytes);
- allgather: ``all_gather`` of every rank's shard padded to the largest, then index the local rows;
- dtensor: ``DTensor.redistribute`` when both layouts are placements on one 1-D mesh over the
  world (Shard(0) with torch.chunk sizes, Shard(1) of the hidden dim, Replicate), n/a otherwise;
- wire (a reference, not a transform): ``all_to_all_single`` of exactly the bytes hpcomm's plan
  sends to each peer, preallocated, no pack or unpack: what the transport alone costs, so
  hp/wire shows what hpcomm spends beyond moving its bytes.
Baselines keep every buffer preallocated across iterations (the best a careful user does); index
lists are built once, untimed, as hpcomm's plan is.

Timing: ``--warmup`` rounds, then ``--iters`` rounds; in each round every method runs once
(interleaved, so drift hits all alike) after a barrier, and an iteration's time is the max over
ranks; the table shows the median. nccl-tests units: size is the bytes of the logical global
tensor, algbw = size / time, busbw = algbw * f with f = (most bytes any rank sends or receives
off-rank, from the plan) / size, stated per row. ``hp/X`` = hpcomm time / X time (< 1: hpcomm
faster).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hpcomm.tools.launch import World
from hpcomm.layout import Layout
from hpcomm.transform import Transform

if TYPE_CHECKING:
    from torch.distributed.tensor import Placement

METHODS = ("hpcomm", "a2a", "allgather", "dtensor", "wire")
BASELINES = ("a2a", "allgather", "dtensor")  # compute the transform; verified against hpcomm
COMPARED = METHODS[1:]  # every method shown as a ratio beside hpcomm
LABEL = {"a2a": "a2a", "allgather": "ag", "dtensor": "dt", "wire": "wire"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
GRID_KEYS = {"dp", "cp", "tp", "cp_mode", "tp_mode", "dp_assign"}
INT_KEYS = {"dp", "cp", "tp", "rows"}
TARGETS = (  # (name, src, dst, baseline, target ratio hpcomm / baseline)
    ("CP zigzag -> CP contiguous", "cp=4,cp_mode=zigzag", "cp=4,cp_mode=contiguous", "a2a", 1.1),
    ("DP balanced -> CP zigzag", "dp=4,dp_assign=balanced", "cp=4,cp_mode=zigzag", "allgather", 0.5),
    ("rows split -> hidden split", "rows=4", "tp=4,tp_mode=hidden", "dtensor", 1.0),
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


def case_ranks(placement: str, world_size: int) -> tuple[list[int], list[int]]:
    ranks = list(range(world_size))
    if placement == "colocated":
        return ranks, ranks
    half = world_size // 2
    if half == 0 or world_size % 2:
        raise ValueError(f"noncolocated placement needs an even world size, got {world_size}")
    return ranks[:half], ranks[half:]


def case_layouts(cfg: dict[str, Any], world_size: int) -> tuple[Layout, Layout]:
    src_ranks, dst_ranks = case_ranks(cfg["placement"], world_size)
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


class Wire:
    """all_to_all_single of the element counts hpcomm's plan sends and receives per peer."""

    def __init__(self, t: Transform, rank: int, world_size: int, x: torch.Tensor, hidden: int) -> None:
        plan = t.plan.rank_plan(rank)
        unit = 1 if t.plan.col_mode else hidden
        self.send_splits, self.recv_splits = [0] * world_size, [0] * world_size
        for peer, seg in plan.sends:
            self.send_splits[peer] = seg.units() * unit
        for peer, seg in plan.recvs:
            self.recv_splits[peer] = seg.units() * unit
        self.send_buf = x.new_zeros(sum(self.send_splits))
        self.recv_buf = x.new_zeros(sum(self.recv_splits))

    def forward(self) -> None:
        dist.all_to_all_single(self.recv_buf, self.send_buf, self.recv_splits, self.send_splits)

    def forward_backward(self) -> None:
        self.forward()
        dist.all_to_all_single(self.send_buf, self.recv_buf, self.send_splits, self.recv_splits)


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


def summed_gradient(dst: Layout, gy_global: torch.Tensor, hidden: int) -> torch.Tensor:
    """The gradient of X under hpcomm's default convention: every destination holder's gradient
    of an element, summed (each source replica then receives all of it)."""
    total = torch.zeros_like(gy_global)
    for d in dst.ranks:
        c0, c1 = local_cols(dst, d, hidden)
        total[:, c0:c1].index_add_(0, dst.rows(d).to(total.device), dst.shard(gy_global, d))
    return total


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
        return [m for m in METHODS if m in self.runners and self.verified.get(m, m == "wire")]


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
    # while hpcomm's default ("sum") gives every replica the full gradient: not the same function
    replicated_src = replicated(src, hidden)
    for name, cls in (("a2a", A2A), ("allgather", AllGather)):
        if name not in cfg["methods"]:
            continue
        if not full_width:
            reason[name] = "source splits the hidden dim"
            continue
        if backward and replicated_src:
            reason[name] = "replicated source: gradient convention differs"
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
        elif backward and replicated(dst, hidden):
            # DTensor takes a Replicate gradient as one copy of identical replicas, i.e. hpcomm's
            # grad="mean", not the default "sum" timed here
            reason["dtensor"] = "replicated destination: gradient convention differs"
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

    if "wire" in cfg["methods"]:
        wire = Wire(t, rank, world_size, x, hidden)
        runners["wire"] = wire.forward_backward if backward else wire.forward

    # verify once: hpcomm against slicing the global tensor, each baseline against hpcomm
    with torch.no_grad():
        y_ref = (t(x, out=torch.empty_like(expected)) if takes_out else t(x)).clone()
    ok = torch.equal(y_ref, expected)
    ref = y_ref
    if backward:
        ref = runners["hpcomm"]().clone()
        ok &= _same(ref, local_tensor(src, summed_gradient(dst, gy_global, hidden), rank), False)
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


def time_once(p: Prepared, method: str) -> float:
    """Seconds of one call on this rank, started right after a barrier."""
    dist.barrier()
    _sync(p.device)
    start = time.perf_counter()
    p.runners[method]()
    _sync(p.device)
    return time.perf_counter() - start


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
            times[m].append(time_once(p, m))
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


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Add algbw, busbw, f and the ratios hpcomm time / baseline time."""
    t = result["time_us"]
    size = result["size"]
    result["busbw_factor"] = result["max_wire_bytes"] / size
    result["algbw_GBps"] = {m: size / (us * 1e3) for m, us in t.items()}
    result["busbw_GBps"] = {m: bw * result["busbw_factor"] for m, bw in result["algbw_GBps"].items()}
    result["ratio"] = {m: t["hpcomm"] / t[m] for m in COMPARED if m in t and "hpcomm" in t}
    return result


COLUMNS = (("size(B)", 12), ("count", 10), ("rows", 8), ("pass", 7), ("time(us)", 10),
           ("algbw", 7), ("busbw", 7), ("f", 5)) + tuple(
    c for m in COMPARED for c in ((f"{LABEL[m]}(us)", 10), (f"hp/{LABEL[m]}", 7))) + (
    ("verified", 9),)


def header() -> str:
    return " ".join(name.rjust(width) for name, width in COLUMNS)


def format_row(r: dict[str, Any]) -> str:
    t = r["time_us"]
    hp = t.get("hpcomm")
    cells = [r["size"], r["count"], r["rows"], r["pass"],
             f"{hp:.1f}" if hp else "FAIL", f"{r['algbw_GBps'].get('hpcomm', 0):.2f}",
             f"{r['busbw_GBps'].get('hpcomm', 0):.2f}", f"{r['busbw_factor']:.2f}"]
    for m in COMPARED:
        if m in r["na"]:
            cells += ["n/a", "n/a"]
        elif not r["verified"].get(m, m == "wire"):
            cells += ["WRONG", "-"]
        else:
            cells += [f"{t[m]:.1f}", f"{r['ratio'][m]:.2f}x" if m in r["ratio"] else "-"]
    bad = [m for m, ok in r["verified"].items() if not ok]
    cells.append("FAIL:" + "/".join(bad) if bad else "ok")
    return " ".join(str(c).rjust(w) for c, (_, w) in zip(cells, COLUMNS))


def legend(cfg: dict[str, Any], world_size: int, backend: str) -> list[str]:
    lens = cfg["seq_lens"]
    shown = ",".join(map(str, lens[:8])) + (",..." if len(lens) > 8 else "")
    return [
        f"# src {cfg['src_text']!r} -> dst {cfg['dst_text']!r}, {cfg['placement']}, {world_size} "
        f"ranks ({backend}), {cfg['dtype']} [rows, {cfg['hidden']}], {len(lens)} seqs ({shown})",
        f"# median of {cfg['iters']} iterations after {cfg['warmup']} warmup, barrier before each, "
        f"max over ranks; size = bytes of the global tensor; algbw = size / time (GB/s);",
        "# busbw = algbw * f, f = most bytes one rank sends or receives off-rank / size; "
        "hp/X = hpcomm time / X time",
    ]


def plot(results: list[dict[str, Any]], path: str) -> None:
    """algbw vs size, one panel per case, one line per method (dashed: forward+backward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for pas in ("fwd", "fwd+bwd"):
            rows = [r for r in results if r["case"] == case and r["pass"] == pas]
            for color, m in enumerate(METHODS):
                pts = sorted((r["size"], r["algbw_GBps"][m]) for r in rows if m in r["algbw_GBps"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{m} {pas}", color=f"C{color}",
                            linestyle="--" if pas == "fwd+bwd" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size of the global tensor (bytes)")
        ax.set_ylabel("algbw (GB/s) = size / time")
        ax.set_title(case, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
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
                   help="noncolocated: source on the first half of the ranks, destination on the rest")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths (overrides --rows/--num-seqs)")
    p.add_argument("--rows", type=int, default=65536, help="total rows (largest size with --sweep)")
    p.add_argument("--num-seqs", type=int, default=16, help="ragged sequences per size")
    p.add_argument("--seed", type=int, default=0, help="seed of the ragged lengths and the data")
    p.add_argument("--hidden", type=int, default=256, help="elements per row (last dim)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--sweep", action="store_true", help="sizes from --min-rows doubling to --rows")
    p.add_argument("--min-rows", type=int, default=1024)
    p.add_argument("--nproc", type=int, default=4, help="local gloo ranks (ignored under torchrun)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--backend", default="auto", help="hpcomm kernel backend")
    p.add_argument("--json", help="write every row to this file")
    p.add_argument("--plot", help="write algbw vs size (PNG) to this file")
    p.add_argument("--preset", choices=("targets",), help="the issue's three CPU targets; fixes 4 "
                   "ranks, colocated, 64 Ki rows of fp32 x 256 (1 KiB), each case against its "
                   "target baseline and wire, and prints PASS/MISS per target (--num-seqs, --iters, "
                   "--warmup, --backward, --json, --plot still apply)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown or "hpcomm" not in methods:
        p.error(f"--methods must include hpcomm and only name {', '.join(METHODS)}; got {args.methods}")
    args.methods = methods
    if args.sweep and args.seq_lens:
        p.error("--sweep draws lengths per size from --rows/--num-seqs; drop --seq-lens")
    return args


def case_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One config per (case, size, pass)."""
    if args.preset == "targets":
        cases = [(name, src, dst, [base, "wire"]) for name, src, dst, base, _ in TARGETS]
    else:
        cases = [(f"{args.src} -> {args.dst}", args.src, args.dst, args.methods)]
    if args.seq_lens:
        sizes = [[int(v) for v in args.seq_lens.split(",")]]
    else:
        rows = [args.rows]
        if args.sweep:
            rows = [r for r in (args.min_rows << k for k in range(64)) if r < args.rows] + rows
        sizes = [ragged_lens(n, args.num_seqs, args.seed) for n in rows]
    passes = [False, True] if args.backward else [False]
    out = []
    for name, src, dst, methods in cases:
        for lens in sizes:
            for backward in passes:
                out.append({"case": name, "src_text": src, "dst_text": dst, "src": parse_spec(src),
                            "dst": parse_spec(dst), "placement": args.placement, "seq_lens": lens,
                            "hidden": args.hidden, "dtype": args.dtype, "warmup": args.warmup,
                            "iters": args.iters, "backward": backward, "seed": args.seed,
                            "methods": ["hpcomm"] + [m for m in methods if m != "hpcomm"],
                            "backend": args.backend})
    return out


def local_threads(world_size: int) -> int:
    """Threads per rank of a local world. Its workers import torch before World can set
    OMP_NUM_THREADS, so each would run as many threads as there are cores; oversubscribed, pack and
    index_select run ~10x slower. Share the cores out, as torchrun's OMP_NUM_THREADS=1 does."""
    return max(1, (os.cpu_count() or 1) // world_size)


def run_all(cfgs: list[dict[str, Any]], world_size: int, world: World | None = None) -> list[dict[str, Any]]:
    """Every case on the torchrun world (RANK set), on ``world``, or on a fresh local gloo world
    that is closed afterwards; rows in order."""
    if "RANK" in os.environ:
        rank = dist.get_rank()
        comm = f"{dist.get_backend()}, torchrun"
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        for cfg in cfgs:
            cfg["device"] = device
        run = lambda cfg: run_case(rank, world_size, cfg)  # noqa: E731
        print_fn = print if rank == 0 else (lambda *a, **k: None)
        world = owned = None
    else:
        threads = local_threads(world_size)
        for cfg in cfgs:
            cfg["threads"] = threads
        comm, print_fn = f"gloo, local processes, {threads} thread(s) each", print
        owned = None if world is not None else World(world_size, pg_timeout=600)
        world = world or owned
        run = lambda cfg: world.run(run_case, cfg, timeout=3600)[0]  # type: ignore[union-attr]  # noqa: E731
    results, last_case, explained = [], None, set()
    try:
        for cfg in cfgs:
            if cfg["case"] != last_case:
                print_fn("\n".join(legend(cfg, world_size, comm)))
                print_fn(header())
                last_case = cfg["case"]
            r = summarize(run(cfg))
            r.update(case=cfg["case"], src=cfg["src_text"], dst=cfg["dst_text"],
                     placement=cfg["placement"], world_size=world_size, seq_lens=cfg["seq_lens"])
            results.append(r)
            print_fn(format_row(r))
            sys.stdout.flush()
            for m, why in r["na"].items():
                if why != "not requested" and (cfg["case"], m, why) not in explained:
                    explained.add((cfg["case"], m, why))
                    print_fn(f"#   {m}: n/a ({why})")
    finally:
        if owned is not None:
            owned.__exit__(None, None, None)
    return results


def target_report(results: list[dict[str, Any]]) -> list[str]:
    lines = ["# targets (ratio = hpcomm time / baseline time, forward)"]
    for name, _, _, base, target in TARGETS:
        rows = [r for r in results if r["case"] == name and r["pass"] == "fwd"]
        for r in rows:
            ratio = r["ratio"].get(base)
            verdict = "n/a" if ratio is None else ("PASS" if ratio <= target else "MISS")
            shown = "-" if ratio is None else f"{ratio:.2f}x"
            lines.append(f"{name:28s} vs {base:9s} hpcomm {r['time_us'].get('hpcomm', 0):9.1f} us  "
                         f"{base} {r['time_us'].get(base, float('nan')):9.1f} us  ratio {shown:>6s}"
                         f"  target <= {target:.1f}x  {verdict}")
    return lines


def main(argv: Sequence[str] | None = None, world: World | None = None) -> int:
    """The CLI; ``world``: an existing local World of ``--nproc`` ranks to run on (tests share
    one instead of spawning their own)."""
    args = parse_args(argv)
    if args.preset == "targets":
        args.rows, args.hidden, args.dtype, args.placement = 65536, 256, "float32", "colocated"
    world_size = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else (
        4 if args.preset else args.nproc)
    try:
        cfgs = case_configs(args)
        for cfg in cfgs:  # specs that do not fit the world fail here, before any process starts
            case_layouts(cfg, world_size)
    except ValueError as e:
        print(f"hpcomm-bench: {e}", file=sys.stderr)
        return 2
    owns_group = "RANK" in os.environ and not dist.is_initialized()
    if owns_group:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=600))
    results = run_all(cfgs, world_size, world)
    is_root = not dist.is_initialized() or dist.get_rank() == 0
    if is_root:
        if args.preset == "targets":
            print("\n".join(target_report(results)))
        if results and not results[0]["out_arg"]:
            print("# note: Transform.__call__ has no out=; hpcomm allocates its output every call")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        if args.plot:
            plot(results, args.plot)
    if owns_group:
        dist.destroy_process_group()
    ok = all(all(r["verified"].values()) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
