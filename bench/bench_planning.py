"""Per-rank planning time and plan size at scale (no process group: plans are pure data).

    python bench/bench_planning.py [--ranks 1024] [--rows 1048576] [--seqs 4096]

Each rank builds only its own part of the plan, so the figure is what one process pays once per
layout pair (the plan is cached afterwards).
"""

import argparse
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
    args = parser.parse_args()
    lens = ragged(args.rows, args.seqs)
    k = args.ranks
    pairs = {
        "cp zigzag -> cp contiguous": (Layout.cp(range(k), lens, "zigzag"), Layout.cp(range(k), lens, "contiguous")),
        "dp balanced -> cp zigzag": (Layout.dp(range(k), lens, "balanced"), Layout.cp(range(k), lens, "zigzag")),
    }
    print(f"{args.rows} rows, {args.seqs} ragged sequences, {k} simulated ranks")
    print(f"{'pair':<28} {'rank':>6} {'ms (cold)':>10} {'segments':>9} {'peers':>6}")
    for name, (src, dst) in pairs.items():
        for rank in (0, k // 3, k - 1):
            start = time.perf_counter()
            plan = Plan(src, dst).rank_plan(rank)  # a fresh Plan: nothing cached
            ms = (time.perf_counter() - start) * 1e3
            segments = sum(len(s) for _, s in plan.sends + plan.recvs) + len(plan.local[0])
            print(f"{name:<28} {rank:>6} {ms:>10.1f} {segments:>9} {len(plan.sends) + len(plan.recvs):>6}")


if __name__ == "__main__":
    main()
