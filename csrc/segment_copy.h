// Torch-facing entry points of the segment-copy kernels, shared by the CPU kernel, the CUDA glue and
// the bindings.
#pragma once

#include <ATen/core/Tensor.h>

#define CHECK_CONTIGUOUS_1D(x)                                                                       \
  TORCH_CHECK((x).dim() == 1 && (x).is_contiguous(), #x " must be a flat contiguous 1-D tensor, got shape ", \
              (x).sizes())
#define CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK_TYPE((x).scalar_type() == (y).scalar_type(), #x " and " #y " must share a dtype, got ", \
                   (x).scalar_type(), " and ", (y).scalar_type())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_TABLE(t)                                                                                        \
  do {                                                                                                        \
    TORCH_CHECK_TYPE((t).scalar_type() == at::ScalarType::Long, #t " must be int64, got ", (t).scalar_type()); \
    TORCH_CHECK((t).dim() == 2 && (t).size(1) == 6, #t " must be [num_segments, 6], got shape ", (t).sizes());  \
  } while (false)
#define CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())

namespace hpcomm {

// Checks shared by every device, O(1) per call: flat same-dtype buffers, an int64 [n, 6] table, and an
// accumulate that is defined for the dtype (float8 has no add in torch, so all backends raise TypeError).
void check_segment_args(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& table,
                        bool accumulate);

// Applies a segment table (hpcomm/segments.py) in place on CPU tensors: dst = src, or dst += src with
// accumulate. The rows are trusted: hpcomm.segments checked them once, when it prepared the table.
void apply_segments_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table, bool accumulate);

// The host half of the CUDA backend's prepare: int64 [n] inclusive prefix sums of the work items of a
// CPU [n, 6] table (fill_chunk_ends of csrc/include/segment_index.h).
at::Tensor chunk_ends(const at::Tensor& table);

// Copies src to dst (CPU) item by item exactly as the CUDA kernel numbers and cuts them
// (work_item of segment_index.h), so CPU tests check that arithmetic against the reference.
void copy_segments_by_items(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table,
                            const at::Tensor& chunk_ends);

#ifdef HPCOMM_WITH_CUDA
// The CUDA backend's apply: one launch on the current stream with a prepared device table and its
// device chunk_ends; no allocation, no copy, no sync.
void launch_segments_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table,
                          const at::Tensor& chunk_ends, int64_t total_items, bool accumulate);
#endif

}  // namespace hpcomm
