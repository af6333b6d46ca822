"""Loss and gradient parity of the parallel trainer against its single-process reference, on one
reused 4-process gloo world. Each config trains a few steps; rank 0 then reruns them in one process
and every rank compares its first-step gradient shards (after the DP/CP/TP-SP reductions). The
configs cover both placements, LLM pipeline parallelism (1F1B over micro-batches), the homogeneous
baseline (encoder in the LLM's layout), a frozen encoder and torch.compile; every run reads its
data per rank (each rank its own samples, lengths exchanged, rows moved by transforms).

Tolerances: fp32 throughout; sharding only reorders sums (TP partial sums, CP/DP gradient
reductions), which moves results by a few ulp, so first-step gradients agree to ~1e-7 relative and
losses over a few AdamW steps to well under the CLI's 1e-4."""

import pytest
import torch

import hpcomm.trainer.parallelize as parallelize
from counting import counted
from hpcomm.trainer.model import Config
from hpcomm.trainer.parallelize import ParallelDims
from hpcomm.trainer.data import SyntheticDataset
from hpcomm.trainer.train import INHERIT, PARITY_TOLERANCE, TrainConfig, train

GRAD_TOLERANCE = 1e-5  # relative to the largest gradient element of the module
SMALL = Config(enc_dim=32, enc_heads=4, llm_dim=48, llm_heads=4)

CONFIGS = {
    # placement, encoder, LLM, micro-batches, other options
    "coloc enc dp=4 -> llm cp=2,tp=2 (default)": ("colocated", "dp=4", "cp=2,tp=2", 2, {}),
    "coloc enc dp=2,tp=2 -> llm dp=2,cp=2": ("colocated", "dp=2,tp=2", "dp=2,cp=2", 1, {}),
    "coloc enc cp=2,tp=2 -> llm dp=2,tp=2": ("colocated", "cp=2,tp=2", "dp=2,tp=2", 2, {}),
    "noncoloc enc cp=2 -> llm tp=2": ("noncolocated", "cp=2", "tp=2", 3, {}),
    "noncoloc enc dp=1 -> llm cp=3": ("noncolocated", "dp=1", "cp=3", 4, {}),
    "homogeneous: enc inherits llm cp=2,tp=2": ("colocated", INHERIT, "cp=2,tp=2", 2, {}),
    "coloc enc dp=4 -> llm pp=2,tp=2": ("colocated", "dp=4", "pp=2,tp=2", 4, {}),
    "coloc enc dp=4 -> llm pp=2,cp=2, 1 micro-batch": ("colocated", "dp=4", "pp=2,cp=2", 1, {}),
    # the advisor's colocated pipeline: the encoder on the first stage's ranks (0, 1) only
    "coloc enc tp=2 on stage 0 -> llm pp=2,cp=2": ("colocated", "tp=2", "pp=2,cp=2", 2, {}),
    "noncoloc enc dp=2 -> llm pp=2": ("noncolocated", "dp=2", "pp=2", 4, {}),
    "homogeneous: enc inherits llm pp=2,dp=2": ("colocated", INHERIT, "pp=2,dp=2", 3, {}),
    "frozen enc, coloc enc dp=4 -> llm cp=2,tp=2": ("colocated", "dp=4", "cp=2,tp=2", 2,
                                                    {"freeze_encoder": True}),
    "frozen enc, noncoloc enc dp=2 -> llm pp=2": ("noncolocated", "dp=2", "pp=2", 4,
                                                  {"freeze_encoder": True}),
    # aot_eager: Dynamo and AOTAutograd capture the same graphs as inductor, without its minutes
    # of code generation on a small CI machine (hpcomm-train --compile uses inductor)
    "compiled, coloc enc dp=4 -> llm cp=2,tp=2": ("colocated", "dp=4", "cp=2,tp=2", 2,
                                                  {"compile": "aot_eager"}),
}


def config(name: str, steps: int = 3) -> TrainConfig:
    placement, enc, llm, micro, options = CONFIGS[name]
    return TrainConfig(encoder=enc if enc == INHERIT else ParallelDims.parse(enc),
                       llm=ParallelDims.parse(llm), placement=placement, steps=steps,
                       micro_batches=micro, batch_size=8, model=SMALL, **options)


def run_parity(rank, world_size, cfg, detach_cp_gather=False):
    original = parallelize.cp_gather

    def cut(x, ctx):
        y = original(x, ctx)
        # zero the gradient rather than detach: the gather's backward still runs on every rank, as
        # the trainer requires of every transform call (a detached one raises at the step's end)
        y.register_hook(torch.zeros_like)
        return y

    if detach_cp_gather:  # negative control: no gradient flows back through the CP K/V gather
        parallelize.cp_gather = cut
    try:
        return train(cfg, rank, world_size, check_parity=True, progress=False)
    finally:
        parallelize.cp_gather = original


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity(world, name):
    results = world(4).run(run_parity, config(name), timeout=600)  # a loaded CI machine is slow
    result = results[0]
    assert len(result["losses"]) == 3
    assert all(r["losses"] == result["losses"] for r in results)  # the logged loss is global
    assert result["losses"][-1] < result["losses"][0]  # the steps did train
    assert result["loss_error"] < PARITY_TOLERANCE, result
    assert result["grad_error"]["encoder"] < GRAD_TOLERANCE, result
    assert result["grad_error"]["llm"] < GRAD_TOLERANCE, result
    if config(name).freeze_encoder:  # no encoder gradient anywhere, on either side
        assert result["grad_error"]["encoder"] == 0


def test_parity_detects_broken_cp_backward(world):
    """The check above can fail: with the CP gather's backward cut, the forward (and so the first
    loss) is unchanged but the encoder's K/V weights get no gradient."""
    result = world(4).run(run_parity, config("noncoloc enc cp=2 -> llm tp=2", steps=1), True,
                          timeout=600)[0]
    assert result["loss_error"] == 0
    assert result["grad_error"]["encoder"] > 1e-2
    assert result["grad_error"]["llm"] < GRAD_TOLERANCE  # the LLM has no CP here


class CountingDataset(SyntheticDataset):
    """Records every sample index this process reads."""

    def __init__(self) -> None:
        super().__init__(seed=0, patch=SMALL.patch)
        self.reads: list[int] = []

    def __getitem__(self, index: int):
        self.reads.append(index)
        return super().__getitem__(index)


def run_counting(rank, world_size, cfg):
    dataset = CountingDataset()
    result = train(cfg, rank, world_size, progress=False, dataset=dataset)
    return dataset.reads, result["losses"]


@pytest.mark.parametrize("name", ["coloc enc dp=4 -> llm pp=2,tp=2",
                                  "noncoloc enc cp=2 -> llm tp=2"])
def test_each_rank_reads_only_its_own_samples(world, name):
    """Per-rank data: the ranks read disjoint parts of each step's samples, once each, and
    together exactly the steps' samples; nobody reads (let alone packs) the global batch."""
    cfg = config(name, steps=2)
    results = world(4).run(run_counting, cfg, timeout=600)
    reads = [r[0] for r in results]
    for rank_reads in reads:
        assert len(rank_reads) == len(set(rank_reads))  # each sample read once
        assert len(rank_reads) == cfg.steps * cfg.batch_size // 4  # its share, not the batch
    everything = sorted(i for rank_reads in reads for i in rank_reads)
    assert everything == list(range(cfg.steps * cfg.batch_size))
    assert results[0][1] == results[3][1]  # and the steps trained on the global batch


def run_counting_backward(rank, world_size, cfg):
    """How many backward passes this rank starts."""
    import torch

    with counted(torch.autograd, "backward") as calls:
        train(cfg, rank, world_size, progress=False)
    return len(calls)


@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_encoder_ranks_skip_backward(world, frozen):
    """Non-colocated encoder ranks (0, 1) run no backward at all when the encoder is frozen."""
    cfg = config("noncoloc enc dp=2 -> llm pp=2", steps=2)
    cfg = TrainConfig(**{**vars(cfg), "freeze_encoder": frozen})
    calls = world(4).run(run_counting_backward, cfg, timeout=600)
    assert (calls[0] == calls[1] == 0) == frozen
    assert calls[2] > 0 and calls[3] > 0
