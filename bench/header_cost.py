"""What the per-call safety protocol costs: the same transform timed as hpcomm runs it (a header to
every peer, payloads riding in the headers or sent once the receiver's header agrees) and with all
of that replaced by plain point-to-point (every payload sent at once, no header; for this
measurement only, not a mode hpcomm offers), on 4 gloo ranks. Calls are
interleaved; each figure is the median over iterations of the slowest rank's time, for single calls
after a barrier and for back-to-back calls (as a training step makes them):

    python bench/header_cost.py                      # CP zigzag -> contiguous, 64 KiB to 64 MiB
    python bench/header_cost.py --iters 30 --sizes 1,16
"""

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from hpcomm import Layout, Transform
from hpcomm import validate
from hpcomm.tools import bench
from hpcomm.tools.launch import World

HIDDEN = 256  # fp32: 1 KiB rows
BURST = 5  # back-to-back calls per timed burst


class _Unchecked:
    """Stands in for a call's header round: nothing is sent or checked, every payload travels on
    its own and is sent at once."""

    def __init__(self, *args: object) -> None:
        pass

    def send_room(self, peer: int) -> int:
        return -1

    recv_room = send_room

    def agrees(self, peer: int) -> bool:
        return True

    arrived = verdict = agrees

    def carried(self, peer: int) -> bool:
        return False

    def send(self, *args: object) -> None:
        pass

    def problems(self, pairs: object) -> list[str]:
        return []

    def settle(self) -> bool:
        return True

    def release(self) -> None:
        pass


def _safe(on: bool) -> None:
    validate.Round = SAFE if on else _Unchecked  # type: ignore[misc, assignment]


SAFE = validate.Round


def time_rank(rank: int, world_size: int, kib: int, iters: int) -> dict[str, list[float]]:
    rows = kib
    lens = bench.ragged_lens(rows, 16)
    src, dst = Layout.cp(range(world_size), lens, "zigzag"), Layout.cp(range(world_size), lens, "contiguous")
    t = Transform(src, dst)
    x = torch.randn(src.local_num_rows(rank), HIDDEN)
    out = torch.empty(dst.local_num_rows(rank), HIDDEN)
    times: dict[str, list[float]] = {k: [] for k in ("safe", "unchecked", "safe x5", "unchecked x5")}
    for i in range(iters + 3):
        for name in times:
            _safe(name.startswith("safe"))
            calls = BURST if name.endswith("x5") else 1
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                t(x, out=out)
            elapsed = torch.tensor([(time.perf_counter() - start) / calls])
            dist.all_reduce(elapsed, dist.ReduceOp.MAX)
            if i >= 3:
                times[name].append(float(elapsed))
    _safe(True)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.0625,1,4,16,64", help="MiB of the global tensor, comma-separated")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    print("| size | single call: safe / unchecked (us) | cost | back to back: safe / unchecked (us) | cost |")
    print("|---|---|---|---|---|")
    with World(4) as world:
        for mib in (float(s) for s in args.sizes.split(",")):
            times = world.run(time_rank, int(mib * 1024), args.iters, timeout=600)[0]
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            one = (med["safe"] - med["unchecked"]) / med["safe"]
            burst = (med["safe x5"] - med["unchecked x5"]) / med["safe x5"]
            print(f"| {mib:g} MiB | {med['safe']:.0f} / {med['unchecked']:.0f} | {one:+.1%} | "
                  f"{med['safe x5']:.0f} / {med['unchecked x5']:.0f} | {burst:+.1%} |")


if __name__ == "__main__":
    main()
