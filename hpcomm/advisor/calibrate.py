"""Measure this machine's constants with short runs and write them as a cluster JSON file.

All timings run on ``ranks`` processes at once, so each sees the contention a rank of a real run
sees. Links: a ring send/recv over gloo at several sizes (bandwidth), then hpcomm transforms
called the way the trainer calls its TP ones (2-rank groups, back to back inside forward and
backward, new ones per micro-batch): the cost of one call, and what planning a new one adds.
Compute: forward + backward of one reference-trainer Block at several widths and row counts
(FLOP rate and per-block overhead). Fixed costs: the all-DP reference trainer with one transformer
block per module at two micro-batch counts (per-step and per-micro-batch overheads, after
subtracting what the model already predicts, blocks included). The trainer's default model shape is never timed, so validating on it
is a prediction.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .cost import Link, predict, ring_time
from .flops import module_flops
from .reference import reference_candidate, reference_data, reference_model
from .spec import ClusterSpec, ModuleSpec

SIZES = (1 << 10, 1 << 14, 1 << 18, 1 << 21)  # bytes per ring message
BLOCKS = ((32, 64), (64, 128), (96, 96), (96, 256), (192, 256), (128, 512))  # (width, rows)
MICRO = (1, 3)  # micro-batch counts of the one-block trainer runs
WARMUP = 2  # steps dropped from every trainer timing


def train_config(world: int, steps: int, micro_batches: int = 1, layers: int = 2) -> Any:
    """The all-DP reference trainer configuration on ``world`` ranks."""
    from hpcomm.trainer.model import Config
    from hpcomm.trainer.parallelize import ParallelDims
    from hpcomm.trainer.train import TrainConfig

    return TrainConfig(encoder=ParallelDims(dp=world), llm=ParallelDims(dp=world), steps=steps,
                       micro_batches=micro_batches, model=Config(enc_layers=layers, llm_layers=layers))


def _spawn(target: Any, world: int, *args: Any) -> Any:
    """Run target(rank, world, port, *args, queue) on ``world`` processes; rank 0's one result."""
    from hpcomm.trainer.train import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get()
    for p in procs:
        p.join()
    return result


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as the trainer's local runs
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _steps_worker(rank: int, world: int, port: int, cfg: Any, queue: Any) -> None:
    from hpcomm.trainer.train import train

    _init(rank, world, port)
    try:
        result = train(cfg, rank, world, progress=False)
        if rank == 0:
            queue.put(result["step_seconds"])  # each the slowest rank's
    finally:
        dist.destroy_process_group()


def measure_steps(cfg: Any, world: int) -> list[float]:
    """Seconds of every step of the reference trainer (a TrainConfig) on ``world`` local gloo
    processes, the slowest rank's."""
    result: list[float] = _spawn(_steps_worker, world, cfg)
    return result


def _time(fn: Any, iters: int) -> float:
    samples = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


# The trainer's TP and CP transforms: per micro-batch a new gather and reduce-scatter over a
# 2-rank group (the groups of the world at once), called LAYERS times each way in forward and
# again in backward, back to back with a linear layer between, never after a barrier. Timed the
# same way: a rank that waits for its peer, on cores the other ranks share, pays for it here.
PAIR_ROWS, PAIR_WIDTH, PAIR_LAYERS = 256, 96, 4


def _transform_calls(rank: int, iters: int) -> tuple[float, float, int]:
    """(seconds per call of a reused transform, seconds a micro-batch pays per transform it plans
    anew, bytes of one call in all) in the trainer's pattern above: loops with transforms less
    the same loop without them."""
    from hpcomm import Layout, Transform

    pair = [rank - rank % 2, rank - rank % 2 + 1]
    linear = torch.nn.Linear(PAIR_WIDTH, PAIR_WIDTH, bias=False)

    def transforms(n: int) -> tuple[Transform, Transform]:
        halves = {r: torch.arange(n)[i::2] for i, r in enumerate(pair)}
        every = {r: torch.arange(n) for r in pair}
        return (Transform(Layout.from_rows(halves, n), Layout.from_rows(every, n), grad="sum"),
                Transform(Layout.from_rows(every, n, partial=True), Layout.from_rows(halves, n)))

    def micro_batch(pair_of: tuple[Transform, Transform] | None, n: int) -> None:
        h = torch.randn(n // 2, PAIR_WIDTH, requires_grad=True)
        for _ in range(PAIR_LAYERS):
            h = linear(pair_of[0](h)) if pair_of else linear(torch.cat([h, h]))
            h = pair_of[1](h) if pair_of else h[: n // 2]
        h.sum().backward()

    kept = transforms(PAIR_ROWS)
    micro_batch(kept, PAIR_ROWS)  # warm: plans, buffers, the header receives posted ahead
    # built ahead, as the trainer's prefetcher does; new sizes, so nothing is cached
    built = iter([(n, transforms(n)) for n in range(PAIR_ROWS + 2, PAIR_ROWS + 2 * (iters + 1), 2)])

    def planned() -> None:
        n, pair_of = next(built)
        micro_batch(pair_of, n)
    # interleaved, so that the load drifting during the measurement shifts all three alike
    times: dict[str, list[float]] = {"bare": [], "reused": [], "planned": []}
    for _ in range(iters):
        for kind, fn in (("bare", lambda: micro_batch(None, PAIR_ROWS)),
                         ("reused", lambda: micro_batch(kept, PAIR_ROWS)), ("planned", planned)):
            times[kind].append(_time(fn, 1))
    bare, with_calls, with_plans = (statistics.median(times[k]) for k in ("bare", "reused", "planned"))
    calls = 4 * PAIR_LAYERS  # gathers and reduce-scatters, forward and backward
    reused = (with_calls - bare) / calls
    plan = (with_plans - with_calls) / 2  # two transforms planned per micro-batch
    return reused, plan, PAIR_ROWS * PAIR_WIDTH * 4


def _links_worker(rank: int, world: int, port: int, iters: int, queue: Any) -> None:
    from hpcomm.trainer.model import AttnContext, Block, segments

    _init(rank, world, port)
    try:
        ring = {}
        for size in SIZES:
            send, recv = torch.zeros(size // 4), torch.empty(size // 4)

            def exchange() -> None:
                for work in dist.batch_isend_irecv([
                        dist.P2POp(dist.isend, send, (rank + 1) % world),
                        dist.P2POp(dist.irecv, recv, (rank - 1) % world)]):
                    work.wait()
            ring[size] = _time(exchange, iters)
        reused, plan, nbytes = _transform_calls(rank, max(5, iters // 2))
        blocks = {}
        for w, r in BLOCKS:
            block = Block(w, 4)
            h = torch.randn(r, w, requires_grad=True)
            every = torch.arange(r)  # one sample: every pair computed, as fit_blocks counts
            ctx = AttnContext(segments(every, every, torch.zeros(r, dtype=torch.int64), False))
            blocks[(w, r)] = _time(lambda: block(h, ctx).sum().backward(), max(5, iters // 3))
        if rank == 0:
            queue.put((ring, reused, plan, nbytes, blocks))
    finally:
        dist.destroy_process_group()


def fit_links(ring: dict[int, float], reused: float, plan: float, nbytes: int, base: ClusterSpec
              ) -> ClusterSpec:
    """Bandwidth from the ring timings (least squares slope). The trainer's collectives are hpcomm
    transforms: one round of direct messages, not a ring, and on a shared CPU their fixed cost is
    mostly waiting for a peer to get a core; so the link latency is folded into the per-call
    overhead (a trainer-style 2-rank call's time less its bytes), and planning is what each new
    Transform of a micro-batch adds."""
    slope, _ = np.polyfit(np.array(list(ring), float), np.array(list(ring.values())), 1)
    bandwidth = 1.0 / max(float(slope), 1e-12)
    wire = ring_time(replace(base, collective_overhead=0.0), Link(bandwidth, 0.0), 2, nbytes)
    return replace(base, intra_latency=0.0, intra_bw=bandwidth, inter_latency=0.0,
                   inter_bw=bandwidth, collective_overhead=max(0.0, reused - wire),
                   plan_overhead=max(0.0, plan))


def fit_blocks(blocks: dict[tuple[int, int], float], base: ClusterSpec) -> ClusterSpec:
    """Block seconds = per-block overhead + FLOPs / rate (least squares on relative residuals:
    unweighted, the largest block's uncounted attention work (softmax, masks) pulls the line
    down to a zero overhead, which the small blocks of the trainer do not have)."""
    flops = [module_flops(ModuleSpec(layers=1, hidden=w, heads=4, ffn=4 * w), r, r * r, 1,
                          with_extras=False) for w, r in blocks]
    seconds = np.array(list(blocks.values()))
    slope, intercept = np.polyfit(np.array(flops), seconds, 1, w=1.0 / seconds)
    return replace(base, block_overhead=max(0.0, float(intercept)),
                   flops=1.0 / max(float(slope), 1e-15), efficiency=1.0)


def fit_overheads(times: dict[int, float], base: ClusterSpec) -> ClusterSpec:
    """Step time of one-block modules - what the model already predicts for it (blocks
    included) = per step + micro-batches x modules x per micro-batch (least squares over the
    micro-batch counts)."""
    xs, ys = [], []
    for m, seconds in times.items():
        cfg = train_config(base.gpus, 1, m, layers=1)
        p = predict(reference_candidate(cfg), reference_model(cfg.model), reference_data(cfg), base)
        xs.append(2.0 * m)
        ys.append(seconds - p.step_time)
    per_mb, step = np.polyfit(np.array(xs), np.array(ys), 1)
    return replace(base, step_overhead=max(0.0, float(step)), microbatch_overhead=max(0.0, float(per_mb)))


def calibrate(ranks: int = 4, steps: int = 7, iters: int = 30) -> ClusterSpec:
    """A ClusterSpec for this machine with ``ranks`` processes as its GPUs (one node sharing
    the machine's cores)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / ranks
    cores = os.cpu_count() or 1
    background = os.getloadavg()[0]  # runnable processes of others before ours start
    base = ClusterSpec(name=f"this-machine-{ranks}", gpus=ranks, gpus_per_node=ranks, flops=1e9,
                       memory=float(memory), intra_bw=1e9, intra_latency=1e-4, inter_bw=1e9,
                       inter_latency=1e-4, cores=cores, background_load=background,
                       source=f"hpcomm-advise --calibrate on {os.uname().nodename}, {cores} cores, "
                       f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    ring, reused, plan, nbytes, blocks = _spawn(_links_worker, ranks, iters)
    cluster = fit_blocks(blocks, fit_links(ring, reused, plan, nbytes, base))
    overheads = {m: statistics.median(measure_steps(train_config(ranks, steps, m, layers=1), ranks)[WARMUP:])
                 for m in MICRO}
    return fit_overheads(overheads, cluster)
