"""Predicted vs measured step time of reference-trainer configurations on this machine.

    PYTHONPATH=. python bench/bench_advisor.py                  # calibrate, then measure 9 configs
    PYTHONPATH=. python bench/bench_advisor.py --cluster c.json # use an existing calibration

Calibrates first (``hpcomm-advise --calibrate``), then runs each configuration on 4 gloo
processes with the trainer's Python API (``hpcomm.trainer.train.train``) and prints, per configuration, the
predicted and the measured median step time (the slowest rank's, steps after the first two),
their relative error, and whether the predicted best is the measured best or within 10% of it.
Both run back to back because this machine's speed depends on what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from hpcomm.advisor.calibrate import WARMUP, calibrate, measure_steps
from hpcomm.advisor.cost import predict
from hpcomm.advisor.reference import reference_candidate, reference_data, reference_model
from hpcomm.advisor.spec import ClusterSpec
from hpcomm.trainer.parallelize import ParallelDims
from hpcomm.trainer.train import TrainConfig

WORLD = 4
# placement, encoder, LLM, micro-batches
CONFIGS = (
    ("colocated", "inherit", "dp=4", 1),            # homogeneous
    ("colocated", "inherit", "dp=2,tp=2", 1),       # homogeneous
    ("colocated", "dp=4", "cp=2,tp=2", 1),
    ("colocated", "dp=4", "dp=2,tp=2", 1),
    ("colocated", "dp=4", "dp=2,cp=2", 1),
    ("colocated", "dp=2,tp=2", "dp=4", 1),
    ("noncolocated", "dp=2", "dp=2", 2),
    ("noncolocated", "dp=1", "dp=3", 2),
    ("noncolocated", "dp=2", "pp=2", 4),
)


def train_config(placement: str, enc: str, llm: str, micro: int, steps: int) -> TrainConfig:
    return TrainConfig(encoder=enc if enc == "inherit" else ParallelDims.parse(enc),
                       llm=ParallelDims.parse(llm), placement=placement, steps=steps,
                       micro_batches=micro)


def predicted(cfg: TrainConfig, cluster: ClusterSpec) -> float:
    """Median over the measured steps of the predicted step time of each step's batch."""
    model, cand = reference_model(cfg.model), reference_candidate(cfg)
    return statistics.median(predict(cand, model, reference_data(cfg, s), cluster).step_time
                             for s in range(WARMUP, cfg.steps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cluster", help="cluster JSON from hpcomm-advise --calibrate (default: calibrate now)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="times each configuration is run")
    p.add_argument("--write-cluster", help="save the calibration made here to this file")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.cluster:
        with open(args.cluster) as f:
            cluster = ClusterSpec.from_json(f.read())
    else:
        cluster = calibrate(WORLD)
        if args.write_cluster:
            with open(args.write_cluster, "w") as f:
                f.write(cluster.to_json())
    print(f"cluster: flops {cluster.flops / 1e9:.1f} GFLOP/s per rank, block {cluster.block_overhead * 1e3:.2f} ms, "
          f"micro-batch {cluster.microbatch_overhead * 1e3:.2f} ms, step {cluster.step_overhead * 1e3:.1f} ms, "
          f"collective {cluster.collective_overhead * 1e3:.2f} ms, plan {cluster.plan_overhead * 1e3:.2f} ms, "
          f"link {cluster.intra_bw / 1e9:.2f} GB/s, {cluster.cores} cores, background load "
          f"{cluster.background_load:.1f}")
    configs = [train_config(*c, args.steps) for c in CONFIGS]
    seconds: list[list[float]] = [[] for _ in configs]
    for _ in range(args.rounds):  # rounds interleave the configurations: load drifts
        for i, cfg in enumerate(configs):
            seconds[i] += measure_steps(cfg, WORLD)[WARMUP:]
    rows = [(reference_candidate(cfg).label(), cfg.micro_batches, predicted(cfg, cluster),
             statistics.median(s)) for cfg, s in zip(configs, seconds)]
    print("\n| configuration | micro-batches | predicted ms | measured ms | error |")
    print("|---|---|---|---|---|")
    errors = []
    for label, micro, pred, meas in rows:
        errors.append(abs(pred - meas) / meas)
        print(f"| {' '.join(label.split())} | {micro} | {pred * 1e3:.1f} | {meas * 1e3:.1f} | "
              f"{100 * (pred - meas) / meas:+.0f}% |")
    best_pred = min(rows, key=lambda r: r[2])
    best_meas = min(rows, key=lambda r: r[3])
    gap = best_pred[3] / best_meas[3] - 1
    median_error = statistics.median(errors)
    print(f"\nmedian |predicted - measured| / measured: {100 * median_error:.1f}% (target <= 25%)")
    print(f"predicted best: {' '.join(best_pred[0].split())}, measured {best_pred[3] * 1e3:.1f} ms; "
          f"measured best: {' '.join(best_meas[0].split())}, {best_meas[3] * 1e3:.1f} ms "
          f"(gap {100 * gap:.1f}%, target <= 10%)")
    print(f"bench time {time.perf_counter() - start:.0f} s")
    return 0 if median_error <= 0.25 and gap <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
