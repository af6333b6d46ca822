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
#define CHECK_DEVICE(x, dev) \
  TORCH_CHECK((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())

namespace hpcomm {

// Checks shared by every device: flat same-dtype buffers, an int64 [n, 6] table, and an accumulate
// that is defined for the dtype (float8 has no add in torch, so all backends raise TypeError).
void check_segment_args(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& table,
                        bool accumulate);

// Raises IndexError unless row i of the [n, 6] element table is non-negative and inside both buffers.
void check_segment_row(const int64_t* row, int64_t i, int64_t src_numel, int64_t dst_numel);

// Applies a segment table (hpcomm/segments.py) in place: dst = src, or dst += src with accumulate.
void copy_segments_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table, bool accumulate);

#ifdef HPCOMM_WITH_CUDA
void copy_segments_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table, bool accumulate);
#endif

// Dispatches on src's device.
void copy_segments(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table, bool accumulate);

}  // namespace hpcomm
