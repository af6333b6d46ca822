"""The compiled backends of ``hpcomm._C``: "cpp" (CPU tensors) and, when the extension was built with
CUDA kernels, "cuda". Importing this module registers them; it raises ImportError when the extension
is not built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hpcomm import _C
from hpcomm.segments import Backend, register_backend


class CppBackend(Backend):
    """CPU kernel. prepare keeps the checked host table; apply calls the entry point that trusts it."""

    name = "cpp"
    device_types = ("cpu",)

    def _prepare(self, rows: torch.Tensor, device: torch.device) -> Any:
        return rows

    def _launch(self, data: Any, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        _C.apply_segments_cpu(src, dst, data, accumulate)


@dataclass(frozen=True)
class CudaTable:
    """A table on the device with its work-item prefix sums (int64 [n] each; total_items on the host)."""

    table: torch.Tensor
    chunk_ends: torch.Tensor
    total_items: int


class CudaBackend(Backend):
    """CUDA kernels. prepare numbers the work items on the host (the arithmetic the kernel shares,
    csrc/include/segment_index.h) and moves table and prefix sums to the device once; apply is one
    launch on the current stream."""

    name = "cuda"
    device_types = ("cuda",)

    def _prepare(self, rows: torch.Tensor, device: torch.device) -> Any:
        ends = _C.chunk_ends(rows)
        return CudaTable(rows.to(device), ends.to(device), int(ends[-1]))

    def _launch(self, data: Any, src: torch.Tensor, dst: torch.Tensor, accumulate: bool) -> None:
        _C.launch_segments_cuda(src, dst, data.table, data.chunk_ends, data.total_items, accumulate)


register_backend(CppBackend())
if _C.is_cuda_compiled():
    register_backend(CudaBackend())
