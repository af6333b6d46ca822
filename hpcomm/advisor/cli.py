"""hpcomm-advise: rank encoder/LLM layouts and placements for a cluster.

    hpcomm-advise --cluster h100 --gpus 64 --model vit-8b --context 32768
    hpcomm-advise --cluster h200 --gpus 1024 --model vit-8b --context 131072 --images-per-sample 32
    hpcomm-advise --model vit-8b --llm-layers 40 --frozen-encoder --manifest data.jsonl
    hpcomm-advise --calibrate --output this-machine.json        # measure this machine (4 ranks)
    hpcomm-advise --cluster this-machine.json --model reference --batch 16 --reference-data

Prints the model, cluster and batch it reasons about, then a Markdown table, best first: placement (homogeneous: the encoder inherits the LLM's
layout; colocated; non-colocated with the encoder on the first ranks), degrees, micro-batches,
predicted step time, tokens/s, TFLOPS per GPU, memory per rank and the busiest rank's boundary
bytes per micro-batch, then the best configuration's gain over the best homogeneous one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from typing import Sequence

from .search import rank, table
from .spec import PRESETS, ClusterSpec, DataSpec, ModelSpec, ModuleSpec

# A SigLIP-so400m-style ViT (patch 14) and a Llama-3-8B-style LLM: the "8B-class" pair.
MODELS = {
    "vit-8b": ModelSpec(
        encoder=ModuleSpec(layers=27, hidden=1152, heads=16, ffn=4304, causal=False,
                           in_features=3 * 14 * 14, out_features=4096),
        llm=ModuleSpec(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, gated=True,
                       vocab=128256)),
}


def load_cluster(name: str) -> ClusterSpec:
    if name in PRESETS:
        return PRESETS[name]
    with open(name) as f:
        return ClusterSpec.from_json(f.read())


def build_model(args: argparse.Namespace) -> ModelSpec:
    if args.model == "reference":
        from .reference import reference_model

        model = reference_model()
    else:
        model = MODELS[args.model]
    enc, llm = model.encoder, model.llm
    enc = replace(enc, **{k: v for k, v in (("layers", args.encoder_layers), ("hidden", args.encoder_hidden),
                                            ("heads", args.encoder_heads), ("ffn", args.encoder_ffn))
                          if v is not None}, frozen=args.frozen_encoder or enc.frozen)
    llm = replace(llm, **{k: v for k, v in (("layers", args.llm_layers), ("hidden", args.llm_hidden),
                                            ("heads", args.llm_heads), ("kv_heads", args.llm_kv_heads),
                                            ("ffn", args.llm_ffn), ("vocab", args.vocab)) if v is not None})
    return replace(model, encoder=replace(enc, out_features=llm.hidden), llm=llm)


def build_data(args: argparse.Namespace) -> DataSpec:
    if args.reference_data:
        from hpcomm.trainer.train import TrainConfig

        from .reference import reference_data

        return reference_data(TrainConfig(batch_size=args.batch))
    if args.manifest:
        return DataSpec.from_manifest(args.manifest, args.batch, args.patch)
    text = args.context - args.images_per_sample * args.tokens_per_image
    if text < 1:
        raise ValueError(f"--context {args.context} leaves no room for text after "
                         f"{args.images_per_sample} x {args.tokens_per_image} image tokens")
    spread = args.text_spread * text
    return DataSpec.from_distribution(args.batch, args.images_per_sample, args.tokens_per_image, text,
                                      max(1, int(text - spread)), int(text + spread) if spread else 0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcomm-advise", description=__doc__.split("\n")[0])
    p.add_argument("--cluster", default="h100", help=f"a preset ({', '.join(PRESETS)}) or a JSON "
                   "file written by --calibrate (default: %(default)s)")
    p.add_argument("--gpus", type=int, help="GPU count (default: the cluster's own, 8 in a preset)")
    p.add_argument("--model", default="vit-8b", choices=[*MODELS, "reference"],
                   help="vit-8b: a SigLIP-so400m-style ViT and a Llama-3-8B-style LLM; reference: "
                   "hpcomm-train's model (default: %(default)s)")
    names = {"layers": "transformer blocks", "hidden": "hidden width", "heads": "attention heads",
             "ffn": "MLP width"}
    for module in ("encoder", "llm"):
        for field, what in names.items():
            p.add_argument(f"--{module}-{field}", type=int,
                           help=f"the {module.replace('llm', 'LLM')}'s {what} (default: the model's)")
    p.add_argument("--llm-kv-heads", type=int,
                   help="the LLM's key/value heads, fewer than its heads for GQA (default: the model's)")
    p.add_argument("--vocab", type=int, help="the LLM's vocabulary size (default: the model's)")
    p.add_argument("--frozen-encoder", action="store_true",
                   help="train the LLM only: no encoder gradients or optimizer state (default: the "
                   "encoder trains)")
    p.add_argument("--batch", type=int, default=0, help="samples per step (default: GPUs / 2)")
    p.add_argument("--context", type=int, default=8192,
                   help="tokens per sample, image tokens included (default: %(default)s)")
    p.add_argument("--images-per-sample", type=int, default=2,
                   help="images in each sample (default: %(default)s)")
    p.add_argument("--tokens-per-image", type=int, default=1024,
                   help="tokens of each image: its encoder rows, and as many LLM rows "
                   "(default: %(default)s)")
    p.add_argument("--text-spread", type=float, default=0.0,
                   help="text lengths uniform within +-this fraction of the mean (default: "
                   "%(default)s, every sample as long as --context)")
    p.add_argument("--manifest", help="a JSONL file of {image, text} lines to measure the batch "
                   "from instead of --context and the image options (default: none)")
    p.add_argument("--patch", type=int, default=14,
                   help="patch side in pixels, for --manifest images (default: %(default)s)")
    p.add_argument("--reference-data", action="store_true",
                   help="the batch hpcomm-train reads at its first step, --batch samples "
                   "(default: off)")
    p.add_argument("--top", type=int, default=10,
                   help="configurations to show (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print the model, cluster and ranking as JSON instead (default: off)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine with --ranks processes and write the cluster to "
                   "--output (default: off)")
    p.add_argument("--ranks", type=int, default=4,
                   help="processes for --calibrate (default: %(default)s)")
    p.add_argument("--output", default="cluster.json",
                   help="where --calibrate writes the cluster (default: %(default)s)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def _count(n: float) -> str:
    """433_000_000 -> "433 M"."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g}"


def describe_module(m: ModuleSpec) -> str:
    heads = f"{m.heads} heads" + (f" ({m.kv_heads} KV)" if m.kv_heads not in (0, m.heads) else "")
    return (f"{m.layers} layers, hidden {m.hidden}, {heads}, MLP {m.ffn}{' gated' if m.gated else ''}"
            + (f", vocab {m.vocab:,}" if m.vocab else "") + f"; {_count(m.params())} parameters"
            + (", frozen" if m.frozen else ""))


def describe_cluster(c: ClusterSpec) -> str:
    return (f"cluster {c.name}: {c.gpus} GPUs, {c.gpus_per_node} per node; each "
            f"{c.flops / 1e12:.3g} TFLOP/s peak at {c.efficiency:.0%} efficiency, "
            f"{c.memory / 1e9:.3g} GB\n  links {c.intra_bw / 1e9:.3g} GB/s in a node, "
            f"{c.inter_bw / 1e9:.3g} GB/s between nodes")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.calibrate:
        from .calibrate import calibrate

        cluster = calibrate(args.ranks)
        with open(args.output, "w") as f:
            f.write(cluster.to_json() + "\n")
        print(cluster.to_json())
        print(f"wrote {args.output}")
        return 0
    try:
        cluster = load_cluster(args.cluster)
        if args.gpus:
            cluster = cluster.with_gpus(args.gpus)
        args.batch = args.batch or max(1, cluster.gpus // 2)
        model, data = build_model(args), build_data(args)
    except (ValueError, OSError) as e:
        print(f"hpcomm-advise: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    ranking = rank(model, data, cluster, top=args.top)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({"model": asdict(model), "cluster": asdict(cluster),
                          "predictions": [asdict(p) for p in ranking.predictions],
                          "best_homogeneous": asdict(ranking.best_homogeneous) if ranking.best_homogeneous else None,
                          "gain_percent": ranking.gain(), "search_seconds": seconds}, indent=1))
        return 0
    print(f"model {args.model}: encoder {describe_module(model.encoder)}")
    print(f"  LLM {describe_module(model.llm)}")
    print(describe_cluster(cluster))
    print(f"batch: {len(data.samples)} samples x {data.tokens / len(data.samples):,.0f} tokens "
          "per step")
    print(table(ranking))
    print(f"search: {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
