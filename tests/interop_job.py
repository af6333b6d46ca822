"""A training-like job that interleaves hpcomm's transforms with other traffic on the same default
group, as a program that also uses another library would; run under torchrun by
tests/test_interop.py:

    torchrun --standalone --nproc-per-node 4 tests/interop_job.py --iters 100 [--destroy]

Several transforms are built before the first call. Each iteration runs every transform forward
and backward, and between them: point-to-point with tag 0 on the default group, a collective on a
subgroup from ``new_subgroups_by_enumeration``, ``all_gather_into_tensor``, a barrier and
``all_gather_object``. Every result is checked exactly; the job prints ``interop ok`` on rank 0
and exits 0 (with or without ``destroy_process_group``).
"""

import argparse

import torch
import torch.distributed as dist

from hpcomm import Layout, Transform


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--destroy", action="store_true", help="call destroy_process_group at the end")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    pairs, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    lens = [7, 30, 12, 21, 9]
    n = sum(lens)
    ranks = list(range(world))
    transforms = [
        Transform(Layout.cp(ranks, lens, "zigzag"), Layout.dp(ranks, lens, "balanced"), name="cp->dp"),
        Transform(Layout.dp(ranks[:2], lens), Layout.cp(ranks[2:], lens, "contiguous"), grad="sum",
                  name="encoder->llm"),
        Transform(Layout.contiguous(ranks, n), Layout.replicated(ranks[1:3], n), name="to replicas"),
    ]
    bad = []
    for step in range(args.iters):
        g = torch.Generator().manual_seed(step)
        x_global = torch.randn(n, 8, generator=g)
        for i, t in enumerate(transforms):
            x = (t.src.shard(x_global, rank) if rank in t.src.ranks else x_global[:0]).clone().requires_grad_()
            y = t(x)
            want = t.dst.shard(x_global, rank) if rank in t.dst.ranks else x_global[:0]
            if not torch.equal(y, want):
                bad.append(f"step {step}: {t!r} forward")
            y.backward(torch.ones_like(y))
            expect = t.simulate_backward({r: torch.ones(t.dst.local_num_rows(r) if r in t.dst.ranks else 0, 8)
                                          for r in t.ranks})[rank]
            if not torch.equal(x.grad, expect):
                bad.append(f"step {step}: {t!r} backward")
            # other traffic between the transform calls, on the same default group
            if i == 0:  # point-to-point with tag 0 in a ring
                mine, theirs = torch.full((3,), float(rank + step)), torch.empty(3)
                req = dist.isend(mine, (rank + 1) % world, tag=0)
                dist.recv(theirs, (rank - 1) % world, tag=0)
                req.wait()
                if not bool((theirs == float((rank - 1) % world + step)).all()):
                    bad.append(f"step {step}: tag-0 ring")
            elif i == 1:  # a collective on a subgroup, then one on the world
                v = torch.tensor([float(rank)])
                dist.all_reduce(v, group=pairs)
                gathered = torch.empty(world, dtype=torch.float32)
                dist.all_gather_into_tensor(gathered, torch.tensor([float(rank * step)]))
                if v.item() != (1.0 if rank < 2 else 5.0) or gathered.tolist() != [float(r * step) for r in ranks]:
                    bad.append(f"step {step}: subgroup all_reduce / all_gather_into_tensor")
            else:
                dist.barrier()
                objects = [None] * world
                dist.all_gather_object(objects, {"rank": rank, "step": step})
                if objects != [{"rank": r, "step": step} for r in ranks]:
                    bad.append(f"step {step}: all_gather_object")
    flags = torch.tensor([len(bad)])
    dist.all_reduce(flags)  # one verdict on every rank, so no rank waits for a failed one
    if bad:
        print(f"rank {rank}: {bad[:5]}", flush=True)
    if rank == 0 and int(flags) == 0:
        print(f"interop ok: {args.iters} iterations, {len(transforms)} transforms", flush=True)
    if args.destroy:
        dist.destroy_process_group()
    raise SystemExit(1 if int(flags) else 0)


if __name__ == "__main__":
    main()
