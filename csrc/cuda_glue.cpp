// Torch-facing glue of the CUDA kernels: checks, stream, the launchers of csrc/kernels/api.cuh. Built
// only with -DHPCOMM_WITH_CUDA (setup.py sets it when it compiles csrc/kernels/*.cu).
#ifdef HPCOMM_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/api.cuh"
#include "segment_copy.h"
#include "segment_index.h"

namespace hpcomm {
namespace {

kernels::DType kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::ScalarType::Float: return kernels::DType::kFloat32;
    case at::ScalarType::Half: return kernels::DType::kFloat16;
    case at::ScalarType::BFloat16: return kernels::DType::kBFloat16;
    case at::ScalarType::Double: return kernels::DType::kFloat64;
    case at::ScalarType::Char: return kernels::DType::kInt8;
    case at::ScalarType::Byte: return kernels::DType::kUInt8;
    case at::ScalarType::Short: return kernels::DType::kInt16;
    case at::ScalarType::Int: return kernels::DType::kInt32;
    case at::ScalarType::Long: return kernels::DType::kInt64;
    case at::ScalarType::Bool: return kernels::DType::kBool;
    case at::ScalarType::Float8_e4m3fn: return kernels::DType::kFloat8E4M3;
    case at::ScalarType::Float8_e5m2: return kernels::DType::kFloat8E5M2;
    default: TORCH_CHECK_TYPE(false, "the CUDA segment kernels do not support ", dtype);
  }
}

}  // namespace

void copy_segments_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table, bool accumulate) {
  check_segment_args(src, dst, table, accumulate);
  CHECK_DEVICE(src, at::kCUDA);
  TORCH_CHECK(table.is_cpu() || table.device() == src.device(), "table must be on the host or on ", src.device());
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t num_segments = table.size(0);
  if (num_segments == 0) return;
  at::Tensor rows = table.contiguous();
  // A host table (what plans produce) is checked here; a device table is trusted, since reading it
  // back would synchronise the stream.
  if (rows.is_cpu()) {
    const int64_t* host_rows = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < num_segments; ++i) {
      check_segment_row(host_rows + i * kTableColumns, i, src.numel(), dst.numel());
    }
    rows = rows.to(src.device(), /*non_blocking=*/rows.is_pinned());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const kernels::DType dtype = kernel_dtype(src.scalar_type());
  at::Tensor chunk_counts = at::empty({num_segments}, rows.options());
  kernels::count_chunks(rows.data_ptr<int64_t>(), num_segments, dtype, chunk_counts.data_ptr<int64_t>(), stream);
  const at::Tensor chunk_ends = chunk_counts.cumsum(0);
  kernels::copy_segments(src.data_ptr(), dst.data_ptr(), rows.data_ptr<int64_t>(), chunk_ends.data_ptr<int64_t>(),
                         num_segments, dtype, accumulate, stream);
}

}  // namespace hpcomm

#endif  // HPCOMM_WITH_CUDA
