"""hpcomm-train: the reference multimodal trainer (vision encoder + LLM, each with its own layout).

Run it:

    hpcomm-train                                   # 4 local gloo processes, colocated,
                                                   # encoder dp=4, LLM cp=2,tp=2, synthetic data
    hpcomm-train --nproc 1                         # single process, no parallelism
    hpcomm-train --placement noncolocated --encoder "cp=2" --llm "dp=1,cp=1,tp=2" \
                 --micro-batches 4 --check-parity  # encoder on ranks 0-1, LLM on ranks 2-3
    hpcomm-train --data manifest.jsonl --plot loss.png   # JSONL lines {"image": ..., "text": ...}
    torchrun --nproc-per-node 8 -m hpcomm.trainer.train --encoder "dp=8" --llm "dp=2,cp=2,tp=2"

Under torchrun the given world is used (NCCL on GPUs, gloo otherwise) and --nproc is ignored.
Colocated: both modules on all ranks, each degree product equals the world size. Non-colocated:
the encoder on the first encoder-size ranks, the LLM on the rest.

Each step prints loss, tokens/s and the share of step time spent in the boundary transform (forward
plus backward, averaged over ranks, including waiting for peers). --check-parity then reruns the same
steps as one process without any parallelism and ends with `parity: max |Δloss| = X over S steps`
(exit status 1 if X > 1e-4).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hpcomm import Layout, Transform

from .data import IGNORE, IMG, Batch, ManifestDataset, SyntheticDataset, micro_batches
from .model import AttnContext, Config, MultimodalModel
from .parallelize import Mesh, ParallelDims, attn_context, parallelize, reduce_grads

PARITY_TOLERANCE = 1e-4


@dataclass
class TrainConfig:
    encoder: ParallelDims = ParallelDims(dp=4)
    llm: ParallelDims = ParallelDims(cp=2, tp=2)
    placement: str = "colocated"
    steps: int = 40
    micro_batches: int = 1
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 5
    seed: int = 0
    data: str | None = None
    model: Config = field(default_factory=Config)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 1 <= self.micro_batches <= self.batch_size:
            raise ValueError(f"micro-batches ({self.micro_batches}) must be between 1 and the "
                             f"batch size ({self.batch_size} samples)")

    def module_ranks(self, world_size: int) -> tuple[list[int], list[int]]:
        enc, llm = self.encoder.size, self.llm.size
        if self.placement == "colocated":
            if enc != world_size or llm != world_size:
                raise ValueError(f"colocated: encoder {self.encoder} and LLM {self.llm} must each "
                                 f"multiply to the world size {world_size}")
            return list(range(world_size)), list(range(world_size))
        if self.placement == "noncolocated":
            if enc + llm != world_size:
                raise ValueError(f"noncolocated: encoder {self.encoder} and LLM {self.llm} sizes "
                                 f"must add up to the world size {world_size}")
            return list(range(enc)), list(range(enc, world_size))
        raise ValueError(f"unknown placement {self.placement!r} (colocated|noncolocated)")


@dataclass
class MicroBatch:
    batch: Batch
    enc_layout: Layout
    llm_layout: Layout
    boundary: Transform | None  # None in the single-process reference


@dataclass
class StepStats:
    loss: float            # global
    tokens: int            # global
    seconds: float         # this rank's step time
    boundary_share: float  # share of step time in boundary transforms, mean over ranks


class Trainer:
    """One rank's part of the training run. world_size == 1 is the homogeneous reference: plain
    model, no process groups, no transforms (the encoder output rows already are the image rows)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu")) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        if world_size == 1:
            cfg = replace(cfg, encoder=ParallelDims(), llm=ParallelDims(), placement="colocated")
        enc_ranks, llm_ranks = cfg.module_ranks(world_size)
        self.enc_mesh = Mesh(cfg.encoder, enc_ranks, rank)
        self.llm_mesh = Mesh(cfg.llm, llm_ranks, rank)
        model = MultimodalModel(cfg.model, cfg.seed).to(device)
        self.encoder = parallelize(model.encoder, self.enc_mesh) if rank in self.enc_mesh else None
        self.llm = parallelize(model.llm, self.llm_mesh) if rank in self.llm_mesh else None
        # One optimizer per module: each owns its schedule and its gradient reduction.
        self.optimizers = [(m, mesh, torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                                       weight_decay=0.0))
                           for m, mesh in ((self.encoder, self.enc_mesh), (self.llm, self.llm_mesh))
                           if m is not None]
        self.dataset = (ManifestDataset(cfg.data, cfg.model.patch) if cfg.data
                        else SyntheticDataset(cfg.seed, cfg.model.patch))
        self.boundary_seconds = 0.0
        self.record_first_grads = False  # for parity checks: keep step 0's reduced gradients
        self.first_grads: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ per micro-batch pieces

    def _plan(self, batch: Batch) -> MicroBatch:
        enc = Layout.grid(batch.patch_counts, **vars(self.enc_mesh.dims), cp_mode="contiguous",
                          ranks=self.enc_mesh.ranks)
        llm = Layout.grid(batch.seq_lens, **vars(self.llm_mesh.dims), cp_mode="zigzag",
                          ranks=self.llm_mesh.ranks)
        # Encoder rows are the image tokens in order of appearance: row i -> image_rows[i].
        boundary = Transform(enc, llm.select(batch.image_rows)) if self.world_size > 1 else None
        return MicroBatch(batch, enc, llm, boundary)

    def _encode(self, mb: MicroBatch) -> torch.Tensor:
        """Encoder output rows of this rank (zero rows on LLM-only ranks)."""
        if self.encoder is None:
            return torch.zeros(0, self.cfg.model.llm_dim, device=self.device)
        batch, mesh = mb.batch, self.enc_mesh
        seq_of_row = torch.repeat_interleave(torch.tensor(batch.patch_counts))
        ctx = attn_context(mb.enc_layout, mesh, seq_of_row, self.encoder.causal)
        rows = mb.enc_layout.rows(self.rank)
        return self.encoder(batch.patches[rows].to(self.device),
                            batch.patch_grid[rows].to(self.device), self._on_device(ctx))

    def _boundary(self, mb: MicroBatch, x: torch.Tensor, out: torch.Tensor | None = None,
                  out_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder rows -> this rank's image rows of the LLM layout, written into `out` at
        `out_rows` on LLM ranks. Times forward and (through autograd node hooks) backward."""
        if mb.boundary is None:  # single process: the rows already are in order
            return x if out is None else out.index_put((out_rows,), x)
        start = time.perf_counter()
        y = mb.boundary(x, out=out, out_rows=out_rows)
        self.boundary_seconds += time.perf_counter() - start
        if y.grad_fn is not None:
            started: list[float] = []
            y.grad_fn.register_prehook(lambda grads: started.append(time.perf_counter()))
            y.grad_fn.register_hook(lambda grads_in, grads_out: self._add_boundary_time(started))
        return y

    def _add_boundary_time(self, started: list[float]) -> None:
        self.boundary_seconds += time.perf_counter() - started[0]

    def _llm_loss(self, mb: MicroBatch, x: torch.Tensor, num_targets: int) -> torch.Tensor:
        """This rank's share of the step loss: summed CE over its rows / the step's target count."""
        batch, mesh = mb.batch, self.llm_mesh
        seq_of_row = torch.repeat_interleave(torch.tensor(batch.seq_lens))
        # called on LLM ranks only: self.llm is not None
        ctx = attn_context(mb.llm_layout, mesh, seq_of_row, self.llm.causal)  # type: ignore[union-attr]
        rows = mb.llm_layout.rows(self.rank)
        tokens = batch.tokens[rows].to(self.device)
        # The transform delivers this rank's image rows in its local row order.
        h = self._boundary(mb, x, out=self.llm.embed(tokens), out_rows=(tokens == IMG).nonzero()[:, 0])  # type: ignore[union-attr]
        logits = self.llm(h, batch.positions[rows].to(self.device), self._on_device(ctx))  # type: ignore[misc]
        return F.cross_entropy(logits, batch.targets[rows].to(self.device), ignore_index=IGNORE,
                               reduction="sum") / num_targets

    def _on_device(self, ctx: AttnContext) -> AttnContext:
        return replace(ctx, mask=ctx.mask.to(self.device))

    # ------------------------------------------------------------ one optimizer step

    def step(self, step: int) -> StepStats:
        cfg = self.cfg
        start = time.perf_counter()
        self.boundary_seconds = 0.0
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for _, _, opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        batches = micro_batches(self.dataset, step, cfg.batch_size, cfg.micro_batches,
                                cfg.model.patch, cfg.seed)
        num_targets = sum(b.num_targets for b in batches)
        mbs = [self._plan(batch) for batch in batches]
        loss = torch.zeros((), device=self.device)
        if self.llm is not None:
            for mb in mbs:
                mb_loss = self._llm_loss(mb, self._encode(mb), num_targets)
                mb_loss.backward()
                loss += mb_loss.detach()
        else:
            # Encoder-only ranks run one micro-batch ahead: encode i+1 while the LLM ranks work on
            # i, then take i's gradients back. Both sides issue the transforms in the order fwd 0,
            # bwd 0, fwd 1, bwd 1, ..., so any number of micro-batches is deadlock-free.
            y = self._boundary(mbs[0], self._encode(mbs[0]))
            for i in range(len(mbs)):
                ahead = self._encode(mbs[i + 1]) if i + 1 < len(mbs) else None
                torch.autograd.backward(y, torch.zeros_like(y))  # y has zero rows here
                if ahead is not None:
                    y = self._boundary(mbs[i + 1], ahead)
        for module, mesh, opt in self.optimizers:
            reduce_grads(module, mesh)
        if step == 0 and self.record_first_grads:
            # reduce_grads gave every parameter a gradient
            self.first_grads = {name: p.grad.clone() for name, p in self.named_parameters()}  # type: ignore[union-attr]
        for _, _, opt in self.optimizers:
            opt.step()
        seconds = time.perf_counter() - start
        stats = torch.tensor([loss.item(), self.boundary_seconds / seconds], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(stats)
        return StepStats(stats[0].item(), sum(len(b.tokens) for b in batches), seconds,
                         stats[1].item() / self.world_size)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of the modules this rank holds, named as in MultimodalModel."""
        for prefix, module in (("encoder.", self.encoder), ("llm.", self.llm)):
            if module is not None:
                yield from ((prefix + name, p) for name, p in module.named_parameters())


def grad_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
               params: Iterable[tuple[str, nn.Parameter]]) -> torch.Tensor:
    """[encoder, llm]: max |grad - reference grad| over this rank's (sharded) parameters, and the
    max |reference grad| over the same elements (to state the error relative to the scale)."""
    error = torch.zeros(2, 2)
    for name, p in params:
        ref = reference[name]
        if hasattr(p, "tp_shard"):
            dim, index, parts = p.tp_shard
            ref = ref.tensor_split(parts, dim)[index]
        i = 0 if name.startswith("encoder.") else 1
        error[i, 0] = max(error[i, 0], (grads[name] - ref).abs().max().item())
        error[i, 1] = max(error[i, 1], ref.abs().max().item())
    return error


def train(cfg: TrainConfig, rank: int = 0, world_size: int = 1,
          device: torch.device = torch.device("cpu"), check_parity: bool = False,
          plot: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run cfg.steps steps on this rank; on rank 0 print one line per step. With check_parity,
    rank 0 then reruns the steps in one process and every rank compares its first-step gradients.
    Returns {"losses": [...]}, with check_parity also "reference" (losses), "loss_error" (max
    |Δloss|) and "grad_error" ({"encoder": e, "llm": e}, first-step max |Δgrad| / max |grad| over
    all ranks)."""
    from tqdm import tqdm

    trainer = Trainer(cfg, rank, world_size, device)
    trainer.record_first_grads = check_parity
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), disable=rank != 0 or not progress, desc="train", leave=False)
    for step in bar:
        stats = trainer.step(step)
        losses.append(stats.loss)
        if rank == 0 and progress:
            bar.write(f"step {step:4d} | loss {stats.loss:7.4f} | "
                      f"{stats.tokens / stats.seconds:9,.0f} tok/s | "
                      f"boundary {stats.boundary_share:6.1%} of {stats.seconds * 1e3:6.1f} ms")
    bar.close()
    result: dict[str, Any] = {"losses": losses}
    if check_parity:
        reference: list[Any] = [None, None]  # [losses, first-step grads], broadcast from rank 0
        if rank == 0:
            ref = Trainer(cfg, device=device)
            ref.record_first_grads = True
            ref_losses = [ref.step(step).loss for step in range(cfg.steps)]
            reference = [ref_losses, {k: v.cpu() for k, v in ref.first_grads.items()}]
        if world_size > 1:
            dist.broadcast_object_list(reference, src=0)
        ref_losses, ref_grads = reference
        errors = grad_error(trainer.first_grads, {k: v.to(device) for k, v in ref_grads.items()},
                            trainer.named_parameters()).to(device)
        if world_size > 1:
            dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        relative = (errors[:, 0] / errors[:, 1]).tolist()
        result.update(reference=ref_losses,
                      loss_error=max(abs(a - b) for a, b in zip(losses, ref_losses)),
                      grad_error={"encoder": relative[0], "llm": relative[1]})
        if rank == 0 and progress:
            print(f"parity: first-step max |Δgrad| / max |grad|: encoder {relative[0]:.2e}, "
                  f"llm {relative[1]:.2e}")
            print(f"parity: max |Δloss| = {result['loss_error']:.3e} over {cfg.steps} steps")
    if plot and rank == 0:
        _plot(plot, result)
    return result


def _plot(path: str, result: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["losses"], label="parallel")
    if "reference" in result:
        ax.plot(result["reference"], "--", label="single-process reference")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- processes

def _worker(rank: int, world_size: int, port: int, cfg: TrainConfig, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # see main()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = train(cfg, rank, world_size, check_parity=args.check_parity, plot=args.plot)
    finally:
        dist.destroy_process_group()
    if args.check_parity and rank == 0 and result["loss_error"] > PARITY_TOLERANCE:
        sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpcomm-train", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="local processes when not under torchrun")
    p.add_argument("--encoder", default="dp=4", help='encoder degrees, e.g. "dp=2,tp=2"')
    p.add_argument("--llm", default="cp=2,tp=2", help='LLM degrees, e.g. "dp=1,cp=2,tp=2"')
    p.add_argument("--placement", default="colocated", choices=("colocated", "noncolocated"))
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--micro-batches", type=int, default=TrainConfig.micro_batches)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="samples per step")
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--data", default=None, help="JSONL manifest; default: synthetic shapes task")
    p.add_argument("--plot", default=None, help="write the loss curve to this image")
    p.add_argument("--check-parity", action="store_true",
                   help="compare against a single-process run of the same steps")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:  # bad degrees fail here, with a usage message, before any process is started
        cfg = TrainConfig(encoder=ParallelDims.parse(args.encoder), llm=ParallelDims.parse(args.llm),
                          placement=args.placement, steps=args.steps,
                          micro_batches=args.micro_batches, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, data=args.data)
        world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc
        if world_size == 1:  # one process: the homogeneous model, whatever the degrees say
            cfg = replace(cfg, encoder=ParallelDims(), llm=ParallelDims(), placement="colocated")
        cfg.module_ranks(world_size)
    except ValueError as e:
        print(f"hpcomm-train: error: {e}", file=sys.stderr)
        return 2
    if torchrun:
        cuda = torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        try:
            result = train(cfg, rank, world_size, device, args.check_parity, args.plot)
        finally:
            dist.destroy_process_group()
        failed = args.check_parity and rank == 0 and result["loss_error"] > PARITY_TOLERANCE
        return 1 if failed else 0
    # Local CPU runs use one intra-op thread per process: the matrices are tiny, and OpenMP
    # threads spinning against the other processes on a small machine cost up to 50x.
    torch.set_num_threads(1)
    if args.nproc == 1:
        result = train(cfg, check_parity=args.check_parity, plot=args.plot)
        return 1 if args.check_parity and result["loss_error"] > PARITY_TOLERANCE else 0
    try:
        mp.spawn(_worker, args=(args.nproc, free_port(), cfg, args), nprocs=args.nproc)
    except mp.ProcessExitedException as e:
        return e.exit_code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
