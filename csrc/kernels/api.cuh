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

// Bytes a thread block aims to move per (segment, line chunk) work item.
constexpr int64_t kChunkBytes = 32 * 1024;

// gridDim.y is 16 bits wide; blocks loop over the chunks beyond it.
constexpr int64_t kMaxChunksPerSegment = 65535;

// Applies a [num_segments, 6] int64 segment table that lives in device memory (see
// hpcomm/segments.py): dst = src, or dst += src with accumulate. src, dst: flat device buffers of
// `dtype`. chunks_per_segment is gridDim.y, at most kMaxChunksPerSegment; the largest
// num_chunks(chunk_shape(segment, kChunkBytes)) of the table when the caller knows it.
// accumulate is defined for every DType except the float8 ones (the caller rejects those).
void copy_segments(const void* src, void* dst, const int64_t* table, int64_t num_segments, DType dtype,
                   bool accumulate, int64_t chunks_per_segment, cudaStream_t stream);

}  // namespace kernels
}  // namespace hpcomm
