"""The reference trainer (hpcomm.trainer) as advisor inputs: its model, its batches and its
configurations, so predictions can be checked against measured runs."""

from __future__ import annotations

from hpcomm.trainer.model import Config
from hpcomm.trainer.train import TrainConfig

from .spec import Candidate, DataSpec, ModelSpec, ModuleDims, ModuleSpec, Sample


def reference_model(cfg: Config | None = None, frozen_encoder: bool = False) -> ModelSpec:
    """hpcomm.trainer.model in fp32 with plain AdamW: MLPs 4x wide (GELU), no GQA, a learned
    position table (the encoder's row and column tables), one masked SDPA per sample (every pair
    of the sample is computed, the causal half masked)."""
    cfg = cfg or Config()
    encoder = ModuleSpec(layers=cfg.enc_layers, hidden=cfg.enc_dim, heads=cfg.enc_heads,
                         ffn=4 * cfg.enc_dim, causal=False, in_features=3 * cfg.patch ** 2,
                         out_features=cfg.llm_dim, embedding_rows=2 * cfg.max_grid,
                         frozen=frozen_encoder)
    llm = ModuleSpec(layers=cfg.llm_layers, hidden=cfg.llm_dim, heads=cfg.llm_heads,
                     ffn=4 * cfg.llm_dim, vocab=cfg.vocab_size, embedding_rows=cfg.max_seq_len)
    return ModelSpec(encoder, llm, act_bytes=4, param_bytes=4, grad_bytes=4, optimizer_bytes=8,
                     distributed_optimizer=False, attention="square")


def reference_data(cfg: TrainConfig, step: int = 0) -> DataSpec:
    """The exact global batch the trainer reads at ``step`` (synthetic or manifest data): one
    image per sample, its tokens right after BOS."""
    from hpcomm.trainer.data import ManifestDataset, SyntheticDataset, patchify, step_indices

    dataset = (ManifestDataset(cfg.data, cfg.model.patch) if cfg.data
               else SyntheticDataset(cfg.seed, cfg.model.patch))
    samples = []
    for part in step_indices(dataset, step, cfg.batch_size, 1, cfg.seed):
        for i in part:
            sample = dataset[i]
            patches = len(patchify(sample.image, cfg.model.patch)[0])
            text = min(len(sample.text.encode("utf-8")), 64) + 2  # BOS, caption (at most 64), EOS
            samples.append(Sample((patches,), text, image_offset=1))
    return DataSpec(tuple(samples))


def reference_candidate(cfg: TrainConfig) -> Candidate:
    """The trainer's configuration as a candidate (``--encoder inherit`` is homogeneous)."""
    llm = ModuleDims(dp=cfg.llm.dp, cp=cfg.llm.cp, tp=cfg.llm.tp, pp=cfg.llm.pp)
    if cfg.encoder == "inherit":
        return Candidate(ModuleDims(dp=llm.dp, cp=llm.cp, tp=llm.tp), llm, "homogeneous",
                         cfg.micro_batches)
    enc = cfg.encoder
    assert not isinstance(enc, str)
    return Candidate(ModuleDims(dp=enc.dp, cp=enc.cp, tp=enc.tp), llm, cfg.placement,
                     cfg.micro_batches)
