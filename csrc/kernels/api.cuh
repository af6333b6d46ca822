// Launchers of the CUDA segment-copy kernels (DeepEP's csrc/kernels/api.cuh is the model): raw
// pointers, sizes and a stream, no ATen types, so this header and the .cu files compile without a
// CUDA build of torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace hpcomm {
namespace kernels {

// Element types the kernels know; copies only need the size, accumulation needs the arithmetic.
enum class DType : int {
  kFloat32,
  kFloat16,
  kBFloat16,
  kFloat64,
  kInt8,
  kUInt8,
  kInt16,
  kInt32,
  kInt64,
  kBool,
  kFloat8E4M3,
  kFloat8E5M2,
};

// Applies a [num_segments, 6] int64 segment table (see hpcomm/segments.py) in device memory: one
// launch on `stream`, no allocation, no host round trip. chunk_ends (device, [num_segments]) holds the
// inclusive prefix sums of the segments' work items and total_items its last entry, both computed
// once per table on the host by fill_chunk_ends (csrc/include/segment_index.h), the arithmetic this
// kernel numbers its items with. src, dst: flat device buffers of `dtype`. accumulate adds in the dtype
// (half and bfloat16 through float, integers wrapping, bool as or) and is undefined for float8, which
// the caller rejects. The table is trusted: the caller checked it once, against the buffer sizes too.
void copy_segments(const void* src, void* dst, const int64_t* table, const int64_t* chunk_ends, int64_t num_segments,
                   int64_t total_items, DType dtype, bool accumulate, cudaStream_t stream);

}  // namespace kernels
}  // namespace hpcomm
