"""Where hpcomm's forward spends its time: calls back to back (no barrier between them, as a
training step makes them) on 4 local gloo ranks, beside the a2a baseline and the byte-moving
references, then cProfile of hpcomm's calls on rank 0 (docs/BENCHMARKS.md, "Engine-side slowness"):

    python bench/profile_transform.py --rows 64 --calls 300      # 64 KiB of 1 KiB rows
    python bench/profile_transform.py --rows 16384 --calls 60    # 16 MiB
"""

import argparse
import cProfile
import io
import pstats
import time

import torch.distributed as dist

from hpcomm.tools import bench
from hpcomm.tools.launch import World

METHODS = ("hpcomm", "a2a", "wire", "wire_p2p")


def profile_rank(rank: int, world_size: int, src: str, dst: str, rows: int, calls: int, sort: str
                 ) -> tuple[dict, str]:
    """Mean microseconds per back-to-back call of each method; rank 0 also returns the profile."""
    cfg = {"case": f"{src} -> {dst}", "src_text": src, "dst_text": dst, "src": bench.parse_spec(src),
           "dst": bench.parse_spec(dst), "placement": "colocated", "seq_lens": bench.ragged_lens(rows, 16),
           "hidden": 256, "dtype": "float32", "backward": False, "methods": list(METHODS), "seed": 0,
           "threads": bench.local_threads(world_size)}
    p = bench.prepare(rank, world_size, cfg)
    for _ in range(10):
        p.runners["hpcomm"]()
    mean_us = {}
    for m in METHODS:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            p.runners[m]()
        mean_us[m] = (time.perf_counter() - start) / calls * 1e6
    dist.barrier()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        p.runners["hpcomm"]()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats(sort).print_stats(25)
    return mean_us, text.getvalue() if rank == 0 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default="cp=4,cp_mode=zigzag")
    ap.add_argument("--dst", default="cp=4,cp_mode=contiguous")
    ap.add_argument("--rows", type=int, default=64, help="rows of 1 KiB (fp32 x 256)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--sort", default="cumulative", help="pstats sort key (tottime: own time)")
    args = ap.parse_args()
    with World(4, pg_timeout=600) as world:
        results = world.run(profile_rank, args.src, args.dst, args.rows, args.calls, args.sort, timeout=3600)
    print(f"{args.src} -> {args.dst}, {args.rows * 1024} B, {args.calls} back-to-back calls; "
          f"mean us per call on each rank:")
    for rank, (mean_us, _) in enumerate(results):
        print(f"  rank {rank}: " + "  ".join(f"{m} {us:.0f}" for m, us in mean_us.items()))
    print(results[0][1])


if __name__ == "__main__":
    main()
