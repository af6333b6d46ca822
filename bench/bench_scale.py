"""Scale on paper: messages, bytes and data peers of the encoder -> LLM boundary at 64, 256 and
1,024 ranks, from the plans alone (no processes, no tensors), and what planning costs.

    python bench/bench_scale.py                          # 64, 256, 1024 ranks; markdown tables (~15 s)
    python bench/bench_scale.py --image-tokens 256 1024  # both image sizes (~45 s)
    python bench/bench_scale.py --ranks 64 256 --tp-modes sp
    python bench/bench_scale.py --json out.json          # tables, and every figure as JSON
    python bench/bench_scale.py --json                   # JSON only, to stdout

The layouts (the paper's boundary)
----------------------------------
Source: a vision encoder in pure DP over its ranks, ``Layout.dp(encoder ranks, image lens)``: whole
images, contiguous (every image has the same token count, so contiguous is also balanced); its
output rows are the image tokens, image after image. Destination: the image-token rows of the
LLM's tokens, ``megatron_layout(seq_lens, tp, cp, dp, rank_offset, sequence_parallel)
.select(image_rows)`` (Megatron's default rank order: TP fastest, then CP, then DP; THD packing,
every sample cut zigzag over CP, samples handed to DP groups contiguously): exactly the
trainer's ``Transform(encoder, llm.select(image_rows))`` (see hpcomm/advisor/boundary.py).

- LLM: CP=8 (zigzag) x TP=8 (one node: TP stays on NVLink) x DP = the rest. Two TP modes:
  ``sp`` (sequence parallel: each CP rank's rows split over its 8 TP ranks, a partition) and
  ``replicate`` (TP without SP: the 8 TP ranks of a CP rank hold the same rows).
- colocated: the encoder runs on all N ranks, the LLM on the same N ranks (CP x TP x DP = N).
- non-colocated: the encoder on the first quarter of the ranks (0 .. N/4-1), the LLM on the other
  3N/4 (rank_offset N/4). Where CP x TP = 64 does not divide the LLM's ranks, CP is halved until
  it does (TP stays one node): at N=64 the 48 LLM ranks are CP=2 x TP=8 x DP=3; at 256 and 1,024
  CP=8 x TP=8 x DP=3 and 12. The table prints the LLM grid of every row.

Workload (one call = one global micro-batch; seeded, so every run plans the same thing)
------------------------------------------------------------------------------------
- The global batch holds ``images_per_rank`` x N images (default 4 per GPU of the job: 256, 1,024
  and 4,096 images), the same for both placements at a given N (the non-colocated encoder then
  runs 16 images per GPU on its quarter of the ranks).
- Each image is ``image_tokens`` LLM rows (default 256: a 448 px tile of 1,024 ViT-14 patches
  after the usual 2x2 pixel-shuffle merge, InternVL / Qwen2-VL style; ``--image-tokens 1024``
  without the merge), hidden 4096 in bf16: 8 KiB a row, 2 MiB an image (8 MiB at 1024 tokens).
- Samples are interleaved image-text documents: 1 to 8 images each (uniform, mean 4.5), text
  spans of 16 to 511 tokens before, between and after the images (mean ~1,450 text tokens a
  sample). Their image rows are the LLM rows ``Layout.select`` picks, in order of appearance,
  which is the encoder's row order. At N=1,024: ~910 samples, ~2.4 M LLM tokens (~2.3 k per
  rank colocated, with SP), ~1 M image rows = 8 GiB of embeddings.

Counting rule (the library's new header protocol)
-------------------------------------------------
Per call and direction, each rank exchanges one 128-byte header with every *data peer* (a rank it
sends rows to or receives rows from in that direction: both get a header, both ways), and sends
one payload message to every *send peer*. So per rank: messages sent = data peers + send peers
= 2 x send peers + 1 x receive-only peers; payload bytes = rows x hidden x 2 (``RankPlan.stats``
counts rows here: neither layout splits columns). Local copies (a colocated rank that holds a row
in both layouts) are free. The job total per call is the sum over ranks; the old protocol
exchanged a header between every pair of the transform's k ranks (k = ranks in either layout):
k(k-1) headers + the same payloads (the old protocol could also carry a repeated call's small
payload inside its header, or send a big one in pieces: neither changes the k(k-1) term, which is
what grows; the new protocol, hpcomm/protocol.py, sends headers and payloads as separate messages).

Backward: the gradient plan of ``grad="replicated"`` (the Transform default,
``hpcomm.engine.grad_plan``): ``Plan(llm_image_rows, encoder, fill_missing=True)``, each encoder
row reading its gradient from one LLM holder (its own when it holds one).

Columns: max and mean are over the k ranks of the transform (ranks with no traffic count as 0 in
the mean). Planning: ``sweep``: CPU time (``time.process_time``; wall time means little on a
shared machine) to build every rank's part in this one process: a fresh plan on fresh layouts
(built before the clock starts), holder indices and the coverage check included, and that total
over the k ranks; ``cold``: what one rank pays once per layout pair in a real job (fresh layouts
built, then the plan and its own part, as bench/bench_planning.py times it), the max (median) over
a few sampled ranks (the first, the busiest by messages, the last); ``layouts``: building both
layouts from the sample lengths (part of ``cold``). ``cold`` is far above the sweep's per-rank
mean because one-time work that reads every rank's runs (the plan's coverage check walks the
selected LLM layout's runs of all k ranks) dominates it; the sweep pays that once for all ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from hpcomm import Layout, megatron_layout
from hpcomm.engine import grad_plan
from hpcomm.plan import Plan, RankPlan

HEADER_BYTES = 128  # one header message (hpcomm.comm.HEADER_BYTES)
MiB = 1 << 20


@dataclass(frozen=True)
class Workload:
    """One global micro-batch: LLM samples (THD-packed token counts), the LLM rows of their image
    tokens in order of appearance, and every image's token count (the encoder's samples)."""

    seq_lens: tuple[int, ...]
    image_rows: np.ndarray
    image_lens: tuple[int, ...]


def make_workload(num_images: int, image_tokens: int = 256, seed: int = 0) -> Workload:
    """Interleaved image-text samples holding ``num_images`` images in all (see the docstring)."""
    rng = np.random.default_rng(seed)
    seq_lens: list[int] = []
    rows: list[np.ndarray] = []
    offset, left = 0, num_images
    while left > 0:
        n = min(int(rng.integers(1, 9)), left)
        text = rng.integers(16, 512, n + 1)
        pos = offset + int(text[0])
        for i in range(n):
            rows.append(np.arange(pos, pos + image_tokens, dtype=np.int64))
            pos += image_tokens + int(text[i + 1])
        seq_lens.append(pos - offset)
        offset, left = pos, left - n
    image_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return Workload(tuple(seq_lens), image_rows, (image_tokens,) * num_images)


@dataclass(frozen=True)
class Config:
    """One boundary: N ranks, placement, TP mode and the LLM grid (CP x TP x DP, at llm_offset)."""

    ranks: int
    placement: str  # "colocated" | "noncolocated"
    tp_mode: str  # "sp" | "replicate"
    cp: int
    tp: int
    dp: int
    encoder_ranks: int
    llm_offset: int

    @property
    def name(self) -> str:
        return f"{self.ranks} {self.placement} {self.tp_mode}"


def llm_grid(llm_ranks: int, cp: int, tp: int) -> tuple[int, int, int]:
    """(cp, tp, dp) filling ``llm_ranks``: CP halved (then TP) until cp * tp divides them."""
    while llm_ranks % (cp * tp) and cp > 1:
        cp //= 2
    while llm_ranks % (cp * tp) and tp > 1:
        tp //= 2
    return cp, tp, llm_ranks // (cp * tp)


def make_config(ranks: int, placement: str, tp_mode: str, cp: int = 8, tp: int = 8,
                encoder_fraction: float = 0.25) -> Config:
    if placement == "colocated":
        enc, off, llm = ranks, 0, ranks
    elif placement == "noncolocated":
        enc = max(1, int(round(ranks * encoder_fraction)))
        off, llm = enc, ranks - enc
        if llm < 1:
            raise ValueError(f"non-colocated over {ranks} ranks leaves the LLM no rank")
    else:
        raise ValueError(f"unknown placement {placement!r}")
    c, t, d = llm_grid(llm, cp, tp)
    return Config(ranks, placement, tp_mode, c, t, d, enc, off)


def build_layouts(cfg: Config, wl: Workload) -> tuple[Layout, Layout]:
    """(encoder, LLM image rows): the boundary's source and destination, built fresh."""
    src = Layout.dp(range(cfg.encoder_ranks), wl.image_lens, "contiguous")
    llm = megatron_layout(list(wl.seq_lens), tp=cfg.tp, cp=cfg.cp, dp=cfg.dp, rank_offset=cfg.llm_offset,
                          sequence_parallel=cfg.tp_mode == "sp", cp_mode="zigzag", dp_assign="contiguous")
    return src, llm.select(wl.image_rows)


def transform_ranks(src: Layout, dst: Layout) -> list[int]:
    return sorted(set(src.ranks) | set(dst.ranks))


def forward_plan(src: Layout, dst: Layout) -> Plan:
    return Plan(src, dst)


def backward_plan(src: Layout, dst: Layout) -> Plan:
    """The gradient plan of grad="replicated" (the Transform default)."""
    plan = grad_plan(src, dst, "replicated")
    assert plan is not None
    return plan


# ---------------------------------------------------------------------------------------------------
# counting


def rank_counts(rp: RankPlan, row_bytes: int) -> dict[str, int]:
    """One rank's figures for one call and direction under the new protocol."""
    send_peers = {p for p, s in rp.sends if len(s)}
    recv_peers = {p for p, s in rp.recvs if len(s)}
    data_peers = send_peers | recv_peers
    st = rp.stats()
    return {"send_peers": len(send_peers), "recv_peers": len(recv_peers), "data_peers": len(data_peers),
            "msgs_sent": len(data_peers) + len(send_peers),  # = 2 x send + 1 x receive-only peers
            "msgs_received": len(data_peers) + len(recv_peers),
            "bytes_sent": st["sent"] * row_bytes, "bytes_received": st["received"] * row_bytes,
            "header_bytes_sent": HEADER_BYTES * len(data_peers)}


def direction_stats(plans: dict[int, RankPlan], row_bytes: int) -> dict[str, object]:
    """Max / mean over the transform's ranks, the busiest rank, and the job's message totals."""
    ranks = sorted(plans)
    per = {r: rank_counts(plans[r], row_bytes) for r in ranks}
    k = len(ranks)
    out: dict[str, object] = {"k": k}
    for key in ("data_peers", "send_peers", "recv_peers", "msgs_sent", "msgs_received", "bytes_sent",
                "bytes_received", "header_bytes_sent"):
        vals = np.array([per[r][key] for r in ranks], np.int64)
        out[f"{key}_max"] = int(vals.max(initial=0))
        out[f"{key}_mean"] = float(vals.mean()) if k else 0.0
    payloads = sum(per[r]["send_peers"] for r in ranks)
    headers = sum(per[r]["data_peers"] for r in ranks)
    crosses = payloads > 0
    out["job_payload_msgs"] = payloads
    out["job_header_msgs"] = headers
    out["job_msgs"] = headers + payloads
    out["job_msgs_old"] = (k * (k - 1) if crosses else 0) + payloads  # all-pairs headers + payloads
    out["job_bytes"] = sum(per[r]["bytes_sent"] for r in ranks)
    out["busiest_rank"] = max(ranks, key=lambda r: (per[r]["msgs_sent"], per[r]["bytes_sent"], r))
    return out


def sweep(build: Callable[[], tuple[Layout, Layout]], make_plan: Callable[[Layout, Layout], Plan]
          ) -> tuple[dict[int, RankPlan], float]:
    """Every rank's part of a fresh plan on fresh layouts, and the CPU seconds the plan took."""
    src, dst = build()
    t0 = time.process_time()
    plan = make_plan(src, dst)
    plans = {r: plan.rank_plan(r) for r in transform_ranks(src, dst)}
    return plans, time.process_time() - t0


def cold(build: Callable[[], tuple[Layout, Layout]], make_plan: Callable[[Layout, Layout], Plan],
         rank: int) -> tuple[float, float]:
    """(layouts, layouts + plan + this rank's part) CPU seconds, from nothing cached."""
    t0 = time.process_time()
    src, dst = build()
    t1 = time.process_time()
    make_plan(src, dst).rank_plan(rank)
    return t1 - t0, time.process_time() - t0


def measure(cfg: Config, wl: Workload, hidden: int = 4096, itemsize: int = 2,
            cold_ranks: int = 3) -> dict[str, object]:
    """Every figure of one configuration, forward and backward."""
    row_bytes = hidden * itemsize
    build = lambda: build_layouts(cfg, wl)  # noqa: E731
    result: dict[str, object] = {**asdict(cfg), "images": len(wl.image_lens), "samples": len(wl.seq_lens),
                                 "llm_rows": int(sum(wl.seq_lens)), "image_rows": int(len(wl.image_rows)),
                                 "row_bytes": row_bytes}
    for direction, make_plan in (("fwd", forward_plan), ("bwd", backward_plan)):
        plans, seconds = sweep(build, make_plan)
        stats = direction_stats(plans, row_bytes)
        ranks = sorted(plans)
        sample = list(dict.fromkeys([ranks[0], int(stats["busiest_rank"]), ranks[-1]]))[:max(cold_ranks, 1)]  # type: ignore[call-overload]
        colds = [cold(build, make_plan, r) for r in sample]
        stats.update({"sweep_s": seconds, "sweep_ms_per_rank": seconds * 1e3 / len(ranks),
                      "cold_ms_max": max(c for _, c in colds) * 1e3,
                      "cold_ms_median": float(np.median([c for _, c in colds])) * 1e3,
                      "layouts_ms": max(lay for lay, _ in colds) * 1e3, "cold_ranks": sample})
        result[direction] = stats
    return result


def run(sizes: Sequence[int], image_tokens: Sequence[int] = (256,), images_per_rank: int = 4, hidden: int = 4096,
        cp: int = 8, tp: int = 8, encoder_fraction: float = 0.25,
        placements: Sequence[str] = ("colocated", "noncolocated"), tp_modes: Sequence[str] = ("sp", "replicate"),
        seed: int = 0, cold_ranks: int = 3, progress: Callable[[str], None] | None = None
        ) -> list[dict[str, object]]:
    results = []
    for tokens in image_tokens:
        for n in sizes:
            wl = make_workload(images_per_rank * n, tokens, seed)
            for placement in placements:
                for tp_mode in tp_modes:
                    cfg = make_config(n, placement, tp_mode, cp, tp, encoder_fraction)
                    t0 = time.perf_counter()
                    results.append({"image_tokens": tokens, **measure(cfg, wl, hidden, cold_ranks=cold_ranks)})
                    if progress:
                        progress(f"{cfg.name}, {tokens} tokens an image: {time.perf_counter() - t0:.1f} s")
    return results


# ---------------------------------------------------------------------------------------------------
# output


def _mib(b: float) -> str:
    return f"{b / MiB:.1f}"


def markdown(results: Sequence[dict[str, object]]) -> str:
    lines = [
        "| ranks | img tok | placement | LLM tp | LLM grid (cp x tp x dp) @offset | dir | data peers max / mean | "
        "msgs sent max / mean | payload MiB sent max / mean | MiB recv max / mean | "
        "job msgs (new) | job msgs (old: k(k-1) hdrs + payloads) | new / old |",
        "|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        grid = f"{r['cp']} x {r['tp']} x {r['dp']} @{r['llm_offset']}"
        for d in ("fwd", "bwd"):
            s = r[d]
            assert isinstance(s, dict)
            ratio = s["job_msgs"] / s["job_msgs_old"] if s["job_msgs_old"] else float("nan")
            lines.append(
                f"| {r['ranks']} | {r['image_tokens']} | {r['placement']} | {r['tp_mode']} | {grid} | {d} | "
                f"{s['data_peers_max']} / {s['data_peers_mean']:.1f} | "
                f"{s['msgs_sent_max']} / {s['msgs_sent_mean']:.1f} | "
                f"{_mib(s['bytes_sent_max'])} / {_mib(s['bytes_sent_mean'])} | "
                f"{_mib(s['bytes_received_max'])} / {_mib(s['bytes_received_mean'])} | "
                f"{s['job_msgs']:,} | {s['job_msgs_old']:,} | {ratio:.3f} |")
    lines += ["", "Planning (CPU time of this process):", "",
              "| ranks | img tok | placement | LLM tp | image rows | fwd sweep s (ms/rank) | bwd sweep s (ms/rank) | "
              "fwd cold ms max (median) | bwd cold ms max (median) | layouts ms |",
              "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        f, b = r["fwd"], r["bwd"]
        assert isinstance(f, dict) and isinstance(b, dict)
        lines.append(
            f"| {r['ranks']} | {r['image_tokens']} | {r['placement']} | {r['tp_mode']} | {r['image_rows']:,} | "
            f"{f['sweep_s']:.2f} ({f['sweep_ms_per_rank']:.1f}) | {b['sweep_s']:.2f} ({b['sweep_ms_per_rank']:.1f}) | "
            f"{f['cold_ms_max']:.0f} ({f['cold_ms_median']:.0f}) | {b['cold_ms_max']:.0f} ({b['cold_ms_median']:.0f}) | "
            f"{max(f['layouts_ms'], b['layouts_ms']):.0f} |")
    return "\n".join(lines)


def _jsonable(o: object) -> object:
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    return o


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[256],
                        help="LLM rows per image (several: one workload each)")
    parser.add_argument("--images-per-rank", type=int, default=4, help="global images = this x ranks")
    parser.add_argument("--hidden", type=int, default=4096, help="row width (bf16 elements)")
    parser.add_argument("--cp", type=int, default=8)
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--encoder-fraction", type=float, default=0.25,
                        help="non-colocated: share of the ranks (the first ones) the encoder runs on")
    parser.add_argument("--placements", nargs="+", default=["colocated", "noncolocated"],
                        choices=["colocated", "noncolocated"])
    parser.add_argument("--tp-modes", nargs="+", default=["sp", "replicate"], choices=["sp", "replicate"])
    parser.add_argument("--cold-ranks", type=int, default=3, help="ranks timed cold per direction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write every figure as JSON to PATH (no PATH: JSON only, to stdout)")
    args = parser.parse_args(argv)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    results = run(args.ranks, args.image_tokens, args.images_per_rank, args.hidden, args.cp, args.tp,
                  args.encoder_fraction, args.placements, args.tp_modes, args.seed, args.cold_ranks,
                  progress=lambda m: print(m, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    payload = {"started": started, "elapsed_s": elapsed, "args": vars(args), "results": _jsonable(results)}
    if args.json == "-":
        print(json.dumps(payload, indent=1))
        return 0
    print(f"# hpcomm boundary at scale, on paper ({started}; {elapsed:.0f} s wall)\n")
    print(f"encoder: pure DP over its ranks, {args.images_per_rank} images per job rank of "
          f"{' or '.join(map(str, args.image_tokens))} rows each; LLM: megatron_layout (tp-cp-dp order, zigzag CP, THD) .select(image rows); rows "
          f"{args.hidden} x bf16 = {args.hidden * 2} B; one call = one global micro-batch; backward = "
          f"grad='replicated'. Messages: a {HEADER_BYTES} B header to every data peer + a payload to "
          f"every send peer (new protocol); old: k(k-1) headers + the same payloads.\n")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
