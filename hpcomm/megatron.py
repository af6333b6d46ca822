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


def megatron_layout(seq_lens: Sequence[int] | int, tp: int = 1, cp: int = 1, dp: int = 1, pp: int = 1,
                    pp_rank: int = 0, rank_offset: int = 0, sequence_parallel: bool = True,
                    cp_mode: str = "zigzag", dp_assign: str = "contiguous",
                    order: str = MEGATRON_ORDER, batch: int | None = None) -> Layout:
    """The layout of activations on pipeline stage ``pp_rank`` of a Megatron grid.

    THD-packed (``batch=None``): rows are the tokens of ``seq_lens``; DP hands out whole samples,
    CP cuts each sequence (``cp_mode``), TP splits each CP rank's rows with sequence parallelism
    or replicates them.

    Sequence-first ``[s, b, h]`` (``batch`` = the global batch size B, summed over DP;
    ``seq_lens`` = s, an int): rows are s * B + b. CP cuts s (``cp_mode``), TP splits each CP
    rank's s rows (sequence parallelism) or replicates them, DP splits b contiguously; each rank's
    local tensor is Megatron's [s / (cp * tp), B / dp, h] (tensor_split sizes when ragged).

    Example (MIMO): an encoder on ranks 0-3 and an LLM on ranks 4-7::

        encoder = megatron_layout(image_lens, tp=2, dp=2, sequence_parallel=False)
        llm = megatron_layout(seq_lens, tp=2, cp=2, rank_offset=4)
        llm_sbh = megatron_layout(4096, tp=2, cp=2, batch=8, rank_offset=4)
    """
    ranks = megatron_ranks(tp, cp, dp, pp, pp_rank, rank_offset, order)
    tp_mode = "sp" if sequence_parallel else "replicate"
    if batch is None:
        if isinstance(seq_lens, int):
            raise TypeError("seq_lens must be a list of sequence lengths (an int is the s of an "
                            "[s, b, h] tensor, which needs batch=)")
        return Layout.grid(seq_lens, dp=dp, cp=cp, tp=tp, cp_mode=cp_mode, tp_mode=tp_mode,
                           dp_assign=dp_assign, ranks=ranks, order="tp-cp-dp")
    if isinstance(seq_lens, bool) or not isinstance(seq_lens, int):
        raise TypeError(f"with batch=, seq_lens is the sequence length s (an int), got {seq_lens!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    # the s axis of the mesh lists (cp, tp) ranks tp fastest, the order megatron_ranks uses
    seq = Layout.grid([seq_lens], cp=cp, tp=tp, cp_mode=cp_mode, tp_mode=tp_mode, order="tp-cp-dp")
    return Layout.seq_first(seq, Layout.contiguous(range(dp), batch), ranks)
