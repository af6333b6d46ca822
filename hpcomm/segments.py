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

Backends: each is a ``Backend`` registered under its name. ``prepare(table, device)`` runs once per
table and device (the execution layer caches the result with the plan): it checks the table, computes
what the launch needs and moves it to the device. ``apply(prepared, src, dst, accumulate)`` runs per
call and only launches: no host<->device copy, no device->host sync, no table-sized work; its checks
are O(1) (flat buffers that reach the table's extents, dtypes).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

TABLE_COLUMNS = ("src_offset", "dst_offset", "num_lines", "line_len", "src_stride", "dst_stride")

# The one list of kernel backends: name -> module that registers it on import (None: this module),
# in order of preference for "auto" (the first usable on the device wins; torch runs everywhere).
_BUILTIN: dict[str, str | None] = {
    "cuda": "hpcomm._cpp_backend",
    "cpp": "hpcomm._cpp_backend",
    "triton": "hpcomm.triton_kernels.segment_copy",
    "torch": None,
}

Row = tuple[int, int, int, int, int, int]


@dataclass(frozen=True, eq=False)
class Prepared:
    """A table prepared for one backend and device. ``data`` is the backend's own (device tables,
    prefix sums, launch sizes); the extents are the element counts src and dst must reach."""

    backend: str
    device: torch.device
    num_segments: int
    src_extent: int
    dst_extent: int
    data: Any = None


class Backend:
    """A kernel backend. Subclasses set ``name`` and ``device_types`` and implement ``_prepare``
    (table-sized work, once) and ``_launch`` (per call, launches only)."""

    name: str = ""
    device_types: tuple[str, ...] = ()

    def unusable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` in this process, or None if it can."""
        if device.type not in self.device_types:
            return f"backend {self.name!r} runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        return None

    def usable(self, device: torch.device) -> bool:
        return self.unusable_reason(device) is None

    def prepare(self, table: torch.Tensor, device: torch.device) -> Prepared:
        """table: int64 [num_segments, 6] (read on the host, once). Checks it, then prepares it for
        launches on ``device``. ValueError on a malformed table or an unusable device."""
        reason = self.unusable_reason(device)
        if reason is not None:
            raise ValueError(reason)
        rows = checked_table(table)
        src_extent, dst_extent = table_extents(rows)
        data = self._prepare(rows, device) if len(rows) else None
        return Prepared(self.name, device, len(rows), src_extent, dst_extent, data)

    def apply(self, prepared: Prepared, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        """Apply a prepared table in place. src [>= src_extent], dst [>= dst_extent]: flat contiguous,
        on the prepared device. IndexError if a buffer is too small for the table."""
        if src.dim() != 1 or dst.dim() != 1 or not src.is_contiguous() or not dst.is_contiguous():
            raise ValueError(f"src and dst must be flat contiguous 1-D tensors, got {tuple(src.shape)} and "
                             f"{tuple(dst.shape)}")
        if src.numel() < prepared.src_extent or dst.numel() < prepared.dst_extent:
            raise IndexError(f"the table reads {prepared.src_extent} elements of src and writes "
                             f"{prepared.dst_extent} of dst; got {src.numel()} and {dst.numel()}")
        if prepared.num_segments:
            self._launch(prepared.data, src, dst, accumulate)

    def _prepare(self, rows: torch.Tensor, device: torch.device) -> Any:
        """rows: checked CPU int64 [n, 6], n > 0 -> the backend's launch data."""
        raise NotImplementedError

    def _launch(self, data: Any, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        raise NotImplementedError


def checked_table(table: torch.Tensor) -> torch.Tensor:
    """The table as a contiguous CPU int64 [n, 6] tensor; TypeError / ValueError (naming the first
    bad segment) unless it is int64 [n, 6] with no negative entry."""
    if not isinstance(table, torch.Tensor) or table.dtype != torch.int64:
        raise TypeError(f"a segment table must be an int64 tensor, got "
                        f"{table.dtype if isinstance(table, torch.Tensor) else type(table).__name__}")
    if table.dim() != 2 or table.shape[1] != len(TABLE_COLUMNS):
        raise ValueError(f"a segment table must be [num_segments, 6], got {tuple(table.shape)}")
    rows = table.cpu().contiguous()
    negative = (rows < 0).any(dim=1)
    if bool(negative.any()):
        i = int(negative.nonzero()[0])
        raise ValueError(f"segment {i} has a negative entry: {tuple(rows[i].tolist())}")
    return rows


def table_extents(rows: torch.Tensor) -> tuple[int, int]:
    """Elements of src and of dst a checked table reaches: (src_extent, dst_extent)."""
    live = (rows[:, 2] > 0) & (rows[:, 3] > 0)
    if not bool(live.any()):
        return 0, 0
    r = rows[live]
    last_line = r[:, 2] - 1
    src_end = r[:, 0] + last_line * r[:, 4] + r[:, 3]
    dst_end = r[:, 1] + last_line * r[:, 5] + r[:, 3]
    return int(src_end.max()), int(dst_end.max())


def _apply_rows(src: torch.Tensor, dst: torch.Tensor, rows: Sequence[Sequence[int]], accumulate: bool) -> None:
    # Offsets are relative to the tensors, which may be views into a larger storage.
    src_base, dst_base = src.storage_offset(), dst.storage_offset()
    for src_off, dst_off, lines, length, src_stride, dst_stride in rows:
        if lines == 0 or length == 0:
            continue
        s = src.as_strided((lines, length), (src_stride, 1), src_base + src_off)
        d = dst.as_strided((lines, length), (dst_stride, 1), dst_base + dst_off)
        if accumulate:
            d.add_(s)
        else:
            d.copy_(s)


def copy_segments_reference(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor,
                            accumulate: bool = False) -> None:
    """The oracle: one strided view copy (or add) per segment. src, dst: flat [numel]."""
    _apply_rows(src, dst, table.tolist(), accumulate)


class TorchBackend(Backend):
    """The reference as a backend: runs anywhere, and converts when src and dst dtypes differ (the
    execution layer relies on that for a wire dtype). Its rows become Python ints once, in prepare,
    so a call reads nothing back from the device."""

    name = "torch"
    device_types = ("cpu", "cuda")

    def unusable_reason(self, device: torch.device) -> str | None:
        return None

    def _prepare(self, rows: torch.Tensor, device: torch.device) -> Any:
        live = (rows[:, 2] > 0) & (rows[:, 3] > 0)
        return tuple(tuple(r) for r in rows[live].tolist())

    def _launch(self, data: Any, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        _apply_rows(src, dst, data, accumulate)


_REGISTRY: dict[str, Backend] = {}
_loaded: set[str] = set()


def register_backend(backend: Backend) -> None:
    """Make a backend selectable by its name (the modules of _BUILTIN call this on import; a name
    outside _BUILTIN is added after them, so "auto" never picks it)."""
    _REGISTRY[backend.name] = backend


def backend_names() -> tuple[str, ...]:
    """Every known backend name, built-in first in "auto" preference order."""
    return tuple(_BUILTIN) + tuple(name for name in _REGISTRY if name not in _BUILTIN)


def _load(name: str) -> Backend | None:
    # Imported on first use, so that importing hpcomm never requires the extension or triton.
    module = _BUILTIN.get(name)
    if module is not None and module not in _loaded:
        _loaded.add(module)
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    return _REGISTRY.get(name)


def backends() -> dict[str, bool]:
    """Which kernel backends are usable in this process (built and importable): {name: available}."""
    return {name: _load(name) is not None for name in backend_names()}


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend called ``name`` for tensors on ``device``; "auto" is the first usable one of
    backend_names() (cuda, triton, torch on a GPU; cpp, torch on a CPU). ValueError when the name is
    unknown, the backend is not built here, or it cannot run on ``device``."""
    if name == "auto":
        for candidate in backend_names():
            backend = _load(candidate)
            if backend is not None and backend.usable(device):
                return backend
    if name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(('auto',) + backend_names())}")
    backend = _load(name)
    if backend is None:
        available = [n for n, ok in backends().items() if ok]
        raise ValueError(f"backend {name!r} is not available in this build; available: {', '.join(available)}")
    reason = backend.unusable_reason(device)
    if reason is not None:
        raise ValueError(reason)
    return backend


def resolve_backend(name: str, device: torch.device) -> str:
    """The name get_backend(name, device) resolves to; for callers that select backends by name."""
    return get_backend(name, device).name


def copy_segments(src: torch.Tensor, dst: torch.Tensor, table: torch.Tensor, accumulate: bool = False,
                  backend: str = "torch") -> None:
    """Prepare and apply in one call (tests, tools; the hot path keeps the Prepared). src, dst: flat
    contiguous, on one device; the same dtype except with the torch backend, which converts."""
    impl = get_backend(backend, dst.device)
    impl.apply(impl.prepare(table, dst.device), src, dst, accumulate)


register_backend(TorchBackend())
