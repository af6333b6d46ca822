"""The configurations the layout advisor ranks for 4 ranks train in the reference trainer
(bench/sweep_advised.py): a covering handful on every run, all of them under ``-m slow``.

The covering set is the fewest advised configurations that include every placement (homogeneous,
colocated, non-colocated), each of DP, CP, TP and PP, and one and two micro-batches, run for two
steps of the parity tests' small model on a batch of 8. Its CP configuration is the one that hung:
with the encoder in the LLM's zigzag CP=4 layout, CP rank 3 holds no image row in the first
micro-batch, so its attention had no query and autograd never reached its encoder K/V gathers,
while ranks 0-2 waited in their backward (parallelize.keep_in_graph now keeps them in the graph).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import sweep_advised as sweep  # noqa: E402
from hpcomm.trainer.model import AttnContext, Attention  # noqa: E402
from hpcomm.trainer.parallelize import _keep_inputs_in_graph  # noqa: E402

BATCH = 8
COVERING = {
    # name: (placement, encoder, LLM, micro-batches), as the advisor writes them
    "homogeneous cp=4, 2 micro-batches (the hang)": ("homogeneous", "dp=1,cp=4", "dp=1,cp=4", 2),
    "colocated dp=2,tp=2 -> dp=4, 1 micro-batch": ("colocated", "dp=2,tp=2", "dp=4", 1),
    "noncolocated dp=2 -> pp=2, 2 micro-batches": ("noncolocated", "dp=2", "dp=1,pp=2", 2),
}


def covering_candidates():
    advised = {(c.placement, str(c.encoder), str(c.llm), c.micro_batches): c
               for c in sweep.advised(4, BATCH, sweep.SMALL)}
    return advised, {name: advised.get(key) for name, key in COVERING.items()}


def test_covering_set_is_advised_and_covers():
    advised, chosen = covering_candidates()
    assert None not in chosen.values(), f"no longer advised: {chosen}"
    picked = list(chosen.values())
    assert {c.placement for c in picked} == {"homogeneous", "colocated", "noncolocated"}
    for dim in ("dp", "cp", "tp", "pp"):
        assert any(getattr(d, dim) > 1 for c in picked for d in (c.encoder, c.llm)), dim
    assert {1, 2} <= {c.micro_batches for c in picked}
    # the advisor's world is the trainer's, and the trainer accepts each of them
    for c in picked:
        assert c.world_size == 4
        sweep.train_config(c, batch=BATCH, model=sweep.SMALL).module_ranks(4)


@pytest.mark.parametrize("name", list(COVERING))
def test_covering_config_trains(world, name):
    candidate = covering_candidates()[1][name]
    cfg = sweep.train_config(candidate, steps=2, batch=BATCH, model=sweep.SMALL)
    outcome = sweep.run_config(world(4), cfg, name, timeout=300)
    assert outcome.ok, outcome.error


def test_attention_without_queries_keeps_its_inputs_in_graph():
    """One process: a rank with no query rows still sends (zero) gradients to q and the gathered
    K/V, so autograd reaches the transforms that made them, as on the ranks with queries."""
    attn = Attention(16, 4)
    q = torch.zeros(0, 4, 4, requires_grad=True)
    kv = torch.randn(5, 4, 8, requires_grad=True)  # other CP ranks' keys and values
    ctx = AttnContext([])
    plain = attn.core(q, kv, ctx)
    assert plain.grad_fn is None  # the bug: nothing to backpropagate through
    out = _keep_inputs_in_graph(attn.core, (q, kv, ctx), plain)
    assert out.shape == (0, 4, 4)
    out.sum().backward()
    assert kv.grad is not None and not kv.grad.any()
    assert q.grad is not None and q.grad.shape == q.shape


def test_trainer_accepts_every_advised_config():
    """No training: the trainer places each advised configuration where the advisor does (its
    colocated pipelines put the encoder on the LLM's first stage's ranks only)."""
    for c in sweep.advised(4, 16) + sweep.advised(4, BATCH, sweep.SMALL):
        enc_ranks, llm_ranks = sweep.train_config(c).module_ranks(4)
        offset = c.llm_rank_offset()
        assert llm_ranks == list(range(offset, offset + c.llm.size)), sweep.describe(c)
        first_stage = llm_ranks[:c.llm.stage.size]
        assert enc_ranks == (c.encoder_ranks() if c.placement == "noncolocated"
                             else first_stage), sweep.describe(c)


@pytest.mark.slow
def test_every_advised_config_trains(world):
    """Every configuration the advisor ranks for 4 ranks (the reference model, batch 16), 3 steps:
    any failure, a configuration the trainer rejects included, fails the test."""
    candidates = sweep.advised(4, 16)
    outcomes = sweep.sweep(candidates, steps=3, batch=16, world=world(4), echo=False)
    assert len(outcomes) == len(candidates)
    failed = [f"{o.name}: {o.error}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)
