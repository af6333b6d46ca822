"""Enumerate and rank candidate configurations for a cluster.

The search is branch and bound: every candidate is first priced without its boundary (module
profiles are cached and shared, so this is cheap arithmetic), then candidates are visited in order
of that lower bound and their boundary is planned exactly until the bound of the next one exceeds
the ``top``-th best full prediction. The reported ranking is therefore exact for the model.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .cost import predict
from .spec import Candidate, ClusterSpec, DataSpec, ModelSpec, ModuleDims, ModuleSpec, Prediction


def _pow2(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def tp_options(m: ModuleSpec, cluster: ClusterSpec, ranks: int) -> list[int]:
    """TP degrees that split whole heads (and KV heads) and stay inside one node."""
    kv = m.kv_heads or m.heads
    return [t for t in _pow2(min(cluster.gpus_per_node, ranks)) if m.heads % t == 0 and kv % t == 0
            and ranks % t == 0]


def llm_options(model: ModelSpec, data: DataSpec, cluster: ClusterSpec, ranks: int,
                max_cp: int = 32, max_pp: int = 8) -> list[ModuleDims]:
    llm = model.llm
    out = []
    for tp in tp_options(llm, cluster, ranks):
        for cp in _pow2(max_cp):
            for pp in _pow2(max_pp):
                if llm.layers % pp or ranks % (tp * cp * pp):
                    continue
                dp = ranks // (tp * cp * pp)
                if dp <= len(data.samples):
                    out.append(ModuleDims(dp=dp, cp=cp, tp=tp, pp=pp))
    return out


def micro_batch_options(dims: ModuleDims, data: DataSpec, per_rank: tuple[int, ...] = (1, 2, 4)) -> list[int]:
    """Micro-batches holding ``per_rank`` samples per LLM DP rank (at least one micro-batch per
    pipeline stage when pipelined)."""
    out = set()
    for k in per_rank:
        m = max(1, len(data.samples) // (dims.dp * k))
        if m >= dims.pp or m == len(data.samples) // dims.dp:
            out.add(m)
    return sorted(out)


def encoder_options(model: ModelSpec, cluster: ClusterSpec, ranks: int) -> list[ModuleDims]:
    return [ModuleDims(dp=ranks // t, tp=t) for t in tp_options(model.encoder, cluster, ranks)]


def candidates(model: ModelSpec, data: DataSpec, cluster: ClusterSpec,
               encoder_fractions: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2)) -> list[Candidate]:
    """Homogeneous, colocated heterogeneous and non-colocated configurations of cluster.gpus
    ranks. Non-colocated splits give the encoder the listed fractions of the GPUs (whole nodes
    when there are several nodes)."""
    g = cluster.gpus
    out: list[Candidate] = []
    for llm in llm_options(model, data, cluster, g):
        for m in micro_batch_options(llm, data):
            out.append(Candidate(ModuleDims(dp=llm.dp, cp=llm.cp, tp=llm.tp), llm, "homogeneous", m))
            for enc in encoder_options(model, cluster, llm.stage.size):
                if (enc.dp, enc.cp, enc.tp) != (llm.dp, llm.cp, llm.tp):
                    out.append(Candidate(enc, llm, "colocated", m))
    unit = cluster.gpus_per_node if g >= 4 * cluster.gpus_per_node else 1
    splits = sorted({max(unit, round(g * f / unit) * unit) for f in encoder_fractions} - {0, g})
    for e in splits:
        for llm in llm_options(model, data, cluster, g - e):
            for m in micro_batch_options(llm, data):
                for enc in encoder_options(model, cluster, e):
                    out.append(Candidate(enc, llm, "noncolocated", m))
    return out


@dataclass(frozen=True)
class Ranking:
    """Best first; ``best_homogeneous`` for the headline gain; ``evaluated`` candidates whose
    boundary was planned out of ``considered``."""

    predictions: tuple[Prediction, ...]
    best_homogeneous: Prediction | None
    considered: int
    evaluated: int

    def gain(self) -> float | None:
        """Best over best homogeneous, in percent of tokens/s (equal work per step, so the same as
        TFLOPS per GPU when the GPU counts match)."""
        if not self.predictions or self.best_homogeneous is None:
            return None
        return 100 * (self.predictions[0].tokens_per_s / self.best_homogeneous.tokens_per_s - 1)


def rank(model: ModelSpec, data: DataSpec, cluster: ClusterSpec, top: int = 10,
         pool: list[Candidate] | None = None) -> Ranking:
    """The ``top`` fastest configurations that fit in memory (by tokens/s), exactly, plus the
    fastest homogeneous one."""
    pool = candidates(model, data, cluster) if pool is None else pool
    bounds = []
    for i, c in enumerate(pool):
        p = predict(c, model, data, cluster, with_boundary=False)
        if p.fits:  # the boundary adds no memory the bound has not counted
            bounds.append((p.step_time, i, c))
    bounds.sort()
    best: list[tuple[float, int, Prediction]] = []  # max-heap of the top by step time
    best_homog: Prediction | None = None
    evaluated = 0
    for lower, i, c in bounds:
        full_top = len(best) == top and lower > -best[0][0]
        homog_done = best_homog is not None and lower > best_homog.step_time
        if full_top and (homog_done or c.placement != "homogeneous"):
            if homog_done:
                break
            continue
        p = predict(c, model, data, cluster)
        evaluated += 1
        if c.placement == "homogeneous" and (best_homog is None or p.step_time < best_homog.step_time):
            best_homog = p
        heapq.heappush(best, (-p.step_time, i, p))
        if len(best) > top:
            heapq.heappop(best)
    ranked = tuple(p for _, _, p in sorted(best, key=lambda t: (-t[0], t[1])))
    return Ranking(ranked, best_homog, len(pool), evaluated)


def table(ranking: Ranking) -> str:
    """A Markdown table of the ranking, then the headline gain."""
    head = ("| # | placement | encoder | LLM | micro-batches | step s | tokens/s | TFLOPS/GPU | "
            "memory GB | boundary MB |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    listed = list(ranking.predictions)
    hom = ranking.best_homogeneous
    if hom is not None and hom not in listed:
        listed.append(hom)
    for i, p in enumerate(listed):
        c = p.candidate
        tag = str(i + 1) if i < len(ranking.predictions) else "homog."
        rows.append(f"| {tag} | {c.placement} | {c.encoder} | {c.llm} | {c.micro_batches} | "
                    f"{p.step_time:.4g} | {p.tokens_per_s:,.0f} | {p.tflops_per_gpu:.3g} | "
                    f"{p.memory / 1e9:.3g} | {p.boundary_bytes / 1e6:.3g} |")
    gain = ranking.gain()
    tail = (f"\nbest vs best homogeneous: {gain:+.1f}% tokens/s (and TFLOPS/GPU)"
            if gain is not None else "\nno homogeneous configuration fits")
    return "\n".join([head, *rows]) + tail + (
        f"\n{ranking.considered} candidates, {ranking.evaluated} with planned boundaries")
