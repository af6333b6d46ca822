// CUDA kernels of the segment-table contract (hpcomm/segments.py). The grid strides over the
// table's (segment, line chunk) work items (work_item in csrc/include/segment_index.h), numbered
// through the prefix sums of the per-segment item counts that the host computed once per table, so a table of a million short rows and a table of one
// 1 GiB run both spread evenly over a grid sized to the GPU. A chunk of several lines gives each warp
// a line; a chunk inside one long line spreads the whole block over it. Lines move as 16-byte vectors
// wherever src and dst share their misalignment, with a scalar head and tail.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/api.cuh"
#include "segment_index.h"

namespace hpcomm {
namespace kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kBlocksPerSm = 8;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("hpcomm CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

// Plain copy: any byte pattern, so the scalar path picks the widest unit all three of src, dst and
// length allow.
struct CopyOp {
  __device__ static void vector(const uint4* s, uint4* d) { *d = *s; }

  __device__ static void scalar(const uint8_t* s, uint8_t* d, int64_t bytes, int tid, int num_threads) {
    const uint64_t bits = reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d) |
                          static_cast<uint64_t>(bytes);
    if (bits % 8 == 0) {
      copy_units<uint64_t>(s, d, bytes, tid, num_threads);
    } else if (bits % 4 == 0) {
      copy_units<uint32_t>(s, d, bytes, tid, num_threads);
    } else if (bits % 2 == 0) {
      copy_units<uint16_t>(s, d, bytes, tid, num_threads);
    } else {
      copy_units<uint8_t>(s, d, bytes, tid, num_threads);
    }
  }

  template <typename U>
  __device__ static void copy_units(const uint8_t* s, uint8_t* d, int64_t bytes, int tid, int num_threads) {
    const U* su = reinterpret_cast<const U*>(s);
    U* du = reinterpret_cast<U*>(d);
    for (int64_t i = tid; i < bytes / static_cast<int64_t>(sizeof(U)); i += num_threads) du[i] = su[i];
  }
};

// dst += src elementwise on the storage type S; Add defines the arithmetic.
template <typename S, typename Add>
struct AccumulateOp {
  static constexpr int64_t kPerVector = 16 / sizeof(S);

  __device__ static void vector(const uint4* s, uint4* d) {
    uint4 a = *s;
    uint4 b = *d;
    const S* as = reinterpret_cast<const S*>(&a);
    S* bs = reinterpret_cast<S*>(&b);
#pragma unroll
    for (int64_t i = 0; i < kPerVector; ++i) bs[i] = Add::add(bs[i], as[i]);
    *d = b;
  }

  __device__ static void scalar(const uint8_t* s, uint8_t* d, int64_t bytes, int tid, int num_threads) {
    const S* ss = reinterpret_cast<const S*>(s);
    S* ds = reinterpret_cast<S*>(d);
    for (int64_t i = tid; i < bytes / static_cast<int64_t>(sizeof(S)); i += num_threads) {
      ds[i] = Add::add(ds[i], ss[i]);
    }
  }
};

template <typename T>
struct AddNative {
  __device__ static T add(T a, T b) { return a + b; }
};

// Integer adds wrap like torch's; computing in the unsigned type keeps the overflow defined.
template <typename T, typename U>
struct AddWrapping {
  __device__ static T add(T a, T b) { return static_cast<T>(static_cast<U>(a) + static_cast<U>(b)); }
};

struct AddBool {
  __device__ static uint8_t add(uint8_t a, uint8_t b) { return a | b; }
};

// Like torch's CPU add_ for half and bfloat16: add in float, round to nearest even once.
struct AddHalf {
  __device__ static uint16_t add(uint16_t a, uint16_t b) {
    return __half_as_ushort(__float2half_rn(__half2float(__ushort_as_half(a)) + __half2float(__ushort_as_half(b))));
  }
};

struct AddBFloat16 {
  __device__ static uint16_t add(uint16_t a, uint16_t b) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(__bfloat162float(__ushort_as_bfloat16(a)) +
                                                    __bfloat162float(__ushort_as_bfloat16(b))));
  }
};

template <typename Op>
__device__ void apply_line(const uint8_t* s, uint8_t* d, int64_t bytes, int tid, int num_threads) {
  const LineSplit split = split_line_16(reinterpret_cast<uintptr_t>(s), reinterpret_cast<uintptr_t>(d), bytes);
  Op::scalar(s, d, split.head, tid, num_threads);
  const uint4* sv = reinterpret_cast<const uint4*>(s + split.head);
  uint4* dv = reinterpret_cast<uint4*>(d + split.head);
  for (int64_t i = tid; i < split.body / kVectorBytes; i += num_threads) Op::vector(sv + i, dv + i);
  const int64_t tail_at = split.head + split.body;
  Op::scalar(s + tail_at, d + tail_at, split.tail, tid, num_threads);
}

template <typename Op>
__global__ void __launch_bounds__(kThreads)
segment_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, const int64_t* __restrict__ table,
               const int64_t* __restrict__ chunk_ends, int64_t num_segments, int64_t elem_size) {
  const int64_t total = chunk_ends[num_segments - 1];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t item = blockIdx.x; item < total; item += gridDim.x) {
    const WorkItem w = work_item(table, chunk_ends, num_segments, elem_size, item);
    const Segment& seg = w.seg;
    const Chunk& c = w.chunk;
    const int64_t col_bytes = c.col_end - c.col_begin;
    if (c.line_end - c.line_begin == 1) {
      apply_line<Op>(src + src_line_offset(seg, c.line_begin) + c.col_begin,
                     dst + dst_line_offset(seg, c.line_begin) + c.col_begin, col_bytes, threadIdx.x, kThreads);
    } else {
      for (int64_t line = c.line_begin + warp; line < c.line_end; line += kWarps) {
        apply_line<Op>(src + src_line_offset(seg, line) + c.col_begin, dst + dst_line_offset(seg, line) + c.col_begin,
                       col_bytes, lane, kWarpSize);
      }
    }
  }
}

// Enough resident blocks to fill every SM, and no more blocks than work items. Host-side attribute
// queries only: nothing here waits for the device.
unsigned grid_blocks(int64_t total_items) {
  int device = 0;
  int num_sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return static_cast<unsigned>(min_i64(total_items, static_cast<int64_t>(num_sms) * kBlocksPerSm));
}

template <typename Op>
void launch(const void* src, void* dst, const int64_t* table, const int64_t* chunk_ends, int64_t num_segments,
            int64_t total_items, int64_t elem_size, cudaStream_t stream) {
  segment_kernel<Op><<<grid_blocks(total_items), kThreads, 0, stream>>>(static_cast<const uint8_t*>(src),
                                                              static_cast<uint8_t*>(dst), table, chunk_ends,
                                                              num_segments, elem_size);
  check_cuda(cudaGetLastError(), "segment_kernel launch");
}

template <typename S, typename Add>
void launch_accumulate(const void* src, void* dst, const int64_t* table, const int64_t* chunk_ends,
                       int64_t num_segments, int64_t total_items, cudaStream_t stream) {
  launch<AccumulateOp<S, Add>>(src, dst, table, chunk_ends, num_segments, total_items, sizeof(S), stream);
}

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
    case DType::kFloat32:
    case DType::kInt32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kInt16:
      return 2;
    default:
      return 1;
  }
}

}  // namespace

void copy_segments(const void* src, void* dst, const int64_t* table, const int64_t* chunk_ends, int64_t num_segments,
                   int64_t total_items, DType dtype, bool accumulate, cudaStream_t stream) {
  if (total_items == 0) return;
  if (!accumulate) {
    launch<CopyOp>(src, dst, table, chunk_ends, num_segments, total_items, dtype_size(dtype), stream);
    return;
  }
  const auto* t = table;
  const auto* e = chunk_ends;
  const int64_t n = num_segments;
  const int64_t items = total_items;
  switch (dtype) {
    case DType::kFloat32:
      return launch_accumulate<float, AddNative<float>>(src, dst, t, e, n, items, stream);
    case DType::kFloat64:
      return launch_accumulate<double, AddNative<double>>(src, dst, t, e, n, items, stream);
    case DType::kFloat16:
      return launch_accumulate<uint16_t, AddHalf>(src, dst, t, e, n, items, stream);
    case DType::kBFloat16:
      return launch_accumulate<uint16_t, AddBFloat16>(src, dst, t, e, n, items, stream);
    case DType::kInt8:
      return launch_accumulate<int8_t, AddWrapping<int8_t, uint8_t>>(src, dst, t, e, n, items, stream);
    case DType::kUInt8:
      return launch_accumulate<uint8_t, AddWrapping<uint8_t, uint8_t>>(src, dst, t, e, n, items, stream);
    case DType::kInt16:
      return launch_accumulate<int16_t, AddWrapping<int16_t, uint16_t>>(src, dst, t, e, n, items, stream);
    case DType::kInt32:
      return launch_accumulate<int32_t, AddWrapping<int32_t, uint32_t>>(src, dst, t, e, n, items, stream);
    case DType::kInt64:
      return launch_accumulate<int64_t, AddWrapping<int64_t, uint64_t>>(src, dst, t, e, n, items, stream);
    case DType::kBool:
      return launch_accumulate<uint8_t, AddBool>(src, dst, t, e, n, items, stream);
    default:
      throw std::invalid_argument("hpcomm: accumulate is not defined for float8 segment copies");
  }
}

}  // namespace kernels
}  // namespace hpcomm
