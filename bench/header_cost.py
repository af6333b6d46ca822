"""What the per-call header check costs: the same transform timed with its headers and with the
check replaced by nothing (for this measurement only; that is not a mode hpcomm offers), on 4 gloo
ranks, calls interleaved, median of the iterations, each the slowest rank's:

    python bench/header_cost.py                      # CP zigzag -> contiguous, 1 to 64 MiB
    python bench/header_cost.py --iters 30 --sizes 1,16
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from hpcomm import Layout, Transform
from hpcomm.engine import Engine
from hpcomm.tools import bench
from hpcomm.tools.launch import World

HIDDEN = 256  # fp32: 1 KiB rows


def _no_header(self, *args, **kwargs):
    return lambda: None


def time_rank(rank: int, world_size: int, mib: int, iters: int) -> dict[str, list[float]]:
    rows = mib * 1024
    lens = bench.ragged_lens(rows, 16)
    src, dst = Layout.cp(range(world_size), lens, "zigzag"), Layout.cp(range(world_size), lens, "contiguous")
    t = Transform(src, dst)
    x = torch.randn(src.local_num_rows(rank), HIDDEN)
    out = torch.empty(dst.local_num_rows(rank), HIDDEN)
    checked = Engine._headers
    times: dict[str, list[float]] = {"with header": [], "without": []}
    for i in range(iters + 3):
        for name in times:
            Engine._headers = checked if name == "with header" else _no_header  # type: ignore[method-assign]
            dist.barrier()
            start = time.perf_counter()
            t(x, out=out)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, dist.ReduceOp.MAX)
            if i >= 3:
                times[name].append(float(elapsed))
    Engine._headers = checked  # type: ignore[method-assign]
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,4,16,64", help="MiB of the global tensor, comma-separated")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    print("| size | with header (us) | without (us) | header share |")
    print("|---|---|---|---|")
    with World(4) as world:
        for mib in (int(s) for s in args.sizes.split(",")):
            times = world.run(time_rank, mib, args.iters, timeout=600)[0]
            with_h, without = (statistics.median(times[k]) * 1e6 for k in ("with header", "without"))
            print(f"| {mib} MiB | {with_h:.0f} | {without:.0f} | {(with_h - without) / with_h:+.1%} |")


if __name__ == "__main__":
    main()
