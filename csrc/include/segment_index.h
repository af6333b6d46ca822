// Index arithmetic of the segment-table contract (hpcomm/segments.py), shared by the CPU kernel
// (csrc/segment_copy.cpp) and the CUDA kernels (csrc/kernels/segment_copy.cu), so that the CPU build
// and its tests exercise exactly the arithmetic the GPU runs. Everything is in int64: offsets of
// 2^31 elements and more are ordinary for 256 MiB+ buffers of 1-byte dtypes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HPCOMM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HPCOMM_HOST_DEVICE inline
#endif

namespace hpcomm {

constexpr int kTableColumns = 6;
constexpr int64_t kVectorBytes = 16;

// One row of the table, converted to bytes so that copies are dtype-agnostic.
struct Segment {
  int64_t src_offset;  // bytes
  int64_t dst_offset;  // bytes
  int64_t num_lines;
  int64_t line_bytes;
  int64_t src_stride;  // bytes
  int64_t dst_stride;  // bytes
};

// A work item: lines [line_begin, line_end) x bytes [col_begin, col_end) of one segment.
struct Chunk {
  int64_t line_begin;
  int64_t line_end;
  int64_t col_begin;
  int64_t col_end;
};

// How a segment is cut into chunks: whole lines grouped, or one line split into column pieces.
// Columns are in the segment's units (bytes for the CPU kernel, elements for the CUDA item numbering).
struct ChunkShape {
  int64_t lines_per_chunk;
  int64_t cols_per_chunk_line;
  int64_t line_chunks;
  int64_t col_chunks;
};

// Bytes of one line: a scalar head up to the first 16-byte boundary, a 16-byte-vector body, a tail.
struct LineSplit {
  int64_t head;
  int64_t body;
  int64_t tail;
};

HPCOMM_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

HPCOMM_HOST_DEVICE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

HPCOMM_HOST_DEVICE int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

// Reads row i of a [n, 6] element table and converts it to bytes. A segment whose lines abut in
// both src and dst (line_len == src_stride == dst_stride, or a single line) is one contiguous block,
// so it becomes a single line: that is what lets it be split evenly and moved as one memcpy.
HPCOMM_HOST_DEVICE Segment load_segment(const int64_t* table, int64_t i, int64_t elem_size) {
  const int64_t* row = table + i * kTableColumns;
  Segment s;
  s.src_offset = row[0] * elem_size;
  s.dst_offset = row[1] * elem_size;
  s.num_lines = row[2];
  s.line_bytes = row[3] * elem_size;
  s.src_stride = row[4] * elem_size;
  s.dst_stride = row[5] * elem_size;
  if (s.num_lines <= 0 || s.line_bytes <= 0) {
    s.num_lines = 0;
    s.line_bytes = 0;
  } else if (s.num_lines == 1 || (s.src_stride == s.line_bytes && s.dst_stride == s.line_bytes)) {
    s.line_bytes *= s.num_lines;
    s.num_lines = 1;
    s.src_stride = s.line_bytes;
    s.dst_stride = s.line_bytes;
  }
  return s;
}

HPCOMM_HOST_DEVICE int64_t segment_bytes(const Segment& s) { return s.num_lines * s.line_bytes; }

HPCOMM_HOST_DEVICE int64_t src_line_offset(const Segment& s, int64_t line) {
  return s.src_offset + line * s.src_stride;
}

HPCOMM_HOST_DEVICE int64_t dst_line_offset(const Segment& s, int64_t line) {
  return s.dst_offset + line * s.dst_stride;
}

// Chunks of about `target` units: short lines are grouped, long lines are split at multiples of 16
// units. In bytes, 16 is the vector width (and elem_size divides it); in elements, 16 elements are a
// multiple of 16 bytes. Either way a column cut never splits an element or a vector of an aligned line.
HPCOMM_HOST_DEVICE ChunkShape chunk_shape(const Segment& s, int64_t target) {
  ChunkShape c;
  if (s.num_lines == 0) {
    c.lines_per_chunk = 1;
    c.cols_per_chunk_line = 0;
    c.line_chunks = 0;
    c.col_chunks = 0;
  } else if (s.line_bytes >= target) {
    c.lines_per_chunk = 1;
    c.cols_per_chunk_line = max_i64(kVectorBytes, target / kVectorBytes * kVectorBytes);
    c.line_chunks = s.num_lines;
    c.col_chunks = ceil_div(s.line_bytes, c.cols_per_chunk_line);
  } else {
    c.lines_per_chunk = max_i64(1, target / s.line_bytes);
    c.cols_per_chunk_line = s.line_bytes;
    c.line_chunks = ceil_div(s.num_lines, c.lines_per_chunk);
    c.col_chunks = 1;
  }
  return c;
}

HPCOMM_HOST_DEVICE int64_t num_chunks(const ChunkShape& c) { return c.line_chunks * c.col_chunks; }

HPCOMM_HOST_DEVICE Chunk chunk_bounds(const Segment& s, const ChunkShape& c, int64_t k) {
  const int64_t line_chunk = k / c.col_chunks;
  const int64_t col_chunk = k - line_chunk * c.col_chunks;
  Chunk ch;
  ch.line_begin = line_chunk * c.lines_per_chunk;
  ch.line_end = min_i64(s.num_lines, ch.line_begin + c.lines_per_chunk);
  ch.col_begin = col_chunk * c.cols_per_chunk_line;
  ch.col_end = min_i64(s.line_bytes, ch.col_begin + c.cols_per_chunk_line);
  return ch;
}

// Work items are numbered across a table: segment i owns items [chunk_ends[i - 1], chunk_ends[i]),
// where chunk_ends holds the inclusive prefix sums of the segments' num_chunks. Returns the i that
// owns `item` (binary search, so any thread can start anywhere).
HPCOMM_HOST_DEVICE int64_t find_segment(const int64_t* chunk_ends, int64_t num_segments, int64_t item) {
  int64_t lo = 0;
  int64_t hi = num_segments;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (chunk_ends[mid] > item) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

HPCOMM_HOST_DEVICE int64_t first_item(const int64_t* chunk_ends, int64_t segment) {
  return segment == 0 ? 0 : chunk_ends[segment - 1];
}

// The table-wide item numbering of the CUDA kernels. It counts in elements, not bytes, so that it
// depends on the table alone: the host computes it once per table (prepare), before any dtype is
// known, and the kernels read it for every dtype. kItemElems is 32 KiB of 2-byte elements.
constexpr int64_t kItemElems = 16 * 1024;

// Work items of segment i of an element table.
HPCOMM_HOST_DEVICE int64_t segment_items(const int64_t* table, int64_t i) {
  return num_chunks(chunk_shape(load_segment(table, i, 1), kItemElems));
}

// chunk_ends[i] = items of segments 0..i (inclusive prefix sums); returns the total.
inline int64_t fill_chunk_ends(const int64_t* table, int64_t num_segments, int64_t* chunk_ends) {
  int64_t total = 0;
  for (int64_t i = 0; i < num_segments; ++i) {
    total += segment_items(table, i);
    chunk_ends[i] = total;
  }
  return total;
}

// What work item `item` moves, in bytes: its segment and the chunk of it.
struct WorkItem {
  Segment seg;
  Chunk chunk;
};

HPCOMM_HOST_DEVICE WorkItem work_item(const int64_t* table, const int64_t* chunk_ends, int64_t num_segments,
                                      int64_t elem_size, int64_t item) {
  const int64_t i = find_segment(chunk_ends, num_segments, item);
  const Segment elems = load_segment(table, i, 1);
  WorkItem w;
  w.chunk = chunk_bounds(elems, chunk_shape(elems, kItemElems), item - first_item(chunk_ends, i));
  w.chunk.col_begin *= elem_size;
  w.chunk.col_end *= elem_size;
  w.seg = load_segment(table, i, elem_size);
  return w;
}

// 16-byte vectors are usable on the part of a line where src and dst reach a 16-byte boundary
// together; that needs the same misalignment on both sides. Otherwise the whole line is a tail.
HPCOMM_HOST_DEVICE LineSplit split_line_16(uint64_t src_addr, uint64_t dst_addr, int64_t bytes) {
  LineSplit l;
  const int64_t src_mis = static_cast<int64_t>(src_addr % kVectorBytes);
  const int64_t dst_mis = static_cast<int64_t>(dst_addr % kVectorBytes);
  if (src_mis != dst_mis) {
    l.head = 0;
    l.body = 0;
    l.tail = bytes;
    return l;
  }
  l.head = min_i64(bytes, (kVectorBytes - src_mis) % kVectorBytes);
  l.body = (bytes - l.head) / kVectorBytes * kVectorBytes;
  l.tail = bytes - l.head - l.body;
  return l;
}

// Bytes before dst_addr reaches a 16-byte boundary (at most `bytes`): the head a streaming store
// path must write normally, since non-temporal stores need aligned destinations.
HPCOMM_HOST_DEVICE int64_t bytes_to_align_16(uint64_t addr, int64_t bytes) {
  return min_i64(bytes, static_cast<int64_t>((kVectorBytes - addr % kVectorBytes) % kVectorBytes));
}

}  // namespace hpcomm
