"""The segment-table contract shared by every kernel backend, its pure-PyTorch reference, and the
backend registry.

A segment table is an int64 tensor ``[num_segments, 6]`` whose columns are

    (src_offset, dst_offset, num_lines, line_len, src_stride, dst_stride)

all in elements of two flat, contiguous 1-D tensors ``src`` and ``dst`` of the same dtype. Segment i
moves the 2-D block of ``num_lines`` lines of ``line_len`` elements: line j starts at
``src_offset + j * src_stride`` in src and lands at ``dst_offset + j * dst_stride`` in dst. Every
data movement of a plan (pack into a send buffer, unpack from a receive buffer, local copy, column
windows of a hidden-split layout) is such a table, so one kernel family serves them all.

Contract every backend keeps:
- destinations of the segments of one table do not overlap (the planner guarantees it), so segments
  may run in any order and in parallel; results are bitwise identical across backends;
- ``accumulate=False`` assigns, ``accumulate=True`` adds in the destination dtype (one add per
  element per table, so the order of contributions is the order in which tables are applied);
- an empty table, zero-length lines and zero-line segments are no-ops.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

TABLE_COLUMNS = ("src_offset", "dst_offset", "num_lines", "line_len", "src_stride", "dst_stride")

CopyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], None]


def copy_segments_reference(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor,
                            accumulate: bool = False) -> None:
    """The oracle: one strided view copy (or add) per segment. src, dst: flat [numel]."""
    for src_off, dst_off, lines, length, src_stride, dst_stride in table.tolist():
        if lines == 0 or length == 0:
            continue
        s = src.as_strided((lines, length), (src_stride, 1), src_off)
        d = dst.as_strided((lines, length), (dst_stride, 1), dst_off)
        if accumulate:
            d.add_(s)
        else:
            d.copy_(s)


_BACKENDS: dict[str, CopyFn] = {"torch": copy_segments_reference}


def register_backend(name: str, fn: CopyFn) -> None:
    """Make a kernel backend selectable by name (called by the modules that implement one)."""
    _BACKENDS[name] = fn


def backends() -> dict[str, bool]:
    """Which kernel backends are usable in this process: {name: available}."""
    _load_optional_backends()
    return {name: name in _BACKENDS for name in ("torch", "cpp", "cuda", "triton")}


def triton_usable_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    return "triton" in _BACKENDS and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to the fastest backend usable on ``device``; check an explicit name."""
    _load_optional_backends()
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
        return next(name for name in order if name in _BACKENDS and
                    (name != "triton" or triton_usable_on(device)))
    if backend not in ("torch", "cpp", "cuda", "triton"):
        raise ValueError(f"unknown backend {backend!r}; expected one of auto, torch, cpp, cuda, triton")
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not available in this build; available: "
                         f"{sorted(_BACKENDS)}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {device.type} tensors")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' needs CPU tensors, got {device.type} tensors")
    if backend == "triton" and not triton_usable_on(device):
        raise ValueError("backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1 "
                         "(set it before importing triton)")
    return backend


class Prepared:
    """A table prepared for one backend and device (interim: the table itself)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table


class Backend:
    """Interim adapter of a registered copy function to prepare/apply."""

    def __init__(self, name: str) -> None:
        self.name = name

    def prepare(self, table: torch.Tensor, device: torch.device) -> Prepared:
        return Prepared(table if device.type == "cpu" else table.to(device))

    def apply(self, prepared: Prepared, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        _BACKENDS[self.name](src, dst, prepared.table, accumulate)


def backend_names() -> tuple[str, ...]:
    return ("torch", "cpp", "cuda", "triton")


def get_backend(name: str, device: torch.device) -> Backend:
    return Backend(resolve_backend(name, device))


def copy_segments(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor, accumulate: bool = False,
                  backend: str = "torch") -> None:
    """Apply a segment table (see module docstring). src, dst: flat contiguous, same dtype and device."""
    _load_optional_backends()
    _BACKENDS[backend](src, dst, table, accumulate)


_loaded = False


def _load_optional_backends() -> None:
    # Imported lazily so that importing hpcomm never requires the extension or triton.
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from hpcomm import _cpp_backend  # noqa: F401  (registers "cpp" and, if compiled, "cuda")
    except ImportError:
        pass
    try:
        from hpcomm.triton_kernels import segment_copy  # noqa: F401  (registers "triton")
    except ImportError:
        pass
