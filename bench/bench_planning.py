"""Per-rank planning time and plan size at scale (no process group: plans are pure data).

    python bench/bench_planning.py [--ranks 1024] [--rows 1048576] [--seqs 4096]

Each rank builds only its own part of the plan, so the figure is what one process pays once per
layout pair (the plan is cached afterwards): building both layouts from the sequence lengths, then
its rank plan. ``crosses`` is ``Plan.crosses_wire()`` on a fresh plan of the same layouts.
"""

import argparse
import statistics
import time

import numpy as np

from hpcomm import Layout
from hpcomm.plan import Plan


def ragged(total: int, count: int, seed: int = 0) -> list[int]:
    weights = np.random.default_rng(seed).lognormal(0, 1.5, count)
    lens = np.maximum(1, (weights / weights.sum() * total).astype(int))
    lens[-1] += total - lens.sum()
    return lens.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--seqs", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=7, help="cold runs per figure (median shown)")
    args = parser.parse_args()
    lens = ragged(args.rows, args.seqs)
    k = args.ranks
    pairs = {
        "cp zigzag -> cp contiguous": lambda: (Layout.cp(range(k), lens, "zigzag"),
                                               Layout.cp(range(k), lens, "contiguous")),
        "dp balanced -> cp zigzag": lambda: (Layout.dp(range(k), lens, "balanced"),
                                             Layout.cp(range(k), lens, "zigzag")),
        # a Megatron LLM grid (tp fastest, sequence parallel) fed by a balanced DP encoder
        "dp balanced -> grid": lambda: (Layout.dp(range(k), lens, "balanced"),
                                        Layout.grid(lens, dp=k // 16, cp=4, tp=4)),
    }
    print(f"{args.rows} rows, {args.seqs} ragged sequences, {k} simulated ranks; cold = fresh layouts "
          f"and plan, median of {args.repeat}, CPU time of this process (wall time is meaningless on a "
          f"shared machine); budget: 10 ms per rank")
    print(f"{'pair':<28} {'rank':>6} {'cold ms':>8} {'layouts':>8} {'plan':>8} {'crosses':>8} "
          f"{'segments':>9} {'peers':>6}")
    for name, build in pairs.items():
        for rank in (0, k // 3, k - 1):
            times = []
            for _ in range(args.repeat):
                t0 = time.process_time()
                src, dst = build()  # fresh layouts: nothing cached
                t1 = time.process_time()
                plan = Plan(src, dst).rank_plan(rank)
                t2 = time.process_time()
                Plan(src, dst).crosses_wire()
                t3 = time.process_time()
                times.append((t2 - t0, t1 - t0, t2 - t1, t3 - t2))
            total, layouts, planning, crosses = (statistics.median(c) * 1e3 for c in zip(*times))
            segments = sum(len(s) for _, s in plan.sends + plan.recvs) + len(plan.local[0])
            print(f"{name:<28} {rank:>6} {total:>8.1f} {layouts:>8.1f} {planning:>8.1f} {crosses:>8.2f} "
                  f"{segments:>9} {len(plan.sends) + len(plan.recvs):>6}")


if __name__ == "__main__":
    main()
