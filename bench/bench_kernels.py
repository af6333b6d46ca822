"""GB/s of the segment-copy kernels for pack, unpack and local copy on a CPU, each beside its baselines
from the same run.

    python bench/bench_kernels.py            # full sweep, ~128 MiB per case
    python bench/bench_kernels.py --quick    # a few cases, ~32 MiB each

A case moves rows of ``row_bytes`` in runs of ``run_rows`` consecutive rows, runs in random order:
- pack:   rows of src, run by run in random order, into a contiguous buffer (a send buffer);
- unpack: a contiguous buffer into rows of dst in random order (a receive buffer);
- copy:   random rows of src to random rows of dst (a local copy).
All destinations are preallocated: a fresh 256 MiB tensor costs more in page faults than the copy.
The backend prepares each table once (hpcomm.segments: checks, prefix sums, device copies) and only
``apply`` is timed, as the execution layer calls it. GB/s counts the bytes moved once (read or
written, not both), from the best of --reps interleaved calls. Baselines, as ratios (kernel GB/s
divided by baseline GB/s): ``y.copy_(x)`` of the same bytes (the copy bandwidth), torch's
``index_select(out=)`` (pack), ``index_copy_`` (unpack) or both (copy, through a preallocated
temporary), and the pure-PyTorch reference backend, which is timed on the table's first
``REFERENCE_SEGMENTS`` segments only because it runs one Python iteration per segment.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from hpcomm import segments

MiB = 1 << 20
REFERENCE_SEGMENTS = 4096
ROW_BYTES = (64, 256, 1024, 4096, 16384, 65536)
RUN_ROWS = (1, 16, 256, 4096)
OPS = ("pack", "unpack", "copy")


@dataclass(frozen=True)
class Case:
    op: str
    row_bytes: int
    run_rows: int
    total_bytes: int


@dataclass
class Workload:
    """Buffers, the segment table and the torch index baseline of one case."""
    src: torch.Tensor
    dst: torch.Tensor
    table: torch.Tensor
    src_rows: torch.Tensor  # row indices for index_select / index_copy_ baselines
    dst_rows: torch.Tensor
    tmp: torch.Tensor
    nbytes: int


def _run_starts(num_runs: int, run_rows: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(num_runs, generator=g) * run_rows


def _rows_of(starts: torch.Tensor, run_rows: int) -> torch.Tensor:
    return (starts[:, None] + torch.arange(run_rows)).reshape(-1)


def make_workload(case: Case, seed: int = 0) -> Workload:
    """Whole runs only: the row count is rounded down to a multiple of the run length."""
    g = torch.Generator().manual_seed(seed)
    run_rows = min(case.run_rows, case.total_bytes // case.row_bytes)
    num_runs = case.total_bytes // case.row_bytes // run_rows
    num_rows = num_runs * run_rows
    rb = case.row_bytes
    src = torch.randint(0, 256, (num_rows * rb,), dtype=torch.uint8, generator=g)
    dst = torch.zeros_like(src)
    in_order = torch.arange(num_runs) * run_rows
    src_starts = in_order if case.op == "unpack" else _run_starts(num_runs, run_rows, g)
    dst_starts = in_order if case.op == "pack" else _run_starts(num_runs, run_rows, g)
    lines = torch.full((num_runs,), run_rows)
    width = torch.full((num_runs,), rb)
    table = torch.stack([src_starts * rb, dst_starts * rb, lines, width, width, width], dim=1).contiguous()
    return Workload(src, dst, table, _rows_of(src_starts, run_rows), _rows_of(dst_starts, run_rows),
                    torch.empty_like(src), num_rows * rb)


def index_baseline(case: Case, w: Workload) -> None:
    """What torch code does without hpcomm: index_select(out=) to pack, index_copy_ to unpack, both
    (through a preallocated temporary) for a local copy."""
    rb = case.row_bytes
    src2d, dst2d, tmp2d = (t.view(-1, rb) for t in (w.src, w.dst, w.tmp))
    if case.op == "pack":
        torch.index_select(src2d, 0, w.src_rows, out=dst2d)
    elif case.op == "unpack":
        dst2d.index_copy_(0, w.dst_rows, src2d)
    else:
        torch.index_select(src2d, 0, w.src_rows, out=tmp2d)
        dst2d.index_copy_(0, w.dst_rows, tmp2d)


def best_seconds(fns: dict[str, object], reps: int) -> dict[str, float]:
    """Best wall time of each fn, calls interleaved so that a burst of load elsewhere on the machine
    hits the kernel and its baselines alike; the best of several is the least disturbed."""
    best = {name: float("inf") for name in fns}
    for _ in range(reps + 1):  # the first round warms up caches, page tables and thread pools
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure(case: Case, backend_name: str, reps: int) -> dict[str, float]:
    """GB/s of the backend's apply (table prepared once) and of the baselines for one case, in one run."""
    cpu = torch.device("cpu")
    backend = segments.get_backend(backend_name, cpu)
    w = make_workload(case)
    prepared = backend.prepare(w.table, cpu)
    head = w.table[:REFERENCE_SEGMENTS]
    head_bytes = int((head[:, 2] * head[:, 3]).sum())
    backend.apply(prepared, w.src, w.dst, False)
    expected = w.dst.clone()
    index_baseline(case, w)
    if not torch.equal(w.dst, expected):
        raise AssertionError(f"{backend.name} and the index baseline disagree on {case}")
    best = best_seconds({
        "kernel": lambda: backend.apply(prepared, w.src, w.dst, False),
        "copy_": lambda: w.dst.copy_(w.src),
        "index": lambda: index_baseline(case, w),
        "reference": lambda: segments.copy_segments_reference(w.src, w.dst, head),
    }, reps)
    gbps = {name: w.nbytes / sec / 1e9 for name, sec in best.items()}
    gbps["reference"] = head_bytes / best["reference"] / 1e9
    return gbps


def cases(quick: bool) -> list[Case]:
    total = 32 * MiB if quick else 128 * MiB
    rows = (64, 1024, 65536) if quick else ROW_BYTES
    runs = (1, 4096) if quick else RUN_ROWS
    return [Case(op, rb, run, total) for op in OPS for rb in rows for run in runs
            if run == 1 or run * rb <= total // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases of 32 MiB")
    parser.add_argument("--backend", default="cpp", help="kernel backend to measure (default cpp)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    try:
        segments.get_backend(args.backend, torch.device("cpu"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}; "
          f"ratios are {args.backend} GB/s over the baseline's GB/s")
    header = (f"{'op':<7}{'row B':>7}{'run':>6}{'MiB':>6}{args.backend + ' GB/s':>11}{'copy_':>8}{'x':>6}"
              f"{'index':>8}{'x':>7}{'ref':>7}{'x':>7}")
    print(header)
    for case in cases(args.quick):
        r = measure(case, args.backend, args.reps)
        print(f"{case.op:<7}{case.row_bytes:>7}{case.run_rows:>6}{case.total_bytes // MiB:>6}{r['kernel']:>11.2f}"
              f"{r['copy_']:>8.2f}{r['kernel'] / r['copy_']:>6.2f}{r['index']:>8.2f}{r['kernel'] / r['index']:>7.2f}"
              f"{r['reference']:>7.2f}{r['kernel'] / r['reference']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
