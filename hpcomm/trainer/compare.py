"""hpcomm-train --compare: the homogeneous baseline against heterogeneous layouts, end to end.

Each configuration trains the same steps on the same data and seed, in fresh processes (so that
peak memory is its own); the single-process run of the same steps is the parity reference.

    from hpcomm.trainer.compare import compare, compare_configs
    rows = compare(compare_configs(TrainConfig(steps=10), world_size=4), world_size=4)

Each row is a dict: config, step_ms, tokens_per_s, flops_per_s_per_rank, boundary_share,
idle_share (per rank), peak_mib (per rank), final_loss, parity (max |Δloss| against the
reference), losses.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from hpcomm.tools.launch import free_port

from .parallelize import ParallelDims
from .train import INHERIT, TrainConfig, loss_axes, run_workers, save_figure, train


def compare_configs(cfg: TrainConfig, world_size: int) -> dict[str, TrainConfig]:
    """The homogeneous baseline, one colocated and one non-colocated heterogeneous configuration:
    cfg's own where cfg is of that placement (and fits world_size), else a default. The baseline runs the colocated
    configuration's LLM layout with the encoder in it (what an LLM-centric framework does). With
    cfg.freeze_encoder each configuration also runs with the encoder frozen."""
    def given(placement: str) -> bool:
        if cfg.inherit or cfg.placement != placement:
            return False
        try:
            cfg.module_ranks(world_size)
        except ValueError:  # the CLI's default degrees on another world size
            return False
        return True

    colocated = (cfg if given("colocated") else
                 replace(cfg, placement="colocated", encoder=ParallelDims(dp=world_size),
                         llm=cfg.llm if cfg.llm.size == world_size else ParallelDims(dp=world_size)))
    noncolocated = (cfg if given("noncolocated") else
                    replace(cfg, placement="noncolocated", encoder=ParallelDims(dp=1),
                            llm=ParallelDims(cp=world_size - 1)))
    homogeneous = replace(colocated, encoder=INHERIT)
    configs = {}
    for base in (homogeneous, colocated, noncolocated):
        variants = (False, True) if cfg.freeze_encoder else (False,)
        for frozen in variants:
            c = replace(base, freeze_encoder=frozen)
            c.module_ranks(world_size)  # bad degrees fail before anything runs
            name = ("homogeneous (encoder inherits the LLM layout)" if base is homogeneous
                    else c.describe().replace(" frozen-enc", ""))
            configs[name + (", frozen encoder" if frozen else "")] = c
    return configs


def _run(rank: int, world_size: int, port: int, cfg: TrainConfig, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = train(cfg, rank, world_size, progress=False)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(path, "w") as f:
            json.dump(result, f)


def compare(configs: dict[str, TrainConfig], world_size: int, progress: bool = False
            ) -> list[dict[str, Any]]:
    """Train each configuration on world_size fresh local processes, and the single-process
    reference once per distinct model setting; one row per configuration. With progress, print
    a line as each configuration starts and one with its wall time as it ends."""
    references: dict[bool, list[float]] = {}
    rows = []
    for i, (name, cfg) in enumerate(configs.items(), 1):
        needs_reference = cfg.freeze_encoder not in references
        if progress:
            print(f"[{i}/{len(configs)}] {name}: {cfg.steps} steps on {world_size} processes"
                  + (", then in one process (the parity reference)" if needs_reference else ""),
                  flush=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "result.json")
            run_workers(_run, world_size, world_size, free_port(), cfg, path)
            with open(path) as f:
                result = json.load(f)
        done = f"[{i}/{len(configs)}] {name}: done in {time.perf_counter() - start:.1f} s"
        if needs_reference:
            start = time.perf_counter()
            references[cfg.freeze_encoder] = train(cfg, progress=False)["losses"]
            done += f" (reference {time.perf_counter() - start:.1f} s)"
        reference = references[cfg.freeze_encoder]
        if progress:
            print(done, flush=True)
        steady = slice(1, None) if cfg.steps > 1 else slice(None)
        seconds = sum(result["step_seconds"][steady])
        rows.append({
            "config": name, "step_ms": 1e3 * seconds / len(result["step_seconds"][steady]),
            "tokens_per_s": sum(result["tokens"][steady]) / seconds,
            "flops_per_s_per_rank": sum(result["flops"][steady]) / seconds / world_size,
            "boundary_share": result["boundary_share"], "idle_share": result["idle_share"],
            "prepare_share": result["prepare_share"], "peak_mib": result["peak_mib"],
            "final_loss": result["losses"][-1],
            "parity": max(abs(a - b) for a, b in zip(result["losses"], reference)),
            "losses": result["losses"]})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([len("configuration")] + [len(r["config"]) for r in rows])
    head = (f"{'configuration':<{width}} {'step ms':>8} {'tok/s':>8} {'MFLOP/s/rank':>12} "
            f"{'boundary':>8} {'idle per rank':>18} {'peak MiB per rank':>20} {'loss':>6} "
            f"{'parity':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<{width}} {r['step_ms']:8.1f} {r['tokens_per_s']:8,.0f} "
            f"{r['flops_per_s_per_rank'] / 1e6:12,.1f} {r['boundary_share']:8.1%} "
            f"{' '.join(f'{v:.0%}' for v in r['idle_share']):>18} "
            f"{' '.join(f'{v:.0f}' for v in r['peak_mib']):>20} {r['final_loss']:6.3f} "
            f"{r['parity']:8.1e}")
    return "\n".join(lines)


def plot_comparison(rows: list[dict[str, Any]], path: str) -> None:
    """Throughput bars (with their values) and loss curves side by side; each configuration has
    one colour in both panels, and its own line style among the curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 10}):
        fig, (bars, curves) = plt.subplots(1, 2, figsize=(14, 5))
        colors = [f"C{i}" for i in range(len(rows))]
        drawn = bars.barh(range(len(rows)), [r["tokens_per_s"] for r in rows], color=colors)
        bars.bar_label(drawn, labels=[f"{r['tokens_per_s']:,.0f}" for r in rows], padding=3)
        bars.set_yticks(range(len(rows)), [r["config"] for r in rows])
        bars.invert_yaxis()
        bars.margins(x=0.2)  # room for the values
        bars.set_xlabel("tokens/s (steps after the first, slowest rank)")
        bars.set_title("throughput (higher is better)")
        styles = ["-", "--", ":", "-."]
        for i, r in enumerate(rows):
            curves.plot(r["losses"], color=colors[i], linestyle=styles[i % len(styles)],
                        label=r["config"])
        loss_axes(curves, "training loss per step", "loss")
        save_figure(fig, path, "the comparison plot")
