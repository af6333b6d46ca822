"""Loss and gradient parity of the parallel trainer against its single-process reference, on one
reused 4-process gloo world. Each config trains a few steps; rank 0 then reruns them in one process
and every rank compares its first-step gradient shards (after the DP/CP/TP-SP reductions).

Tolerances: fp32 throughout; sharding only reorders sums (TP partial sums, CP/DP gradient
reductions), which moves results by a few ulp, so first-step gradients agree to ~1e-7 relative and
losses over a few AdamW steps to well under the CLI's 1e-4."""

import pytest

import hpcomm.trainer.parallelize as parallelize
from hpcomm.trainer.model import Config
from hpcomm.trainer.parallelize import ParallelDims
from hpcomm.trainer.train import PARITY_TOLERANCE, TrainConfig, train

GRAD_TOLERANCE = 1e-5  # relative to the largest gradient element of the module
SMALL = Config(enc_dim=32, enc_heads=4, llm_dim=48, llm_heads=4)

CONFIGS = {
    # placement, encoder, LLM, micro-batches
    "coloc enc dp=4 -> llm cp=2,tp=2 (default)": ("colocated", "dp=4", "cp=2,tp=2", 2),
    "coloc enc dp=2,tp=2 -> llm dp=2,cp=2": ("colocated", "dp=2,tp=2", "dp=2,cp=2", 1),
    "coloc enc cp=2,tp=2 -> llm dp=2,tp=2": ("colocated", "cp=2,tp=2", "dp=2,tp=2", 2),
    "noncoloc enc cp=2 -> llm tp=2": ("noncolocated", "cp=2", "tp=2", 3),
    "noncoloc enc dp=1 -> llm cp=3": ("noncolocated", "dp=1", "cp=3", 4),
}


def config(name: str, steps: int = 3) -> TrainConfig:
    placement, enc, llm, micro = CONFIGS[name]
    return TrainConfig(encoder=ParallelDims.parse(enc), llm=ParallelDims.parse(llm),
                       placement=placement, steps=steps, micro_batches=micro, batch_size=8,
                       model=SMALL)


def run_parity(rank, world_size, cfg, detach_cp_gather=False):
    original = parallelize.cp_gather
    if detach_cp_gather:  # negative control: no gradient flows back through the CP K/V gather
        parallelize.cp_gather = lambda x, ctx: original(x, ctx).detach()
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


def test_parity_detects_broken_cp_backward(world):
    """The check above can fail: with the CP gather's backward cut, the forward (and so the first
    loss) is unchanged but the encoder's K/V weights get no gradient."""
    result = world(4).run(run_parity, config("noncoloc enc cp=2 -> llm tp=2", steps=1), True,
                          timeout=600)[0]
    assert result["loss_error"] == 0
    assert result["grad_error"]["encoder"] > 1e-2
    assert result["grad_error"]["llm"] < GRAD_TOLERANCE  # the LLM has no CP here
