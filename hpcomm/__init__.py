"""hpcomm: boundary communicators for heterogeneous-parallel training.

A ``Layout`` says which rows (and column range) of a logical tensor each rank holds; a
``Transform`` moves the tensor from one layout to another and routes its gradient back.

``import hpcomm`` loads the core only; the DTensor interop (``layout_from_placements``,
``placements_from_layout``, ``redistribute``) loads on first use, since it reads DTensor privates.
"""

from typing import Any

from hpcomm.comm import TransformError
from hpcomm.layout import Layout
from hpcomm.megatron import megatron_layout, megatron_ranks
from hpcomm.metadata import gather_lengths, padded_cp, seq_metadata
from hpcomm.plan import Plan, get_plan
from hpcomm.segments import backends
from hpcomm.transform import Transform

_LAZY = {"layout_from_placements": "hpcomm.dtensor", "placements_from_layout": "hpcomm.dtensor",
         "redistribute": "hpcomm.dtensor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcomm' has no attribute {name!r}")


__all__ = ["Layout", "Plan", "Transform", "TransformError", "backends", "gather_lengths", "get_plan",
           "layout_from_placements", "megatron_layout", "megatron_ranks", "padded_cp",
           "placements_from_layout", "redistribute", "seq_metadata"]
__version__ = "0.1.0"
