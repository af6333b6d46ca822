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

// Applying a [num_segments, 6] int64 segment table (see hpcomm/segments.py) that lives in device
// memory takes two launches around a scan the caller does (torch's cumsum, say), all on `stream`
// and without a host round trip:
//   count_chunks(table, n, dtype, counts)    counts[i] = work items of segment i
//   chunk_ends = inclusive prefix sum of counts
//   copy_segments(src, dst, table, chunk_ends, n, dtype, accumulate)
// src, dst: flat device buffers of `dtype`. accumulate adds in the dtype (half and bfloat16 through
// float, integers wrapping, bool as or) and is undefined for float8, which the caller rejects.
void count_chunks(const int64_t* table, int64_t num_segments, DType dtype, int64_t* chunk_counts, cudaStream_t stream);

void copy_segments(const void* src, void* dst, const int64_t* table, const int64_t* chunk_ends, int64_t num_segments,
                   DType dtype, bool accumulate, cudaStream_t stream);

}  // namespace kernels
}  // namespace hpcomm
