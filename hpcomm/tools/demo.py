"""hpcomm-demo: a colocated and a non-colocated boundary transform on local gloo processes.

    hpcomm-demo                  # 4 local processes
    torchrun --nproc-per-node 4 -m hpcomm.tools.demo

Each rank prints what it sent, received and kept, and checks its result against the global tensor.
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch
import torch.distributed as dist

from hpcomm import Layout, Transform
from hpcomm.tools.launch import spawn

SAMPLE_LENS = [300, 120, 520, 64, 210, 90, 410, 150]
HIDDEN = 64


def _report(title: str, t: Transform, x: torch.Tensor, rank: int) -> str:
    y = t(x)
    expect = t.dst.shard(X_GLOBAL, rank) if rank in t.dst.ranks else None
    ok = "ok" if expect is None or torch.equal(y, expect) else "MISMATCH"
    s = t.stats(rank)
    row_bytes = HIDDEN * x.element_size()
    return (f"[{title}] rank {rank}: in {tuple(x.shape)} -> out {tuple(y.shape)} | sent "
            f"{s['sent']} rows ({s['sent'] * row_bytes / 1024:.0f} KiB) to {s['messages_out']} peers, "
            f"received {s['received']} rows from {s['messages_in']}, kept {s['copied']} locally | {ok}")


X_GLOBAL = torch.arange(sum(SAMPLE_LENS) * HIDDEN, dtype=torch.float32).view(-1, HIDDEN)


def run(rank: int, world_size: int) -> list[str]:
    ranks = list(range(world_size))
    half = world_size // 2
    lines = []
    # colocated: encoder DP (balanced) -> LLM CP x TP (sequence parallel) on the same ranks
    enc = Layout.dp(ranks, SAMPLE_LENS, "balanced")
    llm = Layout.grid(SAMPLE_LENS, cp=2, tp=world_size // 2) if world_size % 2 == 0 else \
        Layout.cp(ranks, SAMPLE_LENS, "zigzag")
    lines.append(_report("colocated dp->cp x tp", Transform(enc, llm), enc.shard(X_GLOBAL, rank), rank))
    # non-colocated: encoder DP on the first half, LLM CP zigzag on the second half
    enc = Layout.dp(ranks[:half], SAMPLE_LENS, "balanced")
    llm = Layout.cp(ranks[half:], SAMPLE_LENS, "zigzag")
    x = enc.shard(X_GLOBAL, rank) if rank in enc.ranks else X_GLOBAL[:0]
    lines.append(_report("non-colocated dp->cp", Transform(enc, llm), x, rank))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--nproc", type=int, default=4, help="local processes when not under torchrun")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun: use the world we are given
        dist.init_process_group("gloo")
        for line in run(dist.get_rank(), dist.get_world_size()):
            print(line, flush=True)
        dist.destroy_process_group()
        return
    if args.nproc < 2:
        parser.error("--nproc must be at least 2 (one side of the non-colocated demo per half)")
    results = spawn(run, args.nproc)
    for i in range(len(results[0])):
        for lines in results:
            print(lines[i])


if __name__ == "__main__":
    main()
