"""Run every configuration the layout advisor ranks for N ranks through the reference trainer.

    PYTHONPATH=. python bench/sweep_advised.py                 # 4 ranks, batch 16, 3 steps each
    PYTHONPATH=. python bench/sweep_advised.py --small --batch 8 --steps 2 --only cp=4
    PYTHONPATH=. python bench/sweep_advised.py --parity --json sweep.json

Asks the advisor (``hpcomm.advisor.search.rank``, what ``hpcomm-advise --model reference
--reference-data --gpus N --top <all>`` prints) for every configuration it ranks for the reference
model on the trainer's own batch, turns each into a ``TrainConfig`` (homogeneous: ``--encoder
inherit``), and trains it for a few steps on N local gloo processes (one reused
``hpcomm.tools.launch.World``; a failed or timed-out run starts a fresh one). Prints one line per
configuration (PASS or FAIL, wall seconds, the error's last line) and exits 1 if any failed.

A run fails when a rank raises (a hang becomes an error once hpcomm's transforms or gloo time out
after --pg-timeout seconds, or when the whole run exceeds --timeout), when the ranks disagree on
the losses, when a loss is not finite, with --parity when the losses differ from the single-process
run by more than the trainer's tolerance, or when the trainer rejects the configuration outright
(``TrainConfig.module_ranks``: degrees or a placement it cannot run). A colocated candidate with a
pipelined LLM places its encoder on the LLM's first stage's ranks only; the trainer runs it there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from hpcomm.advisor.spec import Candidate
from hpcomm.tools.launch import RemoteError, World
from hpcomm.trainer.model import Config
from hpcomm.trainer.parallelize import ParallelDims
from hpcomm.trainer.train import INHERIT, PARITY_TOLERANCE, TrainConfig, train

# The parity tests' model (tests/trainer/test_trainer_parity.py): same heads and layers as the
# default, so the advisor proposes the same degrees, at a fraction of the compute.
SMALL = Config(enc_dim=32, enc_heads=4, llm_dim=48, llm_heads=4)


def advised(ranks: int = 4, batch: int = 16, model: Config | None = None,
            cluster: str = "h100") -> list[Candidate]:
    """Every configuration the advisor ranks for ``ranks`` ranks (best first) for the reference
    model and the trainer's batch of ``batch`` samples."""
    from hpcomm.advisor.cli import load_cluster
    from hpcomm.advisor.reference import reference_data, reference_model
    from hpcomm.advisor.search import rank

    model = model or Config()
    ranking = rank(reference_model(model), reference_data(TrainConfig(batch_size=batch, model=model)),
                   load_cluster(cluster).with_gpus(ranks), top=10 ** 9)
    return [p.candidate for p in ranking.predictions]


def describe(c: Candidate) -> str:
    return f"{c.placement} enc {c.encoder} llm {c.llm} mb {c.micro_batches}"


def train_config(c: Candidate, steps: int = 3, batch: int = 16, model: Config | None = None,
                 **options: Any) -> TrainConfig:
    """The trainer's configuration of an advisor candidate (the inverse of
    ``hpcomm.advisor.reference.reference_candidate``)."""
    def dims(d: ParallelDims) -> ParallelDims:
        return ParallelDims(dp=d.dp, cp=d.cp, tp=d.tp, pp=d.pp)

    homogeneous = c.placement == "homogeneous"
    return TrainConfig(encoder=INHERIT if homogeneous else dims(c.encoder), llm=dims(c.llm),
                       placement="colocated" if homogeneous else c.placement, steps=steps,
                       micro_batches=c.micro_batches, batch_size=batch, model=model or Config(),
                       **options)


def sweep_worker(rank: int, world_size: int, cfg: TrainConfig, parity: bool) -> dict[str, Any]:
    """One rank of one run (module level: World's processes import it)."""
    result = train(cfg, rank, world_size, check_parity=parity, progress=False)
    return {k: result[k] for k in ("losses", "step_seconds", "loss_error") if k in result}


@dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    error: str = ""
    losses: list[float] = field(default_factory=list)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


def run_config(world: World, cfg: TrainConfig, name: str = "", parity: bool = False,
               timeout: float = 300.0) -> Outcome:
    """Train ``cfg`` on ``world``; PASS or FAIL with the wall time of the whole run."""
    start = time.perf_counter()
    try:
        cfg.module_ranks(world.world_size)  # what the trainer would reject on every rank
    except ValueError as e:
        return Outcome(name, False, 0.0, f"rejected by the trainer: {e}")
    try:
        results = world.run(sweep_worker, cfg, parity, timeout=timeout)
    except RemoteError as e:
        first = min(e.failures)
        return Outcome(name, False, time.perf_counter() - start,
                       f"rank {first}: {_last_line(e.failures[first])} (failed ranks "
                       f"{sorted(e.failures)})")
    except TimeoutError as e:
        return Outcome(name, False, time.perf_counter() - start, f"hang: {e}")
    seconds = time.perf_counter() - start
    losses = results[0]["losses"]
    if any(r["losses"] != losses for r in results):
        return Outcome(name, False, seconds, "ranks disagree on the losses", losses)
    if len(losses) != cfg.steps or not all(math.isfinite(v) for v in losses):
        return Outcome(name, False, seconds, f"bad losses {losses}", losses)
    if parity and results[0]["loss_error"] > PARITY_TOLERANCE:
        return Outcome(name, False, seconds,
                       f"parity: max |dloss| {results[0]['loss_error']:.3g} > {PARITY_TOLERANCE}",
                       losses)
    return Outcome(name, True, seconds, "", losses)


def sweep(candidates: Sequence[Candidate], ranks: int = 4, steps: int = 3, batch: int = 16,
          model: Config | None = None, parity: bool = False, timeout: float = 300.0,
          pg_timeout: float = 60.0, world: World | None = None, echo: bool = True) -> list[Outcome]:
    """Run each candidate; one World for all (``world`` if given, else a fresh one)."""
    own = world is None
    world = world or World(ranks, pg_timeout=pg_timeout)
    outcomes = []
    try:
        for i, c in enumerate(candidates):
            out = run_config(world, train_config(c, steps, batch, model), describe(c), parity,
                             timeout)
            outcomes.append(out)
            if echo:
                print(f"{i + 1:3d} {'PASS' if out.ok else 'FAIL'} {out.seconds:6.1f} s  {out.name}"
                      + (f"  -- {out.error}" if out.error else ""), flush=True)
    finally:
        if own:
            world.__exit__(None, None, None)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--batch", type=int, default=TrainConfig.batch_size, help="samples per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--small", action="store_true", help="the parity tests' smaller model")
    p.add_argument("--cluster", default="h100", help="advisor cluster preset or JSON (ranking order)")
    p.add_argument("--only", action="append", default=[],
                   help="run only configurations whose description contains this (repeatable)")
    p.add_argument("--parity", action="store_true", help="also check losses against one process")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    p.add_argument("--pg-timeout", type=float, default=60.0,
                   help="process group (and transform) timeout: how long a hang takes to fail")
    p.add_argument("--json", help="write the outcomes to this file")
    args = p.parse_args(argv)
    model = SMALL if args.small else Config()
    candidates = advised(args.ranks, args.batch, model, args.cluster)
    if args.only:
        candidates = [c for c in candidates if any(s in describe(c) for s in args.only)]
    print(f"{len(candidates)} advised configurations for {args.ranks} ranks, batch {args.batch}, "
          f"{args.steps} steps each", flush=True)
    start = time.perf_counter()
    outcomes = sweep(candidates, args.ranks, args.steps, args.batch, model, args.parity,
                     args.timeout, args.pg_timeout)
    failed = [o for o in outcomes if not o.ok]
    print(f"\n{len(outcomes) - len(failed)} passed, {len(failed)} failed, "
          f"{time.perf_counter() - start:.0f} s")
    for o in failed:
        print(f"FAIL {o.name}: {o.error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([vars(o) for o in outcomes], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
