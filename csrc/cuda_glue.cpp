// Torch-facing glue of the CUDA kernels: O(1) argument checks, device guard, stream, then the launcher
// of csrc/kernels/api.cuh. The table and its chunk_ends were prepared once (hpcomm/segments.py, with
// hpcomm::chunk_ends on the host) and moved to the device then. Built only with -DHPCOMM_WITH_CUDA
// (setup.py sets it when it compiles csrc/kernels/*.cu).
#ifdef HPCOMM_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/api.cuh"
#include "segment_copy.h"

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

void launch_segments_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table,
                          const at::Tensor& chunk_ends, int64_t total_items, bool accumulate) {
  check_segment_args(src, dst, table, accumulate);
  CHECK_DEVICE(src, at::kCUDA);
  TORCH_CHECK(table.device() == src.device() && chunk_ends.device() == src.device(),
              "the prepared table and chunk_ends must be on ", src.device());
  const c10::cuda::CUDAGuard guard(src.device());
  kernels::copy_segments(src.data_ptr(), dst.data_ptr(), table.data_ptr<int64_t>(), chunk_ends.data_ptr<int64_t>(),
                         table.size(0), total_items, kernel_dtype(src.scalar_type()), accumulate,
                         c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace hpcomm

#endif  // HPCOMM_WITH_CUDA
