"""CPU time beside wall time: how busy the machine's cores are while each method runs, so that a
transform's time can be read against what the transport alone already uses (on a CPU box the
"network" is memory copies on the same cores). 4 gloo ranks, CP zigzag -> contiguous, 1 KiB rows,
calls back to back; CPU = user + system time of every thread of every rank:

    python bench/cpu_cost.py                 # 64 MiB
    python bench/cpu_cost.py --rows 16384 --calls 40
"""

import argparse
import resource
import time

import torch.distributed as dist

from hpcomm.tools import bench
from hpcomm.tools.launch import World

METHODS = ("hpcomm", "a2a", "wire", "wire_p2p")


def rank_usage(rank: int, world_size: int, rows: int, calls: int) -> dict[str, tuple[float, float, float]]:
    """Per method: (wall us per call, user us per call, system us per call) on this rank."""
    src, dst = "cp=4,cp_mode=zigzag", "cp=4,cp_mode=contiguous"
    cfg = {"case": f"{src} -> {dst}", "src_text": src, "dst_text": dst, "src": bench.parse_spec(src),
           "dst": bench.parse_spec(dst), "placement": "colocated", "seq_lens": bench.ragged_lens(rows, 16),
           "hidden": 256, "dtype": "float32", "backward": False, "methods": list(METHODS), "seed": 0,
           "threads": bench.local_threads(world_size)}
    p = bench.prepare(rank, world_size, cfg)
    out = {}
    for m in METHODS:
        for _ in range(3):
            p.runners[m]()
        dist.barrier()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(calls):
            p.runners[m]()
        dist.barrier()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out[m] = ((t1 - t0) / calls * 1e6, (r1.ru_utime - r0.ru_utime) / calls * 1e6,
                  (r1.ru_stime - r0.ru_stime) / calls * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=65536, help="rows of 1 KiB (fp32 x 256)")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    with World(4) as world:
        results = world.run(rank_usage, args.rows, args.calls, timeout=3600)
    print(f"{args.rows * 1024} B, {args.calls} calls back to back; per call, CPU summed over the 4 ranks")
    print("| method | wall (us) | user (us) | system (us) | cores busy |")
    print("|---|---|---|---|---|")
    for m in METHODS:
        wall = max(r[m][0] for r in results)
        user, system = sum(r[m][1] for r in results), sum(r[m][2] for r in results)
        print(f"| {m} | {wall:.0f} | {user:.0f} | {system:.0f} | {(user + system) / wall:.2f} |")


if __name__ == "__main__":
    main()
