"""The reference trainer (hpcomm.trainer) as advisor inputs: its model, its batches and its
configurations, so predictions can be checked against measured runs."""

from __future__ import annotations

from hpcomm.trainer.data import micro_batches
from hpcomm.trainer.model import Config
from hpcomm.trainer.train import TrainConfig

from .spec import Candidate, DataSpec, ModelSpec, ModuleDims, ModuleSpec, Sample


def reference_model(cfg: Config | None = None) -> ModelSpec:
    """hpcomm.trainer.model in fp32 with plain AdamW: MLPs 4x wide (GELU), no GQA, a learned
    position table (the encoder's row and column tables), dense masked attention over each packed
    micro-batch."""
    cfg = cfg or Config()
    encoder = ModuleSpec(layers=cfg.enc_layers, hidden=cfg.enc_dim, heads=cfg.enc_heads,
                         ffn=4 * cfg.enc_dim, causal=False, in_features=3 * cfg.patch ** 2,
                         out_features=cfg.llm_dim, embedding_rows=2 * cfg.max_grid)
    llm = ModuleSpec(layers=cfg.llm_layers, hidden=cfg.llm_dim, heads=cfg.llm_heads,
                     ffn=4 * cfg.llm_dim, vocab=cfg.vocab_size, embedding_rows=cfg.max_seq_len)
    return ModelSpec(encoder, llm, act_bytes=4, param_bytes=4, grad_bytes=4, optimizer_bytes=8,
                     distributed_optimizer=False, attention="packed")


def reference_data(cfg: TrainConfig, step: int = 0) -> DataSpec:
    """The exact global batch the trainer draws at ``step`` (synthetic or manifest data):
    one image per sample, its tokens right after BOS."""
    from hpcomm.trainer.data import ManifestDataset, SyntheticDataset

    dataset = (ManifestDataset(cfg.data, cfg.model.patch) if cfg.data
               else SyntheticDataset(cfg.seed, cfg.model.patch))
    batches = micro_batches(dataset, step, cfg.batch_size, 1, cfg.model.patch, cfg.seed)
    samples = []
    for batch in batches:
        for seq_len, patches in zip(batch.seq_lens, batch.patch_counts):
            samples.append(Sample((patches,), seq_len - patches, image_offset=1))
    return DataSpec(tuple(samples))


def reference_candidate(cfg: TrainConfig) -> Candidate:
    """The trainer's configuration as a candidate; colocated with equal degrees is homogeneous."""
    enc = ModuleDims(dp=cfg.encoder.dp, cp=cfg.encoder.cp, tp=cfg.encoder.tp)
    llm = ModuleDims(dp=cfg.llm.dp, cp=cfg.llm.cp, tp=cfg.llm.tp)
    placement = cfg.placement
    if placement == "colocated" and enc == llm:
        placement = "homogeneous"
    return Candidate(enc, llm, placement, cfg.micro_batches)
