"""The model's pieces in one process: per-sample attention (exactness, memory), the pipeline
split, the 1F1B order and the FLOPs count."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hpcomm.trainer.model import (AttnContext, Config, MultimodalModel, model_flops, segments,
                                  varlen_attention)
from hpcomm.trainer.parallelize import pipeline_split
from hpcomm.trainer.train import one_f_one_b

HEADS, HEAD_DIM = 4, 8


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def packed(seq_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = sum(seq_lens)
    q, k, v = (torch.randn(rows, HEADS, HEAD_DIM, generator=g, dtype=torch.float64)
               for _ in range(3))
    seq_of_row = torch.repeat_interleave(torch.tensor(seq_lens))
    return q, k, v, seq_of_row


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_matches_dense_masked_attention(causal):
    """Per-sample SDPA equals one SDPA over the packed rows with a block-diagonal (causal) mask,
    also for rows in a permuted (zigzag-like) order and keys that are a different row set."""
    q, k, v, seq_of_row = packed([5, 1, 9, 3])
    rows = torch.randperm(len(q), generator=torch.Generator().manual_seed(1))
    q_rows = rows[:10]  # this rank's queries; keys: every row
    mask = seq_of_row[q_rows][:, None] == seq_of_row[rows][None, :]
    if causal:
        mask &= rows[None, :] <= q_rows[:, None]
    dense = F.scaled_dot_product_attention(q[q_rows].transpose(0, 1), k[rows].transpose(0, 1),
                                           v[rows].transpose(0, 1), attn_mask=mask).transpose(0, 1)
    out = varlen_attention(q[q_rows], k[rows], v[rows], segments(q_rows, rows, seq_of_row, causal))
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-12)  # float64: summation order only


def test_attention_memory_follows_sequences_not_packed_length():
    """The largest tensor attention creates depends on the longest sample, not on how many are
    packed: no [rows, rows] score or mask tensor exists (16 x 32 rows: a dense mask would be
    512^2 elements)."""
    largest = []
    for num_seqs in (4, 16):
        lens = [32] * num_seqs
        q, k, v, seq_of_row = packed(lens)
        rows = torch.arange(len(q))
        segs = segments(rows, rows, seq_of_row, causal=True)
        with LargestTensor() as mode:
            varlen_attention(q, k, v, segs)
        largest.append(mode.numel)
    rows = 16 * 32
    per_sample = HEADS * 32 * 32  # one sample's scores
    assert max(largest) <= max(per_sample, rows * HEADS * HEAD_DIM)  # scores or the output
    assert max(largest) < rows * rows // 8
    segs = segments(torch.arange(rows), torch.arange(rows),
                    torch.repeat_interleave(torch.tensor([32] * 16)), causal=True)
    assert sum(s.mask.numel() for s in segs) == 16 * 32 * 32  # masks: sum of squared lengths


def test_pipeline_split_keeps_names_and_shares():
    cfg = Config(llm_layers=3)
    full = MultimodalModel(cfg).llm
    stages = [pipeline_split(MultimodalModel(cfg).llm, s, 2) for s in range(2)]
    assert list(stages[0].blocks) == ["0", "1"] and list(stages[1].blocks) == ["2"]
    assert stages[0].head is None and stages[1].tok_embed is None
    names = {n for stage in stages for n, _ in stage.named_parameters()}
    assert names == {n for n, _ in full.named_parameters()}
    # the stages chained are the full model
    tokens = torch.randint(0, cfg.vocab_size, (7,))
    rows = torch.arange(7)
    ctx = AttnContext(segments(rows, rows, rows * 0, True))
    h = stages[1](stages[0](stages[0].embed(tokens), rows, ctx), rows, ctx)
    torch.testing.assert_close(h, full(full.embed(tokens), rows, ctx), rtol=0, atol=0)


def test_one_f_one_b_order():
    assert list(one_f_one_b(4, 1)) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2),
                                       ("B", 2), ("F", 3), ("B", 3)]
    assert list(one_f_one_b(4, 2)) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1),
                                       ("F", 3), ("B", 2), ("B", 3)]
    assert list(one_f_one_b(1, 2)) == [("F", 0), ("B", 0)]


def test_model_flops_counts_matmuls_and_attention():
    cfg = Config(enc_dim=8, enc_layers=1, llm_dim=16, llm_layers=1, vocab_size=10, patch=1)
    seq_lens, patches = [4], [2]
    enc_fwd = 2 * 2 * (3 * 8 + 12 * 64 + 8 * 16 + 16 * 16) + 2 * 2 * 8 * 4  # 2 patches, 2^2 pairs
    llm_fwd = 2 * 4 * (12 * 256 + 16 * 10) + 2 * 2 * 16 * 16 / 2  # causal: half of 4^2 pairs
    assert model_flops(cfg, seq_lens, patches) == 3 * (enc_fwd + llm_fwd)
    assert model_flops(cfg, seq_lens, patches, train_encoder=False) == 3 * llm_fwd + enc_fwd
