"""The reference multimodal trainer: a ViT encoder and a decoder-only LLM, each with its own
DP x CP x TP(-SP) layout, colocated or on disjoint ranks, joined by an hpcomm Transform.

model.py (no parallelism) -> parallelize.py (sharding, SP/CP collectives, gradient reduction)
-> train.py (boundary, micro-batch schedule, CLI ``hpcomm-train``); data.py has the synthetic task,
the JSONL manifest reader and THD packing.
"""
