// CPU kernel of the segment-table contract (hpcomm/segments.py).
//
// Work splitting: tables of many segments are cut by segment index across threads, and the few
// segments bigger than kChunkBytes are set aside and then cut into (segment, line chunk) work items
// (csrc/include/segment_index.h) shared by all threads; small tables go straight to work items. Lines
// move with memcpy (a contiguous segment is a single line, so a single memcpy); large destinations
// get non-temporal stores, which skip the read-for-ownership of every destination cache line.
#include "segment_copy.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "segment_index.h"

namespace hpcomm {
namespace {

// Work-item size: big enough to amortise the lookup, small enough to balance two to a few dozen cores.
constexpr int64_t kChunkBytes = 256 * 1024;
// Below this many segments a table is split into work items directly (balanced by bytes).
constexpr int64_t kSegmentGrain = 256;
// Streaming stores skip the read-for-ownership of each destination line: measured 2.5x on a scatter
// of 1 KiB rows into 128 MiB, 1.3x on 64 KiB rows (bench/bench_kernels.py). Below about half the
// 32 MiB L3 the destination may still be in cache when it is read next, so plain stores keep it there.
constexpr int64_t kStreamingMinDstBytes = 16 * 1024 * 1024;
// Pieces shorter than this are not worth the streaming loop's setup.
constexpr int64_t kStreamingMinPieceBytes = 256;
// Lines (or segments) ahead whose source is prefetched, and how much of each: rows in random order
// defeat the hardware prefetcher at every row start. Non-temporal hint, as each byte is read once.
// Measured within noise (+-5%) on the shared 2-core VM this was tuned on (bench/bench_kernels.py).
constexpr int64_t kPrefetchAhead = 8;
constexpr int64_t kPrefetchBytes = 1024;
constexpr int64_t kCacheLine = 64;

inline void prefetch_source(const uint8_t* p, int64_t bytes) {
  const int64_t n = std::min(bytes, kPrefetchBytes);
  for (int64_t i = 0; i < n; i += kCacheLine) __builtin_prefetch(p + i, 0, 0);
}

struct CopyLine {
  void operator()(const uint8_t* s, uint8_t* d, int64_t bytes) const { std::memcpy(d, s, static_cast<size_t>(bytes)); }
  void finish() const {}
};

#if defined(__SSE2__)
struct StreamLine {
  void operator()(const uint8_t* s, uint8_t* d, int64_t bytes) const {
    if (bytes < kStreamingMinPieceBytes) {
      std::memcpy(d, s, static_cast<size_t>(bytes));
      return;
    }
    const int64_t head = bytes_to_align_16(reinterpret_cast<uintptr_t>(d), bytes);
    std::memcpy(d, s, static_cast<size_t>(head));
    int64_t i = head;
    for (; i + 64 <= bytes; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    }
    for (; i + 16 <= bytes; i += 16) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    }
    std::memcpy(d + i, s + i, static_cast<size_t>(bytes - i));
  }
  // Streaming stores are weakly ordered: fence before the thread reports its part done.
  void finish() const { _mm_sfence(); }
};
#else
using StreamLine = CopyLine;
#endif

// dst += src elementwise in T; Add gives the arithmetic.
template <typename T, typename Add>
struct AccumulateLine {
  void operator()(const uint8_t* s, uint8_t* d, int64_t bytes) const {
    const T* st = reinterpret_cast<const T*>(s);
    T* dt = reinterpret_cast<T*>(d);
    const int64_t n = bytes / static_cast<int64_t>(sizeof(T));
    for (int64_t i = 0; i < n; ++i) dt[i] = Add::add(dt[i], st[i]);
  }
  void finish() const {}
};

template <typename T>
struct AddNative {
  static T add(T a, T b) { return a + b; }
};

// Integer adds wrap like torch's; computing in the unsigned type keeps the overflow defined.
template <typename T>
struct AddWrapping {
  using U = std::make_unsigned_t<T>;
  static T add(T a, T b) { return static_cast<T>(static_cast<U>(a) + static_cast<U>(b)); }
};

// torch's bool add is a logical or; bytes keep it clear of bool's trap representations.
struct AddBool {
  static uint8_t add(uint8_t a, uint8_t b) { return a | b; }
};

// Like torch's add_ for half and bfloat16: add in float, round to nearest even once.
template <typename T>
struct AddViaFloat {
  static T add(T a, T b) { return static_cast<T>(static_cast<float>(a) + static_cast<float>(b)); }
};

template <typename Line>
void apply_chunk(const uint8_t* src, uint8_t* dst, const Segment& seg, const Chunk& c, const Line& line) {
  const int64_t bytes = c.col_end - c.col_begin;
  for (int64_t j = c.line_begin; j < c.line_end; ++j) {
    if (j + kPrefetchAhead < c.line_end) {
      prefetch_source(src + src_line_offset(seg, j + kPrefetchAhead) + c.col_begin, bytes);
    }
    line(src + src_line_offset(seg, j) + c.col_begin, dst + dst_line_offset(seg, j) + c.col_begin, bytes);
  }
}

template <typename Line>
void apply_segment(const uint8_t* src, uint8_t* dst, const Segment& seg, const Line& line) {
  const Chunk whole{0, seg.num_lines, 0, seg.line_bytes};
  apply_chunk(src, dst, seg, whole, line);
}

struct Table {
  const int64_t* rows;
  int64_t num_segments;
  int64_t elem_size;

  Segment segment(int64_t i) const { return load_segment(rows, i, elem_size); }
};

// Cuts the given segments into work items of about kChunkBytes and spreads those over the threads.
template <typename Line>
void apply_in_chunks(const uint8_t* src, uint8_t* dst, const Table& table, const std::vector<int64_t>& segments,
                     const Line& line) {
  const int64_t n = static_cast<int64_t>(segments.size());
  std::vector<int64_t> chunk_ends(segments.size());
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) {
    total += num_chunks(chunk_shape(table.segment(segments[k]), kChunkBytes));
    chunk_ends[k] = total;
  }
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = find_segment(chunk_ends.data(), n, begin), item = begin; item < end; ++k) {
      const Segment seg = table.segment(segments[k]);
      const ChunkShape shape = chunk_shape(seg, kChunkBytes);
      for (; item < std::min(end, chunk_ends[k]); ++item) {
        apply_chunk(src, dst, seg, chunk_bounds(seg, shape, item - first_item(chunk_ends.data(), k)), line);
      }
    }
    line.finish();
  });
}

template <typename Line>
void apply_table(const uint8_t* src, uint8_t* dst, const Table& table, const Line& line) {
  std::vector<int64_t> big;
  if (table.num_segments < kSegmentGrain) {
    big.resize(static_cast<size_t>(table.num_segments));
    for (int64_t i = 0; i < table.num_segments; ++i) big[static_cast<size_t>(i)] = i;
    apply_in_chunks(src, dst, table, big, line);
    return;
  }
  std::vector<std::vector<int64_t>> big_per_thread(static_cast<size_t>(at::get_num_threads()));
  at::parallel_for(0, table.num_segments, kSegmentGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t>& deferred = big_per_thread[static_cast<size_t>(at::get_thread_num())];
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchAhead < end) {
        const Segment next = table.segment(i + kPrefetchAhead);
        if (next.num_lines > 0) prefetch_source(src + next.src_offset, next.line_bytes);
      }
      const Segment seg = table.segment(i);
      if (segment_bytes(seg) > kChunkBytes) {
        deferred.push_back(i);
      } else {
        apply_segment(src, dst, seg, line);
      }
    }
    line.finish();
  });
  for (const auto& part : big_per_thread) big.insert(big.end(), part.begin(), part.end());
  if (!big.empty()) apply_in_chunks(src, dst, table, big, line);
}

template <typename T, typename Add>
void accumulate_table(const uint8_t* src, uint8_t* dst, const Table& table) {
  apply_table(src, dst, table, AccumulateLine<T, Add>{});
}

bool accumulate_defined(at::ScalarType dtype) {
  switch (dtype) {
    case at::ScalarType::Float:
    case at::ScalarType::Double:
    case at::ScalarType::Half:
    case at::ScalarType::BFloat16:
    case at::ScalarType::Char:
    case at::ScalarType::Byte:
    case at::ScalarType::Short:
    case at::ScalarType::Int:
    case at::ScalarType::Long:
    case at::ScalarType::Bool:
      return true;
    default:
      return false;
  }
}

}  // namespace

void check_segment_args(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& table,
                        bool accumulate) {
  CHECK_CONTIGUOUS_1D(src);
  CHECK_CONTIGUOUS_1D(dst);
  CHECK_SAME_DTYPE(src, dst);
  TORCH_CHECK(src.device() == dst.device(), "src and dst must be on one device, got ", src.device(), " and ",
              dst.device());
  CHECK_TABLE(table);
  TORCH_CHECK_TYPE(!accumulate || accumulate_defined(src.scalar_type()), "accumulate is not defined for ",
                   src.scalar_type(), " (torch has no add for it); copy is");
}

void apply_segments_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table, bool accumulate) {
  check_segment_args(src, dst, table, accumulate);
  CHECK_DEVICE(src, at::kCPU);
  CHECK_DEVICE(table, at::kCPU);
  CHECK_CONTIGUOUS(table);
  const Table t{table.data_ptr<int64_t>(), table.size(0), static_cast<int64_t>(src.element_size())};
  const auto* s = static_cast<const uint8_t*>(src.data_ptr());
  auto* d = static_cast<uint8_t*>(dst.data_ptr());
  if (!accumulate) {
    if (dst.nbytes() >= static_cast<size_t>(kStreamingMinDstBytes)) {
      apply_table(s, d, t, StreamLine{});
    } else {
      apply_table(s, d, t, CopyLine{});
    }
    return;
  }
  switch (src.scalar_type()) {
    case at::ScalarType::Float:
      return accumulate_table<float, AddNative<float>>(s, d, t);
    case at::ScalarType::Double:
      return accumulate_table<double, AddNative<double>>(s, d, t);
    case at::ScalarType::Half:
      return accumulate_table<c10::Half, AddViaFloat<c10::Half>>(s, d, t);
    case at::ScalarType::BFloat16:
      return accumulate_table<c10::BFloat16, AddViaFloat<c10::BFloat16>>(s, d, t);
    case at::ScalarType::Char:
      return accumulate_table<int8_t, AddWrapping<int8_t>>(s, d, t);
    case at::ScalarType::Byte:
      return accumulate_table<uint8_t, AddWrapping<uint8_t>>(s, d, t);
    case at::ScalarType::Short:
      return accumulate_table<int16_t, AddWrapping<int16_t>>(s, d, t);
    case at::ScalarType::Int:
      return accumulate_table<int32_t, AddWrapping<int32_t>>(s, d, t);
    case at::ScalarType::Long:
      return accumulate_table<int64_t, AddWrapping<int64_t>>(s, d, t);
    case at::ScalarType::Bool:
      return accumulate_table<uint8_t, AddBool>(s, d, t);
    default:
      TORCH_CHECK_TYPE(false, "accumulate is not defined for ", src.scalar_type());
  }
}

at::Tensor chunk_ends(const at::Tensor& table) {
  CHECK_TABLE(table);
  CHECK_DEVICE(table, at::kCPU);
  CHECK_CONTIGUOUS(table);
  at::Tensor ends = at::empty({table.size(0)}, table.options());
  fill_chunk_ends(table.data_ptr<int64_t>(), table.size(0), ends.data_ptr<int64_t>());
  return ends;
}

void copy_segments_by_items(const at::Tensor& src, at::Tensor& dst, const at::Tensor& table,
                            const at::Tensor& chunk_ends) {
  check_segment_args(src, dst, table, false);
  CHECK_DEVICE(src, at::kCPU);
  CHECK_DEVICE(table, at::kCPU);
  CHECK_CONTIGUOUS(table);
  TORCH_CHECK(chunk_ends.is_cpu() && chunk_ends.is_contiguous() && chunk_ends.scalar_type() == at::kLong &&
                  chunk_ends.dim() == 1 && chunk_ends.size(0) == table.size(0),
              "chunk_ends must be a contiguous CPU int64 [num_segments] tensor");
  const int64_t n = table.size(0);
  if (n == 0) return;
  const int64_t* rows = table.data_ptr<int64_t>();
  const int64_t* ends = chunk_ends.data_ptr<int64_t>();
  const auto* s = static_cast<const uint8_t*>(src.data_ptr());
  auto* d = static_cast<uint8_t*>(dst.data_ptr());
  const int64_t elem_size = static_cast<int64_t>(src.element_size());
  for (int64_t item = 0; item < ends[n - 1]; ++item) {
    const WorkItem w = work_item(rows, ends, n, elem_size, item);
    apply_chunk(s, d, w.seg, w.chunk, CopyLine{});
  }
}

}  // namespace hpcomm
