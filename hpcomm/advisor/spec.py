"""What the advisor reasons about, as pure data: the model, one global batch, the cluster, and a
candidate configuration. Nothing here runs anything; everything is frozen and hashable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np

from hpcomm.trainer.dims import ParallelDims


@dataclass(frozen=True)
class ModuleSpec:
    """One transformer stack. ``ffn`` is the MLP width (``gated``: SwiGLU, three matrices).
    Encoder extras: ``in_features`` (patch embedding input, 3 * patch**2) and ``out_features``
    (a two-layer projector to the LLM width). LLM extra: ``vocab`` (the output head)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    kv_heads: int = 0          # 0: same as heads (no GQA)
    gated: bool = False
    causal: bool = True
    vocab: int = 0
    in_features: int = 0
    out_features: int = 0
    embedding_rows: int = 0    # learned position (or row/column) table rows, hidden wide each
    frozen: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden * (self.kv_heads or self.heads) // self.heads

    def block_params(self) -> int:
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv_dim + (3 if self.gated else 2) * d * self.ffn + 4 * d

    def params(self) -> int:
        """Every parameter (norm weights and biases included)."""
        d, o = self.hidden, self.out_features
        extra = self.in_features * d + d if self.in_features else 0
        if o:
            extra += d * o + o + o * o + o
        if self.vocab:
            extra += 2 * self.vocab * d  # input embedding + untied head
        extra += self.embedding_rows * d
        return self.layers * self.block_params() + extra + 2 * d


@dataclass(frozen=True)
class ModelSpec:
    """Encoder + LLM and how they are stored. ``attention``: which (query, key) pairs the kernel
    computes: "varlen" those a variable-length kernel needs (s^2 per image, s(s+1)/2 per causal
    sample: flash attention), "square" every pair within a sample (a per-sample kernel that
    masks the causal half), "packed" every pair of the packed micro-batch (a masked dense one)."""

    encoder: ModuleSpec
    llm: ModuleSpec
    act_bytes: int = 2          # activations and boundary tensors (bf16)
    param_bytes: int = 2        # weights as used in compute
    grad_bytes: int = 4         # Megatron's fp32 main gradients
    optimizer_bytes: int = 12   # fp32 master weights + Adam m and v
    distributed_optimizer: bool = True  # optimizer state sharded over the DP x CP ranks (ZeRO-1)
    attention: str = "varlen"


@dataclass(frozen=True)
class Sample:
    """One training sample: images of ``image_tokens[i]`` tokens each (one encoder row and one LLM
    row per token), placed consecutively after ``image_offset`` text tokens, and ``text_tokens``
    text rows in all."""

    image_tokens: tuple[int, ...]
    text_tokens: int
    image_offset: int = 1

    @property
    def seq_len(self) -> int:
        return self.text_tokens + sum(self.image_tokens)


@dataclass(frozen=True, eq=False)
class DataSpec:
    """One representative global batch (every step is assumed to cost what this one costs).
    Compared and hashed by identity: the cost model caches per DataSpec, and hashing thousands
    of samples on every lookup would cost more than the lookup saves."""

    samples: tuple[Sample, ...]

    @cached_property
    def tokens(self) -> int:
        return sum(s.seq_len for s in self.samples)

    @classmethod
    def from_distribution(cls, batch_size: int, images_per_sample: int, tokens_per_image: int,
                          text_mean: int, text_min: int = 1, text_max: int = 0,
                          seed: int = 0) -> DataSpec:
        """Text lengths uniform in [text_min, text_max] (text_max 0: always text_mean), drawn with
        ``seed`` so a batch is reproducible."""
        rng = np.random.default_rng(seed)
        if text_max:
            lens = rng.integers(text_min, text_max + 1, batch_size)
        else:
            lens = np.full(batch_size, text_mean)
        return cls(tuple(Sample((tokens_per_image,) * images_per_sample, int(n)) for n in lens))

    @classmethod
    def from_manifest(cls, path: str, batch_size: int, patch: int = 14, max_side: int = 448,
                      tokens_per_char: float = 0.25) -> DataSpec:
        """Measure a JSONL manifest of {"image": path, "text": str} (optionally "images": [...]):
        image sides scaled to at most ``max_side`` and cut into patches; text tokens estimated from
        the character count. The first ``batch_size`` lines (cycled) form the batch."""
        import os

        from PIL import Image

        root = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            items = [json.loads(line) for line in f if line.strip()]
        if not items:
            raise ValueError(f"manifest {path} has no samples")
        samples = []
        for i in range(batch_size):
            item = items[i % len(items)]
            images = item.get("images") or ([item["image"]] if "image" in item else [])
            counts = []
            for image in images:
                with Image.open(os.path.join(root, image)) as img:
                    scale = min(1.0, max_side / max(img.size))
                    w, h = (max(patch, int(s * scale) // patch * patch) for s in img.size)
                counts.append((w // patch) * (h // patch))
            text = max(1, round(len(item.get("text", "")) * tokens_per_char))
            samples.append(Sample(tuple(counts), text + 2))
        return cls(tuple(samples))


@dataclass(frozen=True)
class ClusterSpec:
    """GPUs and links. ``flops``: peak dense FLOP/s per GPU at the model's precision; ``efficiency``
    the fraction of it a large GEMM-bound layer reaches. Bandwidths are bytes/s per GPU in one
    direction, latencies seconds per message. The overheads are the fixed software costs a real
    step pays beyond FLOPs and bytes: per transformer block and micro-batch (forward + backward
    kernel launches), per collective call, per micro-batch and module, per transform planned per
    micro-batch (layouts change every step), per step (data, optimizer)."""

    name: str
    gpus: int
    gpus_per_node: int
    flops: float
    memory: float
    intra_bw: float
    intra_latency: float
    inter_bw: float
    inter_latency: float
    efficiency: float = 1.0
    gemm_half_size: float = 0.0  # a GEMM whose smallest per-rank dim is this runs at half speed
    block_overhead: float = 0.0
    collective_overhead: float = 0.0
    microbatch_overhead: float = 0.0
    step_overhead: float = 0.0
    plan_overhead: float = 0.0  # what a transform planned anew per micro-batch adds to its calls
    cp_overlap: bool = False    # CP traffic hides behind attention (Megatron's ring attention)
    cores: int = 0              # >0: the ranks share this many CPU cores (a calibrated CPU box)
    background_load: float = 0.0  # runnable processes of others on those cores (load average)
    source: str = ""

    def with_gpus(self, gpus: int) -> ClusterSpec:
        return replace(self, gpus=gpus)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterSpec:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown cluster fields {sorted(unknown)}; expected {sorted(known)}")
        return cls(**data)


# Published figures (docs/ADVISOR.md cites them): H100 SXM5 989.4 TFLOPS dense BF16, 80 GB HBM3;
# H200 SXM the same compute with 141 GB HBM3e; NVLink 4 900 GB/s per GPU (450 GB/s each way);
# one ConnectX-7 400 Gb/s (50 GB/s) NIC per GPU. Latencies and efficiency are stated assumptions.
_NVLINK_NODE = dict(gpus_per_node=8, flops=989.4e12, intra_bw=450e9, intra_latency=5e-6,
                    inter_bw=50e9, inter_latency=10e-6, efficiency=0.5, gemm_half_size=128.0,
                    block_overhead=50e-6,
                    collective_overhead=10e-6, cp_overlap=True)
PRESETS: dict[str, ClusterSpec] = {
    "h100": ClusterSpec(name="h100", gpus=8, memory=80e9, source="DGX H100 datasheet; NVIDIA "
                        "H100 datasheet; ConnectX-7 400G IB", **_NVLINK_NODE),  # type: ignore[arg-type]
    "h200": ClusterSpec(name="h200", gpus=8, memory=141e9, source="DGX H200 / H200 datasheets; "
                        "ConnectX-7 400G IB", **_NVLINK_NODE),  # type: ignore[arg-type]
}


@dataclass(frozen=True)
class ModuleDims(ParallelDims):
    """Parallel degrees of one module (the trainer's, with its parser), shown the advisor's way:
    dp always, the others when above 1."""

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in (("dp", self.dp), ("cp", self.cp), ("tp", self.tp),
                                                 ("pp", self.pp)) if v > 1 or k == "dp")


@dataclass(frozen=True)
class Candidate:
    """A configuration: each module's degrees, and where the encoder runs. ``placement``:
    "homogeneous" (encoder inherits the LLM's dp/cp/tp on the same ranks), "colocated" (its own
    layout on the LLM's first-stage ranks) or "noncolocated" (ranks 0..encoder.size-1, the LLM on
    the rest). ``micro_batches``: the global batch is split into that many micro-batches."""

    encoder: ModuleDims
    llm: ModuleDims
    placement: str
    micro_batches: int = 1

    def __post_init__(self) -> None:
        if self.placement not in ("homogeneous", "colocated", "noncolocated"):
            raise ValueError(f"unknown placement {self.placement!r}")
        if self.encoder.pp != 1:
            raise ValueError("the encoder is not pipelined (pp=1)")
        if self.placement != "noncolocated" and self.encoder.size != self.llm.stage.size:
            raise ValueError(f"{self.placement}: the encoder ({self.encoder}) must cover the LLM's "
                             f"first-stage ranks ({self.llm.stage.size})")
        if self.placement == "homogeneous" and (self.encoder.dp, self.encoder.cp, self.encoder.tp) != (
                self.llm.dp, self.llm.cp, self.llm.tp):
            raise ValueError(f"homogeneous: the encoder inherits the LLM's degrees ({self.llm})")

    @property
    def world_size(self) -> int:
        return self.llm.size + (self.encoder.size if self.placement == "noncolocated" else 0)

    def encoder_ranks(self) -> list[int]:
        return list(range(self.encoder.size))

    def llm_rank_offset(self) -> int:
        return self.encoder.size if self.placement == "noncolocated" else 0

    def label(self) -> str:
        return f"{self.placement:12s} enc {str(self.encoder):16s} llm {self.llm}"


@dataclass(frozen=True)
class Prediction:
    """Predicted cost of one candidate. Times in seconds, memory and bytes per rank (the busiest
    rank), ``breakdown``: named parts of the step time on the critical path."""

    candidate: Candidate
    step_time: float
    tokens_per_s: float
    tflops_per_gpu: float
    memory: float
    boundary_bytes: int
    fits: bool
    breakdown: tuple[tuple[str, float], ...] = field(default=())
