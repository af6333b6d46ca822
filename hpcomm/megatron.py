"""Megatron-Core rank order as hpcomm layouts.

Megatron-Core numbers the ranks of a module's process grid by an order string, fastest dim first
(default ``"tp-cp-ep-dp-pp"``): rank = rank_offset + tp_rank + tp * (cp_rank + cp * (dp_rank + dp *
pp_rank)). A module placed on a rank subset (MIMO's encoder and LLM grids) adds ``rank_offset``.
The activations of one pipeline stage live on the tp * cp * dp ranks of that stage; expert
parallelism does not split them (for dense activations ``ep`` folds into ``dp``), so "ep" in the
order is accepted and has size 1.
"""

from __future__ import annotations

from typing import Sequence

from hpcomm.layout import Layout

MEGATRON_ORDER = "tp-cp-ep-dp-pp"


def megatron_ranks(tp: int = 1, cp: int = 1, dp: int = 1, pp: int = 1, pp_rank: int = 0,
                   rank_offset: int = 0, order: str = MEGATRON_ORDER) -> list[int]:
    """Global ranks of pipeline stage ``pp_rank``, listed tp fastest, then cp, then dp (the order
    ``Layout.grid`` takes with ``order="tp-cp-dp"``)."""
    dims = order.split("-")
    if sorted(d for d in dims if d != "ep") != ["cp", "dp", "pp", "tp"] or len(set(dims)) != len(dims):
        raise ValueError(f"order {order!r} must name tp, cp, dp, pp (and optionally ep) once each, "
                         f"joined by '-'")
    degree = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
    for name, value in degree.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(pp_rank, bool) or not isinstance(pp_rank, int) or not 0 <= pp_rank < pp:
        raise ValueError(f"pp_rank {pp_rank!r} is not in [0, {pp})")
    if isinstance(rank_offset, bool) or not isinstance(rank_offset, int) or rank_offset < 0:
        raise ValueError(f"rank_offset must be a non-negative int, got {rank_offset!r}")
    stride, acc = {}, 1
    for d in dims:
        stride[d] = acc
        acc *= degree[d]
    return [rank_offset + t * stride["tp"] + c * stride["cp"] + d * stride["dp"]
            + pp_rank * stride["pp"]
            for d in range(dp) for c in range(cp) for t in range(tp)]


def megatron_layout(seq_lens: Sequence[int], tp: int = 1, cp: int = 1, dp: int = 1, pp: int = 1,
                    pp_rank: int = 0, rank_offset: int = 0, sequence_parallel: bool = True,
                    cp_mode: str = "zigzag", dp_assign: str = "contiguous",
                    order: str = MEGATRON_ORDER) -> Layout:
    """The layout of THD-packed activations (rows = tokens of ``seq_lens``) on pipeline stage
    ``pp_rank`` of a Megatron grid: DP hands out whole samples, CP cuts each sequence
    (``cp_mode``), TP splits each CP rank's rows with sequence parallelism or replicates them.

    Example (MIMO): an encoder on ranks 0-3 and an LLM on ranks 4-7::

        encoder = megatron_layout(image_lens, tp=2, dp=2, sequence_parallel=False)
        llm = megatron_layout(seq_lens, tp=2, cp=2, rank_offset=4)
    """
    ranks = megatron_ranks(tp, cp, dp, pp, pp_rank, rank_offset, order)
    return Layout.grid(seq_lens, dp=dp, cp=cp, tp=tp, cp_mode=cp_mode,
                       tp_mode="sp" if sequence_parallel else "replicate", dp_assign=dp_assign,
                       ranks=ranks, order="tp-cp-dp")
