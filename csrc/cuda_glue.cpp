// Torch-facing glue of the CUDA kernels: checks, stream, one launcher call. Built only with
// -DHPCOMM_WITH_CUDA (setup.py sets it when it compiles csrc/kernels/*.cu).
#ifdef HPCOMM_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "kernels/api.cuh"
#include "segment_copy.h"
#include "segment_index.h"

namespace hpcomm {
namespace {

kernels::DType kernel_dtype(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat32: return kernels::DType::kFloat32;
    case torch::kFloat16: return kernels::DType::kFloat16;
    case torch::kBFloat16: return kernels::DType::kBFloat16;
    case torch::kFloat64: return kernels::DType::kFloat64;
    case torch::kInt8: return kernels::DType::kInt8;
    case torch::kUInt8: return kernels::DType::kUInt8;
    case torch::kInt16: return kernels::DType::kInt16;
    case torch::kInt32: return kernels::DType::kInt32;
    case torch::kInt64: return kernels::DType::kInt64;
    case torch::kBool: return kernels::DType::kBool;
    case torch::kFloat8_e4m3fn: return kernels::DType::kFloat8E4M3;
    case torch::kFloat8_e5m2: return kernels::DType::kFloat8E5M2;
    default: TORCH_CHECK_TYPE(false, "the CUDA segment kernels do not support ", dtype);
  }
}

}  // namespace

void copy_segments_cuda(const torch::Tensor& src, torch::Tensor& dst, const torch::Tensor& table, bool accumulate) {
  check_segment_args(src, dst, table, accumulate);
  CHECK_DEVICE(src, torch::kCUDA);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t num_segments = table.size(0);
  // A host table (what plans produce) is checked and sized here; a device table is trusted, since
  // reading it back would synchronise the stream.
  int64_t chunks_per_segment = kernels::kMaxChunksPerSegment;
  torch::Tensor device_table = table;
  if (table.device().is_cpu()) {
    const int64_t* rows = table.data_ptr<int64_t>();
    chunks_per_segment = 1;
    for (int64_t i = 0; i < num_segments; ++i) {
      check_segment_row(rows + i * kTableColumns, i, src.numel(), dst.numel());
      const Segment seg = load_segment(rows, i, src.element_size());
      chunks_per_segment = std::max(chunks_per_segment, num_chunks(chunk_shape(seg, kernels::kChunkBytes)));
    }
    device_table = table.to(src.device(), /*non_blocking=*/table.is_pinned());
  } else {
    TORCH_CHECK(table.device() == src.device(), "table must be on the host or on ", src.device());
  }
  kernels::copy_segments(src.data_ptr(), dst.data_ptr(), device_table.data_ptr<int64_t>(), num_segments,
                         kernel_dtype(src.scalar_type()), accumulate, chunks_per_segment,
                         c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace hpcomm

#endif  // HPCOMM_WITH_CUDA
