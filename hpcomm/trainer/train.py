"""hpcomm-train: the reference multimodal trainer (vision encoder + LLM, each with its own layout).

Run it:

    hpcomm-train                                   # 4 local gloo processes, colocated,
                                                   # encoder dp=4, LLM cp=2,tp=2, synthetic data
    hpcomm-train --nproc 1                         # single process, no parallelism
    hpcomm-train --encoder inherit                 # homogeneous: the encoder in the LLM's layout
    hpcomm-train --placement noncolocated --encoder "dp=2" --llm "pp=2" \
                 --micro-batches 4 --check-parity  # encoder on ranks 0-1, LLM stages on 2 and 3
    hpcomm-train --freeze-encoder --compile        # LLM-only training, compiled blocks
    hpcomm-train --compare --plot compare.png      # baseline vs heterogeneous: table and plot
    hpcomm-train --data manifest.jsonl --plot loss.png   # JSONL lines {"image": ..., "text": ...}
    torchrun --nproc-per-node 8 -m hpcomm.trainer.train --encoder "dp=8" --llm "dp=2,cp=2,tp=2"

Under torchrun the given world is used (NCCL on GPUs, gloo otherwise) and --nproc is ignored.
Colocated: the LLM on all ranks, the encoder on all ranks or (with --llm pp>1) on the LLM's first
stage's ranks only, as hpcomm-advise proposes (the encoder's degrees multiply to the world size or
to the stage's size). Non-colocated: the encoder on the first encoder-size ranks, the LLM on the
rest. docs/TRAINER.md has the details.

Each rank reads only its own samples; the next step (data, lengths exchange, layouts, transforms)
is prepared on a background thread while the current one computes. Each step prints one line
(above a progress bar when stderr is a terminal): loss, tokens/s, the share of step time in the
boundary transform (forward plus backward, mean over ranks), the worst rank's idle share (time
inside communication) and the step's wait for its preparation; rank 0 ends with a summary and a
caption the model generates for a held-out image. Killing the main process (any signal) ends the
local training processes too; --timeout bounds how long a transform waits on a peer.
--check-parity then reruns the same steps as one process without any parallelism and ends with
`parity: max |Δloss| = X over S steps` (exit status 1 if X > 1e-4).
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from hpcomm import Layout, Transform
from hpcomm import gather_lengths
from hpcomm.tools.launch import die_with_parent, free_port

from .data import (EOS, IGNORE, IMG, Batch, ManifestDataset, Sample, SyntheticDataset, decode,
                   pack, patchify, prompt, rank_share, step_indices)
from .model import AttnContext, Config, MultimodalModel, model_flops, segments
from .parallelize import (CommClock, Mesh, ParallelDims, apply_compile, attn_context, parallelize,
                          pipeline_split, reduce_grads)

PARITY_TOLERANCE = 1e-4
INHERIT = "inherit"  # --encoder inherit: the homogeneous baseline
DEFAULT_TIMEOUT = 60.0  # seconds a transform waits on its peers in hpcomm-train's processes


@dataclass
class TrainConfig:
    encoder: ParallelDims | str = ParallelDims(dp=4)  # or INHERIT: the LLM's (first stage's) layout
    llm: ParallelDims = ParallelDims(cp=2, tp=2)
    placement: str = "colocated"
    steps: int = 40
    micro_batches: int = 1
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 5
    seed: int = 0
    data: str | None = None
    freeze_encoder: bool = False
    compile: str | None = None  # a torch.compile backend ("inductor", "aot_eager"), or eager
    model: Config = field(default_factory=Config)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 1 <= self.micro_batches <= self.batch_size:
            raise ValueError(f"micro-batches ({self.micro_batches}) must be between 1 and the "
                             f"batch size ({self.batch_size} samples)")
        if self.encoder == INHERIT and self.placement != "colocated":
            raise ValueError("--encoder inherit runs the encoder on the LLM's ranks: colocated only")

    @property
    def inherit(self) -> bool:
        return self.encoder == INHERIT

    def module_ranks(self, world_size: int) -> tuple[list[int], list[int]]:
        """(encoder ranks, LLM ranks)."""
        llm = self.llm.size
        if self.inherit:
            if llm != world_size:
                raise ValueError(f"LLM {self.llm} must multiply to the world size {world_size}")
            return self.llm.stage_ranks(list(range(world_size)))[0], list(range(world_size))
        enc = self.encoder.size  # type: ignore[union-attr]  # not INHERIT
        if self.placement == "colocated":
            # The encoder spans every rank, or (pp > 1) only the ranks of the LLM's first stage,
            # as the advisor places it; with pp == 1 the two are the same ranks.
            stage = self.llm.stage.size
            if llm != world_size or enc not in (world_size, stage):
                first = f" or its first stage's {stage} ranks" if stage != world_size else ""
                raise ValueError(f"colocated: LLM {self.llm} must multiply to the world size "
                                 f"{world_size} and encoder {self.encoder} to it{first}")
            everyone = list(range(world_size))
            return (everyone if enc == world_size else self.llm.stage_ranks(everyone)[0]), everyone
        if self.placement == "noncolocated":
            if enc + llm != world_size:
                raise ValueError(f"noncolocated: encoder {self.encoder} and LLM {self.llm} sizes "
                                 f"must add up to the world size {world_size}")
            return list(range(enc)), list(range(enc, world_size))
        raise ValueError(f"unknown placement {self.placement!r} (colocated|noncolocated)")

    def describe(self) -> str:
        place = "coloc" if self.placement == "colocated" else "noncoloc"
        return (f"{place} enc {self.encoder} -> llm {self.llm}"
                + (" frozen-enc" if self.freeze_encoder else ""))


@dataclass
class MicroBatch:
    """One micro-batch as this rank sees it: global lengths (metadata only), its own rows of the
    data in each module's layout, the attention contexts and the transforms; then, while the
    step runs, its outputs and the roots backward starts from."""
    seq_lens: list[int]
    patch_counts: list[int]
    boundary: Transform | None        # None in the single-process reference
    transfers: list[Transform]        # LLM stage s -> s + 1
    enc_ctx: AttnContext | None = None
    patches: torch.Tensor | None = None
    patch_grid: torch.Tensor | None = None
    llm_ctx: AttnContext | None = None
    tokens: torch.Tensor | None = None   # this LLM stage's rows
    positions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    enc_out: torch.Tensor | None = None
    enc_root: torch.Tensor | None = None  # the boundary's output on ranks that only send into it
    llm_root: torch.Tensor | None = None  # the loss, or the output sent to the next stage
    loss: torch.Tensor | None = None


@dataclass
class PreparedStep:
    micro: list[MicroBatch]
    num_targets: int
    flops: float
    prepare_seconds: float    # building it (data, metadata, layouts, transforms), off the step


@dataclass
class StepStats:
    loss: float                 # global
    tokens: int                 # global
    seconds: float              # step time (the slowest rank)
    flops: float                # model FLOPs of the step (all ranks)
    boundary_share: float       # share of step time in boundary transforms, mean over ranks
    idle_share: list[float]     # per rank: share of step time inside communication calls
    peak_mib: list[float]       # per rank: peak memory so far
    prepare_share: float        # worst rank's wait for the prepared step, share of step time


def one_f_one_b(num_micro: int, in_flight: int) -> Iterator[tuple[str, int]]:
    """The step's schedule, the same on every rank: `in_flight` warm-up forwards, then one
    backward and one forward at a time, then the remaining backwards. in_flight = pp is 1F1B's
    warm-up of the first stage; every rank issuing its transforms in this one order is what keeps
    any placement deadlock-free."""
    for i in range(min(in_flight, num_micro)):
        yield "F", i
    for i in range(num_micro):
        yield "B", i
        if i + in_flight < num_micro:
            yield "F", i + in_flight


def call_transform(transform: Transform, x: torch.Tensor, out: torch.Tensor | None = None,
                   out_rows: torch.Tensor | None = None) -> torch.Tensor:
    """transform(x) as a function of its transform, so that one compiled graph serves them all."""
    return transform(x, out=out, out_rows=out_rows)


def grid_layout(lens: list[int], mesh: Mesh, cp_mode: str) -> Layout:
    """Packed sequences of `lens` over the mesh: whole samples per DP rank, each cut over CP
    (zigzag balances causal attention), TP ranks splitting their CP rank's rows (SP)."""
    d = mesh.dims
    return Layout.grid(lens, dp=d.dp, cp=d.cp, tp=d.tp, cp_mode=cp_mode, ranks=mesh.ranks)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


class Trainer:
    """One rank's part of the training run. world_size == 1 is the homogeneous reference: plain
    model, no process groups, no transforms (the encoder output rows already are the image rows)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 device: torch.device = torch.device("cpu"),
                 dataset: SyntheticDataset | ManifestDataset | None = None) -> None:
        if world_size == 1:
            cfg = replace(cfg, encoder=ParallelDims(), llm=ParallelDims(), placement="colocated")
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        enc_ranks, llm_ranks = cfg.module_ranks(world_size)
        # Every group of every mesh is created on every rank, in one order (new_group is collective).
        self.stage_meshes = [Mesh(cfg.llm.stage, ranks, rank)
                             for ranks in cfg.llm.stage_ranks(llm_ranks)]
        self.enc_mesh = (self.stage_meshes[0] if cfg.inherit
                         else Mesh(cfg.encoder, enc_ranks, rank))  # type: ignore[arg-type]
        # The prefetcher's metadata exchange and data transfers run beside the step's traffic, on
        # the host (data is read and packed there, also when the model runs on GPUs).
        self.meta_group = (dist.new_group(list(range(world_size)), backend="gloo")
                           if world_size > 1 else None)
        self.stage = next((s for s, m in enumerate(self.stage_meshes) if rank in m), None)
        model = MultimodalModel(cfg.model, cfg.seed).to(device)
        self.encoder = parallelize(model.encoder, self.enc_mesh) if rank in self.enc_mesh else None
        self.llm = (parallelize(pipeline_split(model.llm, self.stage, cfg.llm.pp),
                                self.stage_meshes[self.stage]) if self.stage is not None else None)
        if self.encoder is not None and cfg.freeze_encoder:
            self.encoder.requires_grad_(False)
        self.call_boundary = call_transform
        if cfg.compile:
            for module in (self.encoder, self.llm):
                if module is not None:
                    apply_compile(module, cfg.compile)
            # hpcomm's op reads its sizes from tensors: a new boundary every step, one graph
            self.call_boundary = torch.compile(call_transform, backend=cfg.compile, dynamic=True)
        trained: list[tuple[nn.Module, Mesh]] = []
        if self.llm is not None:
            trained.append((self.llm, self.stage_meshes[self.stage]))  # type: ignore[index]  # set with llm
        if self.encoder is not None and not cfg.freeze_encoder:
            trained.append((self.encoder, self.enc_mesh))
        # One optimizer per module: each owns its schedule and its gradient reduction.
        self.optimizers = [(m, mesh, torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                                       weight_decay=0.0))
                           for m, mesh in trained]
        if dataset is None:
            dataset = (ManifestDataset(cfg.data, cfg.model.patch) if cfg.data
                       else SyntheticDataset(cfg.seed, cfg.model.patch))
        self.dataset = dataset
        self.clock = CommClock()
        self.no_rows = torch.zeros(0, cfg.model.llm_dim, device=device)
        self.record_first_grads = False  # for parity checks: keep step 0's reduced gradients
        self.first_grads: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ preparing a step (prefetcher)

    def prepare(self, step: int) -> PreparedStep:
        """Read this rank's own samples of `step`, exchange their lengths (one small collective),
        and build every layout, transform and attention context of the step; move the data rows
        into the modules' layouts. Runs one step ahead, on the prefetcher thread."""
        start = time.perf_counter()
        cfg, world, patch = self.cfg, self.world_size, self.cfg.model.patch
        indices = step_indices(self.dataset, step, cfg.batch_size, cfg.micro_batches, cfg.seed)
        mine = rank_share(indices, self.rank, world)
        counts = {r: [len(part) for part in rank_share(indices, r, world)] for r in range(world)}
        local = [pack([self.dataset[i] for i in part], patch) for part in mine]
        # Per sample (text rows, patch rows), micro-batch after micro-batch, in one exchange.
        flat = [n for b in local for pair in zip(b.seq_lens, b.patch_counts) for n in pair]
        by_rank = gather_lengths(flat, group=self.meta_group) if world > 1 else {0: flat}
        offsets = {r: 0 for r in by_rank}
        micro, num_targets, flops = [], 0, 0.0
        for m in range(len(indices)):
            text_by_rank, patches_by_rank = {}, {}
            for r in sorted(by_rank):
                count = counts[r][m]
                pairs = by_rank[r][offsets[r]:offsets[r] + 2 * count]
                offsets[r] += 2 * count
                text_by_rank[r], patches_by_rank[r] = pairs[0::2], pairs[1::2]
            seq_lens = [n for r in sorted(by_rank) for n in text_by_rank[r]]
            patch_counts = [n for r in sorted(by_rank) for n in patches_by_rank[r]]
            num_targets += sum(t - p - 1 for t, p in zip(seq_lens, patch_counts))
            flops += model_flops(cfg.model, seq_lens, patch_counts, not cfg.freeze_encoder)
            micro.append(self._micro_batch(local[m], text_by_rank, patches_by_rank, seq_lens,
                                           patch_counts))
        return PreparedStep(micro, num_targets, flops, time.perf_counter() - start)

    def _micro_batch(self, local: Batch, text_by_rank: dict[int, list[int]],
                     patches_by_rank: dict[int, list[int]], seq_lens: list[int],
                     patch_counts: list[int]) -> MicroBatch:
        cfg = self.cfg
        stages = [grid_layout(seq_lens, m, "zigzag") for m in self.stage_meshes]
        offsets = torch.tensor([0] + seq_lens[:-1]).cumsum(0)
        # Sample s is BOS, IMG x patch_counts[s], caption, EOS: its image rows follow its BOS.
        image_rows = torch.cat([torch.arange(o + 1, o + 1 + n)
                                for o, n in zip(offsets.tolist(), patch_counts)])
        llm_images = stages[0].select(image_rows)
        enc = (llm_images if cfg.inherit else
               grid_layout(patch_counts, self.enc_mesh, "contiguous"))
        distributed = self.world_size > 1
        mb = MicroBatch(seq_lens, patch_counts, None, [])
        if distributed:
            # A frozen encoder takes no gradient: nothing moves backward, and its ranks skip it.
            mb.boundary = Transform(enc, llm_images,
                                    grad=None if cfg.freeze_encoder else "replicated")
            mb.transfers = [Transform(a, b) for a, b in zip(stages, stages[1:])]
        # This rank's rows of the data, moved from the ranks that read them (one transform each).
        rows = torch.stack([local.tokens, local.positions, local.targets], 1)
        pixels = torch.cat([local.patches, local.patch_grid.to(local.patches.dtype)], 1)
        if distributed:
            text = Layout.dp_by_rank(text_by_rank)
            with torch.no_grad():
                stage_rows = [Transform(text, layout, group=self.meta_group)(rows)
                              for layout in stages]
                pixels = Transform(Layout.dp_by_rank(patches_by_rank), enc,
                                   group=self.meta_group)(pixels)
        else:
            stage_rows = [rows]
        if self.encoder is not None:
            seq_of_row = torch.repeat_interleave(torch.tensor(patch_counts, dtype=torch.int64))
            mb.enc_ctx = attn_context(enc, self.enc_mesh, seq_of_row, False,
                                      self.clock).to(self.device)
            pixels = pixels.to(self.device)
            mb.patches, mb.patch_grid = pixels[:, :-2], pixels[:, -2:].long()
        if self.stage is not None:
            seq_of_row = torch.repeat_interleave(torch.tensor(seq_lens, dtype=torch.int64))
            mb.llm_ctx = attn_context(stages[self.stage], self.stage_meshes[self.stage],
                                      seq_of_row, True, self.clock).to(self.device)
            mb.tokens, mb.positions, mb.targets = stage_rows[self.stage].to(self.device).unbind(1)
        return mb

    # ------------------------------------------------------------ one optimizer step

    def _encode(self, mb: MicroBatch) -> torch.Tensor | None:
        """This rank's encoder output rows (once per micro-batch; None off the encoder)."""
        if self.encoder is not None and mb.enc_out is None:
            with torch.set_grad_enabled(not self.cfg.freeze_encoder):
                mb.enc_out = self.encoder(mb.patches, mb.patch_grid, mb.enc_ctx)
        return mb.enc_out

    def _forward(self, mb: MicroBatch, num_targets: int) -> None:
        x = self._encode(mb)
        llm = self.llm
        h = llm.embed(mb.tokens) if llm is not None and self.stage == 0 else None  # type: ignore[arg-type]
        image_pos = (mb.tokens == IMG).nonzero()[:, 0] if h is not None else None  # type: ignore[union-attr]
        if mb.boundary is None:  # one process: the encoder rows already are the image rows
            h = h.index_put((image_pos,), x)  # type: ignore[union-attr,arg-type]
        elif self.rank in mb.boundary.ranks:
            src = x if x is not None else self.no_rows
            boundary = self.clock.wrap("boundary", partial(self.call_boundary, mb.boundary))
            if h is None:
                y = boundary(src)  # this rank only sends; backward starts here (unless frozen)
                mb.enc_root = y if y.requires_grad else None
            else:  # written straight into this rank's image rows; the others keep their history
                h = boundary(src, out=h, out_rows=image_pos)
        if llm is None:
            return
        if self.stage > 0:  # type: ignore[operator]
            h = self.clock.wrap("pipeline", mb.transfers[self.stage - 1])(self.no_rows)  # type: ignore[operator]
        out = llm(h, mb.positions, mb.llm_ctx)
        if self.stage < len(self.stage_meshes) - 1:  # type: ignore[operator]
            mb.llm_root = self.clock.wrap("pipeline", mb.transfers[self.stage])(out)  # type: ignore[index]
        else:  # this rank's share of the step loss: summed CE over its rows / all targets
            mb.loss = mb.llm_root = F.cross_entropy(out, mb.targets, ignore_index=IGNORE,  # type: ignore[arg-type]  # set on LLM ranks
                                                    reduction="sum") / num_targets

    def _backward(self, mbs: list[MicroBatch], i: int) -> None:
        mb, ahead = mbs[i], i + self.cfg.llm.pp
        if self.llm is None and ahead < len(mbs):
            self._encode(mbs[ahead])  # encoder-only ranks compute the next forward while waiting
        for root in (mb.llm_root, mb.enc_root):
            if root is not None:
                torch.autograd.backward(root, None if root is mb.loss else torch.zeros_like(root))

    def step(self, step: int, prepared: PreparedStep, wait_seconds: float = 0.0) -> StepStats:
        cfg = self.cfg
        start = time.perf_counter() - wait_seconds
        self.clock.seconds.clear()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for _, _, opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
        mbs = prepared.micro
        for kind, i in one_f_one_b(len(mbs), cfg.llm.pp):
            if kind == "F":
                self._forward(mbs[i], prepared.num_targets)
            else:
                self._backward(mbs, i)
        skipped = self.clock.pending_backward()
        if skipped:  # fail here rather than wait in the gradient all-reduce while peers hang
            raise RuntimeError(
                f"rank {self.rank}, step {step}: the backward of transform calls "
                f"{skipped} never ran on this rank (their outputs reach no loss or root here), "
                f"so the peers of those transforms wait for this rank forever")
        reduce_start = time.perf_counter()
        for module, mesh, opt in self.optimizers:
            reduce_grads(module, mesh)
        self.clock.seconds["grads"] += time.perf_counter() - reduce_start
        if step == 0 and self.record_first_grads:
            # reduce_grads gave every trained parameter a gradient
            self.first_grads = {name: p.grad.clone() for name, p in self.named_parameters()
                                if p.grad is not None}
        for _, _, opt in self.optimizers:
            opt.step()
        seconds = time.perf_counter() - start
        loss = sum(float(mb.loss.detach()) for mb in mbs if mb.loss is not None)
        mine = torch.tensor([loss, seconds, self.clock.seconds["boundary"] / seconds,
                             sum(self.clock.seconds.values()) / seconds,
                             peak_memory_mib(self.device), wait_seconds / seconds],
                            dtype=torch.float64)
        every = [mine]
        if self.world_size > 1:
            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine)
        table = torch.stack(every)
        return StepStats(float(table[:, 0].sum()), sum(sum(mb.seq_lens) for mb in mbs),
                         float(table[:, 1].max()), prepared.flops, float(table[:, 2].mean()),
                         table[:, 3].tolist(), table[:, 4].tolist(), float(table[:, 5].max()))

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of the modules this rank holds, named as in MultimodalModel."""
        for prefix, module in (("encoder.", self.encoder), ("llm.", self.llm)):
            if module is not None:
                yield from ((prefix + name, p) for name, p in module.named_parameters())

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The unsharded weights, on rank 0 (None elsewhere): TP shards concatenated in TP
        order, pipeline stages and modules merged (a collective)."""
        mine = {name: (p.detach().cpu(), getattr(p, "tp_shard", None))
                for name, p in self.named_parameters()}
        if self.world_size == 1:
            return {name: t for name, (t, _) in mine.items()}
        every: list[Any] = [None] * self.world_size if self.rank == 0 else []
        dist.gather_object(mine, every if self.rank == 0 else None, dst=0)
        if self.rank != 0:
            return None
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        dims: dict[str, int] = {}
        for part in every:
            for name, (tensor, shard) in part.items():
                index = shard[1] if shard else 0
                pieces.setdefault(name, {})[index] = tensor
                if shard:
                    dims[name] = shard[0]
        return {name: torch.cat([by_index[k] for k in sorted(by_index)], dims[name])
                if name in dims else by_index[0] for name, by_index in pieces.items()}


class Prefetcher:
    """Prepares step t + 1 on a background thread while step t computes; get() returns the next
    prepared step and how long the caller waited for it."""

    def __init__(self, trainer: Trainer, steps: int) -> None:
        self._ready: queue.Queue[PreparedStep | BaseException] = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._run, args=(trainer, steps), daemon=True)
        self._thread.start()

    def _run(self, trainer: Trainer, steps: int) -> None:
        try:
            for step in range(steps):
                self._ready.put(trainer.prepare(step))
        except BaseException as e:  # re-raised on the training thread
            self._ready.put(e)

    def get(self) -> tuple[PreparedStep, float]:
        start = time.perf_counter()
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item, time.perf_counter() - start


def grad_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
               params: Iterable[tuple[str, nn.Parameter]]) -> torch.Tensor:
    """[encoder, llm]: max |grad - reference grad| over this rank's (sharded) parameters, and the
    max |reference grad| over the same elements (to state the error relative to the scale).
    Frozen parameters have no gradient on either side and are skipped."""
    error = torch.zeros(2, 2)
    for name, p in params:
        if name not in reference:
            continue
        ref = reference[name]
        if hasattr(p, "tp_shard"):
            dim, index, parts = p.tp_shard
            ref = ref.tensor_split(parts, dim)[index]
        i = 0 if name.startswith("encoder.") else 1
        error[i, 0] = max(error[i, 0], (grads[name] - ref).abs().max().item())
        error[i, 1] = max(error[i, 1], ref.abs().max().item())
    return error


def generate(model: MultimodalModel, sample: Sample, patch: int, max_new: int = 40) -> str:
    """Greedy decoding of a caption for sample.image with the unsharded model."""
    patches, grid = patchify(sample.image, patch)
    n = len(patches)
    every = torch.arange(n)
    with torch.no_grad():
        image = model.encoder(patches, grid, AttnContext(segments(every, every, every * 0, False)))
        tokens = prompt(n)
        for _ in range(max_new):
            rows = torch.arange(len(tokens))
            h = model.llm.embed(torch.tensor(tokens)).index_put((rows[1:1 + n],), image)
            logits = model.llm(h, rows, AttnContext(segments(rows, rows, rows * 0, True)))
            token = int(logits[-1].argmax())
            if token == EOS:
                break
            tokens.append(token)
    return decode(tokens[1 + n:])


def train(cfg: TrainConfig, rank: int = 0, world_size: int = 1,
          device: torch.device = torch.device("cpu"), check_parity: bool = False,
          plot: str | None = None, progress: bool = True,
          dataset: SyntheticDataset | ManifestDataset | None = None) -> dict[str, Any]:
    """Run cfg.steps steps on this rank; on rank 0 print one line per step and a summary. With
    check_parity, rank 0 then reruns the steps in one process and every rank compares its
    first-step gradients. Returns {"losses", "step_seconds", "tokens", "flops" (per step),
    "boundary_share", "prepare_share" (the wait for the prepared step), "build_share" (building
    it, in the background; shares of step time, means), "idle_share", "peak_mib" (per rank)};
    with check_parity also "reference" (losses), "loss_error"
    (max |Δloss|) and "grad_error" ({"encoder": e, "llm": e}, first-step max |Δgrad| / max |grad|
    over all ranks)."""
    from tqdm import tqdm

    trainer = Trainer(cfg, rank, world_size, device, dataset)
    trainer.record_first_grads = check_parity
    prefetcher = Prefetcher(trainer, cfg.steps)
    history: list[StepStats] = []
    build: list[float] = []  # this rank's time building each step, in the background
    log = rank == 0 and progress
    # A bar only on a terminal: in a pipe or a file its redraws are carriage returns and stale
    # copies; there each step is one line. (Not even a disabled bar elsewhere: it would take a
    # multiprocessing lock, reported as leaked when the process is killed.)
    bar = tqdm(total=cfg.steps, desc="train", leave=False) if log and sys.stderr.isatty() else None
    for step in range(cfg.steps):
        prepared, waited = prefetcher.get()
        stats = trainer.step(step, prepared, waited)
        history.append(stats)
        build.append(prepared.prepare_seconds / stats.seconds)
        if log:
            line = (f"step {step:4d} | loss {stats.loss:7.4f} | "
                    f"{stats.tokens / stats.seconds:9,.0f} tok/s | "
                    f"boundary {stats.boundary_share:6.1%} | "
                    f"idle {max(stats.idle_share):6.1%} (worst rank) | "
                    f"prepare {stats.prepare_share:5.1%} of {stats.seconds * 1e3:6.1f} ms")
            if bar:
                bar.write(line)  # above the bar
                bar.update()
            else:
                print(line, flush=True)  # a log shows each step as it ends, not at exit
    if bar:
        bar.close()
    # The first step pays for warm-up (and compilation): means are over the others.
    steady = history[1:] or history
    result: dict[str, Any] = {
        "losses": [s.loss for s in history], "step_seconds": [s.seconds for s in history],
        "tokens": [s.tokens for s in history], "flops": [s.flops for s in history],
        "boundary_share": sum(s.boundary_share for s in steady) / len(steady),
        "prepare_share": sum(s.prepare_share for s in steady) / len(steady),
        "idle_share": [sum(v) / len(steady) for v in zip(*(s.idle_share for s in steady))],
        "build_share": sum(build[1:] or build) / len(steady),
        "peak_mib": history[-1].peak_mib}
    if progress:
        state = trainer.full_state()  # collective
        if rank == 0:
            _summary(cfg, result, world_size, state, trainer.dataset)
    if check_parity:
        reference: list[Any] = [None, None]  # [losses, first-step grads], broadcast from rank 0
        if rank == 0:
            ref = Trainer(cfg, device=device, dataset=dataset)
            ref.record_first_grads = True
            ref_losses = [ref.step(step, ref.prepare(step)).loss for step in range(cfg.steps)]
            reference = [ref_losses, {k: v.cpu() for k, v in ref.first_grads.items()}]
        if world_size > 1:
            dist.broadcast_object_list(reference, src=0)
        ref_losses, ref_grads = reference
        errors = grad_error(trainer.first_grads, {k: v.to(device) for k, v in ref_grads.items()},
                            trainer.named_parameters()).to(device)
        if world_size > 1:
            dist.all_reduce(errors, op=dist.ReduceOp.MAX)
        relative = (errors[:, 0] / errors[:, 1].clamp_min(torch.finfo(errors.dtype).tiny)).tolist()
        result.update(reference=ref_losses,
                      loss_error=max(abs(a - b) for a, b in zip(result["losses"], ref_losses)),
                      grad_error={"encoder": relative[0], "llm": relative[1]})
        if rank == 0 and progress:
            print(f"parity: first-step max |Δgrad| / max |grad|: encoder {relative[0]:.2e}, "
                  f"llm {relative[1]:.2e}")
            print(f"parity: max |Δloss| = {result['loss_error']:.3e} over {cfg.steps} steps")
    if plot and rank == 0:
        _plot(plot, result, cfg)
    return result


def _summary(cfg: TrainConfig, result: dict[str, Any], world_size: int,
             state: dict[str, torch.Tensor] | None, dataset: SyntheticDataset | ManifestDataset
             ) -> None:
    steady = slice(1, None) if len(result["losses"]) > 1 else slice(None)
    seconds = sum(result["step_seconds"][steady])
    tokens, flops = sum(result["tokens"][steady]), sum(result["flops"][steady])
    losses = result["losses"]
    print(f"{cfg.describe()} on {world_size} rank(s): {len(losses)} steps, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"  {tokens / seconds:,.0f} tok/s, {flops / seconds / world_size / 1e9:.2f} GFLOP/s per "
          f"rank; boundary {result['boundary_share']:.1%} of step time; idle per rank "
          + " ".join(f"{v:.0%}" for v in result["idle_share"]))
    print(f"  preparing a step (data, lengths, layouts, transforms): "
          f"{result['build_share']:.1%} of a step in the background, "
          f"{result['prepare_share']:.1%} on the critical path")
    model = MultimodalModel(cfg.model, cfg.seed)
    model.load_state_dict(state)  # type: ignore[arg-type]  # rank 0 holds the whole state
    # The synthetic task never repeats a sample; a manifest has no held-out split.
    sample = dataset[cfg.steps * cfg.batch_size]
    what = "caption of an image from the manifest" if cfg.data else "sample caption"
    # A small model after a short run gets captions partly wrong: say so, lest it read as a bug.
    print(f"  {what} after {cfg.steps} steps (a short run: expect it to be partly wrong): "
          f"{generate(model, sample, cfg.model.patch)!r} (true: {sample.text!r})")
    sys.stdout.flush()


def _plot(path: str, result: dict[str, Any], cfg: TrainConfig) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 11}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(result["losses"], marker=".", label="parallel")
        if "reference" in result:
            ax.plot(result["reference"], "--", label="single-process reference")
        loss_axes(ax, f"training loss: {cfg.describe()}", "loss (cross-entropy per target token)")
        save_figure(fig, path, "the loss curve")


def loss_axes(ax: Any, title: str, ylabel: str) -> None:
    """Loss curves' axes: whole-number steps, labels, a grid and the legend."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()


def save_figure(fig: Any, path: str, what: str) -> None:
    """Write a figure and say where (a command that writes a file says so)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {what} to {path}")


# ---------------------------------------------------------------- processes

def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _bound_worker(rank: int, parent_pid: int, fn: Callable[..., None], *args: Any) -> None:
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent alone handles it, and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fn(rank, *args)


def run_workers(fn: Callable[..., None], nprocs: int, *args: Any) -> None:
    """mp.spawn(fn, args, nprocs) with workers that never outlive this process: they end when it
    ends, even by SIGKILL, and SIGINT (KeyboardInterrupt) or SIGTERM (SystemExit(143)) here kill
    them before the exception leaves; a failed worker raises as in mp.spawn. fn must be picklable
    (module level). Call it from the main thread (it handles SIGTERM while the workers run)."""
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    context = mp.start_processes(_bound_worker, args=(os.getpid(), fn, *args), nprocs=nprocs,
                                 join=False)
    try:
        while not context.join():
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in context.processes:
            if p.is_alive():
                p.kill()
            p.join()


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hpcomm-train", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=4,
                   help="local processes when not under torchrun (default: %(default)s)")
    p.add_argument("--encoder", default="dp=4", help='encoder degrees, e.g. "dp=2,tp=2", or '
                   '"inherit" (the LLM\'s layout) (default: %(default)s)')
    p.add_argument("--llm", default="cp=2,tp=2",
                   help='LLM degrees, e.g. "dp=1,cp=2,tp=2,pp=2" (default: %(default)s)')
    p.add_argument("--placement", default="colocated", choices=("colocated", "noncolocated"),
                   help="colocated: the LLM on every rank, the encoder on every rank or (LLM pp>1, "
                   "encoder degrees multiplying to one stage's size) on the LLM's first stage's "
                   "ranks; noncolocated: the encoder on the first ranks, the LLM on the rest "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps,
                   help="training steps (default: %(default)s)")
    p.add_argument("--micro-batches", type=int, default=TrainConfig.micro_batches,
                   help="micro-batches per step (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help="samples per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=TrainConfig.seed,
                   help="seed of the weights and the data (default: %(default)s)")
    p.add_argument("--data", default=None,
                   help="JSONL manifest (default: the synthetic shapes task)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the LLM only (no encoder gradients, no boundary backward)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the blocks with BACKEND, inductor if none is given "
                   "(default: eager, nothing compiled)")
    p.add_argument("--plot", default=None, help="write the loss curve (with --compare: throughput "
                   "bars and loss curves) to this PNG")
    p.add_argument("--check-parity", action="store_true",
                   help="compare against a single-process run of the same steps")
    p.add_argument("--compare", action="store_true",
                   help="run the homogeneous baseline and a colocated and a non-colocated "
                   "heterogeneous configuration, and print one table")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a transform waits on its peers before it fails instead of "
                   "hanging (sets HPCOMM_TIMEOUT for the training processes; default: "
                   f"$HPCOMM_TIMEOUT if set, else {DEFAULT_TIMEOUT:g})")
    args = p.parse_args(argv)
    if args.timeout is not None and not args.timeout > 0:
        p.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(encoder=(INHERIT if args.encoder == INHERIT
                                else ParallelDims.parse(args.encoder)),
                       llm=ParallelDims.parse(args.llm), placement=args.placement,
                       steps=args.steps, micro_batches=args.micro_batches,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, data=args.data,
                       freeze_encoder=args.freeze_encoder, compile=args.compile)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    try:  # bad degrees fail here, with a usage message, before any process is started
        cfg = config_from_args(args)
        world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc
        if args.compare:  # checks every configuration it will run
            from .compare import compare_configs
            configs = compare_configs(cfg, world_size)
        else:
            if world_size == 1:  # one process: the homogeneous model, whatever the degrees say
                cfg = replace(cfg, encoder=ParallelDims(), llm=ParallelDims(),
                              placement="colocated")
            cfg.module_ranks(world_size)
    except ValueError as e:
        print(f"hpcomm-train: error: {e}", file=sys.stderr)
        return 2
    # A peer that died or diverged fails the run with an error instead of hanging it. Set before
    # any transform is built; the local training processes inherit it.
    if args.timeout is not None:
        os.environ["HPCOMM_TIMEOUT"] = f"{args.timeout:g}"
    else:
        os.environ.setdefault("HPCOMM_TIMEOUT", f"{DEFAULT_TIMEOUT:g}")
    # Local CPU runs use one intra-op thread per process: the matrices are tiny, and OpenMP
    # threads spinning against the other processes on a small machine cost up to 50x.
    torch.set_num_threads(1)
    try:
        if args.compare:
            from .compare import compare, format_table, plot_comparison
            rows = compare(configs, world_size, progress=True)
            print(format_table(rows))
            if args.plot:
                plot_comparison(rows, args.plot)
            return 0
        if torchrun:
            return _torchrun(cfg, args)
        if args.nproc == 1:
            result = train(cfg, check_parity=args.check_parity, plot=args.plot)
            return 1 if args.check_parity and result["loss_error"] > PARITY_TOLERANCE else 0
        run_workers(_worker, args.nproc, args.nproc, free_port(), cfg, args)
    except mp.ProcessExitedException as e:
        return e.exit_code or 1
    except KeyboardInterrupt:
        print("hpcomm-train: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def _torchrun(cfg: TrainConfig, args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
