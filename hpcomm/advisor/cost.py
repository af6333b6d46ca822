"""The cost model: one candidate, one model, one batch, one cluster -> a Prediction.

Every term is for the busiest rank (the step ends when the slowest rank does). Per micro-batch and
module: compute (analytic FLOPs / achievable FLOP/s), a fixed overhead per block, and alpha-beta
costs of the collectives the layout implies (TP-SP all-gathers and reduce-scatters, the CP K/V
gather, PP activation sends, the boundary transform); per step: the DP gradient all-reduce and a
fixed overhead. Schedules: colocated modules run one after the other on the same ranks (1F1B over
pipeline stages, the encoder on the first stage); non-colocated modules overlap, the encoder one
micro-batch ahead. docs/ADVISOR.md states the formulas and their assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from hpcomm.layout import split_points

from .boundary import boundary_stats
from .flops import RankWork, attention_pairs, module_flops, rank_work
from .spec import Candidate, ClusterSpec, DataSpec, ModelSpec, ModuleDims, ModuleSpec, Prediction, Sample


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s one way
    latency: float    # s per message


def link(cluster: ClusterSpec, span: int) -> Link:
    """The link a group of ``span`` consecutive ranks talks over: NVLink inside a node, the
    network otherwise."""
    if span <= cluster.gpus_per_node:
        return Link(cluster.intra_bw, cluster.intra_latency)
    return Link(cluster.inter_bw, cluster.inter_latency)


def ring_time(cluster: ClusterSpec, lk: Link, n: int, nbytes: float, passes: int = 1) -> float:
    """One ring collective over n ranks of ``nbytes`` in all (all-gather or reduce-scatter: 1
    pass; all-reduce: 2): each pass moves (n-1)/n of the bytes in n-1 latency-bound steps."""
    if n <= 1:
        return 0.0
    return cluster.collective_overhead + passes * (n - 1) * (lk.latency + nbytes / n / lk.bandwidth)


def micro_batches(data: DataSpec, m: int) -> list[tuple[Sample, ...]]:
    """The global batch tensor_split into m micro-batches of whole samples."""
    b = split_points(len(data.samples), m)
    return [data.samples[b[i]:b[i + 1]] for i in range(m)]


@lru_cache(maxsize=256)
def micro_batch_lens(data: DataSpec, m: int, which: str) -> tuple[tuple[int, ...], ...]:
    """Per micro-batch, the module's sequence lengths: images for the encoder, samples for the
    LLM."""
    if which == "encoder":
        return tuple(tuple(n for s in mb for n in s.image_tokens) for mb in micro_batches(data, m))
    return tuple(tuple(s.seq_len for s in mb) for mb in micro_batches(data, m))


def module_work(m: ModuleSpec, model: ModelSpec, dims: ModuleDims, lens: Sequence[int],
                zigzag: bool) -> RankWork:
    return rank_work(m, lens, dims, model.attention, zigzag)


def transform_calls(m: ModuleSpec, dims: ModuleDims) -> dict[str, int]:
    """Transform calls one rank of one stage makes per micro-batch, forward and backward, by
    kind (the trainer's hooks; a test counts the trainer's calls): TP with sequence parallelism
    gathers and reduce-scatters around attention and around the MLP, 4 per layer and pass; CP
    gathers K and V once per layer and pass; PP moves the activations once per pass (pp = 2)."""
    layers = -(-m.layers // dims.pp)
    passes = 1 if m.frozen else 2  # forward, and backward with the transposed collectives
    return {"tp": 4 * layers * passes if dims.tp > 1 else 0,
            "cp": layers * passes if dims.cp > 1 else 0,
            "pp": passes if dims.pp > 1 else 0}


def module_step(m: ModuleSpec, model: ModelSpec, dims: ModuleDims, work: RankWork,
                cluster: ClusterSpec, span_offset: int = 0) -> dict[str, float]:
    """Seconds of one micro-batch (forward + backward, forward only if frozen) on the busiest
    rank of one pipeline stage: compute, block overhead, TP, CP and PP communication. Each
    transform is planned anew per micro-batch (the trainer's are), which its first calls pay."""
    layers = -(-m.layers // dims.pp)
    flops = module_flops(m, work.rows, work.pairs, layers) / dims.tp
    rate = cluster.flops * cluster.efficiency
    if cluster.gemm_half_size:  # narrow GEMMs (TP-split widths, CP-split rows) fill few tiles
        smallest = min(work.rows, m.hidden / dims.tp)
        rate *= smallest / (smallest + cluster.gemm_half_size)
    calls = transform_calls(m, dims)
    out = {"compute": flops / rate,
           "overhead": layers * cluster.block_overhead * (0.5 if m.frozen else 1.0)
           + cluster.microbatch_overhead}
    ab = model.act_bytes
    # TP-SP: the SP gather and reduce-scatter, each the CP rank's rows x hidden in all
    tp_bytes = work.rows * m.hidden * ab
    out["tp"] = (calls["tp"] * ring_time(cluster, link(cluster, dims.tp), dims.tp, tp_bytes)
                 + (2 * cluster.plan_overhead if calls["tp"] else 0.0))
    # CP: each rank gathers its group's K and V (its TP share of the heads); backward scatters
    kv_bytes = work.group_rows * 2 * m.kv_dim / dims.tp * ab
    cp = calls["cp"] * ring_time(cluster, link(cluster, dims.tp * dims.cp), dims.cp, kv_bytes)
    if cluster.cp_overlap:
        attn = layers * (3 if calls["cp"] > layers else 1) * 4 * work.pairs * m.hidden / dims.tp / rate
        cp = max(0.0, cp - attn)
    out["cp"] = cp + (cluster.plan_overhead if calls["cp"] else 0.0)
    if calls["pp"]:
        lk = link(cluster, 2 * dims.stage.size)
        out["pp"] = cluster.plan_overhead + calls["pp"] * (
            cluster.collective_overhead + lk.latency + work.sp_rows * m.hidden * ab / lk.bandwidth)
    return out


def trainable_params_per_rank(m: ModuleSpec, dims: ModuleDims) -> float:
    return m.params() / (dims.tp * dims.pp)


def grad_reduce_time(m: ModuleSpec, model: ModelSpec, dims: ModuleDims, cluster: ClusterSpec) -> float:
    """DP x CP gradient all-reduce (a reduce-scatter + all-gather with the distributed optimizer:
    the same bytes) of the rank's trainable parameters."""
    if m.frozen:
        return 0.0
    n = dims.dp * dims.cp
    nbytes = trainable_params_per_rank(m, dims) * model.grad_bytes
    return ring_time(cluster, link(cluster, dims.size // dims.pp), n, nbytes, passes=2)


def boundary_time(candidate: Candidate, model: ModelSpec, cluster: ClusterSpec,
                  samples: tuple[Sample, ...]) -> tuple[float, int]:
    """(seconds, bytes of the busiest rank) of one micro-batch's boundary, forward and (unless the
    encoder is frozen) backward. Inside one node the link is NVLink; across nodes the network."""
    if candidate.world_size == 1:
        return 0.0, 0
    st = boundary_stats(candidate, samples)
    row_bytes = model.llm.hidden * model.act_bytes
    nbytes = max(st.sent, st.received) * row_bytes
    lk = link(cluster, candidate.world_size)
    # a boundary whose rows all stay on their ranks (homogeneous) is a local copy: no call crosses
    one = (cluster.collective_overhead + st.peers * lk.latency + nbytes / lk.bandwidth
           if st.peers else 0.0)
    passes = 1 if model.encoder.frozen else 2
    return cluster.plan_overhead + passes * one, passes * nbytes


def activation_bytes(m: ModuleSpec, model: ModelSpec, dims: ModuleDims, work: RankWork) -> float:
    """Activations one micro-batch keeps for backward on one rank of one stage: per row and
    layer the norm inputs and outputs, Q, K, V, the attention output and the MLP hidden (split
    over TP by sequence parallelism or head/column sharding), plus the attention scores and
    probabilities (packed attention) or the gathered K/V (CP), and the logits."""
    if m.frozen:
        return 0.0
    d, kv = m.hidden, m.kv_dim
    per_row = 6 * d + 2 * kv + (3 if m.gated else 2) * m.ffn
    layers = -(-m.layers // dims.pp)
    rows = work.rows / dims.tp
    total = layers * rows * per_row * model.act_bytes
    if model.attention == "packed":  # fp32 scores and probabilities per local head
        total += layers * 2 * (m.heads / dims.tp) * work.rows * work.group_rows * 4
    if dims.cp > 1:
        total += layers * work.group_rows * 2 * kv / dims.tp * model.act_bytes
    total += 2 * rows * m.vocab * 4  # fp32 logits and their gradient
    return total


def state_bytes(m: ModuleSpec, model: ModelSpec, dims: ModuleDims) -> float:
    """Weights, gradients and optimizer state of one rank."""
    p = trainable_params_per_rank(m, dims)
    if m.frozen:
        return p * model.param_bytes
    shards = dims.dp * dims.cp if model.distributed_optimizer else 1
    return p * (model.param_bytes + model.grad_bytes + model.optimizer_bytes / shards)


@lru_cache(maxsize=64)
def model_flops(model: ModelSpec, data: DataSpec) -> float:
    """Useful FLOPs of one step: per-sample attention (what a varlen kernel computes), whatever
    the layout; the denominator of TFLOPS per GPU."""
    images = [n for s in data.samples for n in s.image_tokens]
    lens = [s.seq_len for s in data.samples]
    enc, llm = model.encoder, model.llm
    return (module_flops(enc, sum(images), attention_pairs(images, enc.causal), enc.layers)
            + module_flops(llm, sum(lens), attention_pairs(lens, llm.causal), llm.layers))


def _noncolocated_pipe(e: np.ndarray, l_: np.ndarray, pp: int) -> float:
    """Encoder one micro-batch ahead of the LLM: after the first encoder micro-batch and until the
    last LLM one, the slower side sets the pace; a pipelined LLM adds its fill and drain."""
    return (float(e[0] + l_[-1]) + float(np.maximum(e[1:], l_[:-1]).sum())
            + (pp - 1) * float(l_.max()))


def _shared_cores(e: np.ndarray, l_: np.ndarray, pp: int, pipe: float, candidate: Candidate,
                  cluster: ClusterSpec) -> float:
    """Ranks sharing CPU cores: calibration timed every rank busy, but a non-colocated rank
    waiting for the other module frees its core, so the busy ones run faster. With B runnable
    processes of others, a busy rank gets cores / (busy + B) of a core (at most one), so the speed
    over calibration is max(ranks + B, cores) / max(busy + B, cores); a fixed point, iterated."""
    ranks, speed, bg = candidate.world_size, 1.0, cluster.background_load
    for _ in range(4):
        busy = (candidate.encoder.size * e.sum() + candidate.llm.size * l_.sum()) / speed / pipe
        speed = max(ranks + bg, cluster.cores) / max(float(busy) + bg, cluster.cores)
        pipe = _noncolocated_pipe(e / speed, l_ / speed, pp)
    return pipe


@dataclass(frozen=True)
class Profile:
    """One module under one set of degrees: seconds of each micro-batch on the busiest rank, the
    most activation memory a micro-batch keeps, and the time split by kind (summed)."""

    times: tuple[float, ...]
    activation: float
    parts: tuple[tuple[str, float], ...]


@lru_cache(maxsize=1 << 16)
def module_profile(which: str, model: ModelSpec, data: DataSpec, cluster: ClusterSpec,
                   dims: ModuleDims, m: int) -> Profile:
    """Cached per (module, degrees, micro-batches): candidates share them, so a search costs
    O(candidates) arithmetic on top of O(distinct module layouts) profiles."""
    spec = model.encoder if which == "encoder" else model.llm
    times, activation = [], 0.0
    parts: dict[str, float] = {}
    seen: dict[tuple[int, ...], tuple[RankWork, dict[str, float]]] = {}
    for lens in micro_batch_lens(data, m, which):
        if lens not in seen:  # micro-batches of equal shape cost the same
            work = module_work(spec, model, dims, lens, zigzag=which == "llm")
            seen[lens] = (work, module_step(spec, model, dims, work, cluster))
        work, t = seen[lens]
        times.append(sum(t.values()))
        for key, value in t.items():
            parts[key] = parts.get(key, 0.0) + value
        activation = max(activation, activation_bytes(spec, model, dims, work))
    return Profile(tuple(times), activation, tuple(parts.items()))


def predict(candidate: Candidate, model: ModelSpec, data: DataSpec, cluster: ClusterSpec,
            with_boundary: bool = True) -> Prediction:
    """Predicted step of ``candidate``. with_boundary=False leaves the boundary out (a lower
    bound on the step time, used to prune the search before planning boundaries)."""
    enc_dims, llm_dims = candidate.encoder, candidate.llm
    m = candidate.micro_batches
    enc = module_profile("encoder", model, data, cluster, enc_dims, m)
    llm = module_profile("llm", model, data, cluster, llm_dims, m)
    bnd_t, bnd_bytes = [], 0
    for mb in micro_batches(data, m) if with_boundary else []:
        t, nbytes = boundary_time(candidate, model, cluster, mb)
        bnd_t.append(t)
        bnd_bytes = max(bnd_bytes, nbytes)
    e, l_ = np.array(enc.times), np.array(llm.times)
    b = np.array(bnd_t) if with_boundary else np.zeros(m)
    pp = llm_dims.pp
    enc_grad = grad_reduce_time(model.encoder, model, enc_dims, cluster)
    llm_grad = grad_reduce_time(model.llm, model, llm_dims, cluster)
    in_flight = min(pp, m)
    if candidate.placement == "noncolocated":
        # the encoder runs one micro-batch ahead: after the first encoder micro-batch and until
        # the last LLM one, the slower side sets the pace
        pipe = _noncolocated_pipe(e + b, l_ + b, pp)
        if cluster.cores:
            pipe = _shared_cores(e + b, l_ + b, pp, pipe, candidate, cluster)
        grads = max(enc_grad, llm_grad)
        memory = max(state_bytes(model.encoder, model, enc_dims) + min(2, m) * enc.activation,
                     state_bytes(model.llm, model, llm_dims) + in_flight * llm.activation)
    else:
        # colocated: on the first stage each micro-batch is encoder, boundary, then the LLM stage
        per_mb = e + b + l_
        pipe = float(per_mb.sum()) + (pp - 1) * float(per_mb.max())
        grads = enc_grad + llm_grad
        memory = (state_bytes(model.encoder, model, enc_dims) + state_bytes(model.llm, model, llm_dims)
                  + in_flight * (enc.activation + llm.activation))
    step = pipe + grads + cluster.step_overhead
    flops = model_flops(model, data)
    parts = {"encoder": float(e.sum()), "llm": float(l_.sum()), "boundary": float(b.sum()),
             "grad_reduce": grads, "step_overhead": cluster.step_overhead}
    parts.update((f"enc_{k}", v) for k, v in enc.parts)
    parts.update((f"llm_{k}", v) for k, v in llm.parts)
    return Prediction(candidate, step, data.tokens / step, flops / step / candidate.world_size / 1e12,
                      memory, bnd_bytes, memory <= cluster.memory, tuple(parts.items()))
