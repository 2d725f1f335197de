// Per-row key bounds: segment ids, a local window, sequence lengths and (with any of them) causality, as
// O(B * (Lq + Lk)) numbers (jax_dmattn/_bounds.py builds them; docs/sequences.md). Read by the CPU kernels and by
// the CUDA tile kernels, so it compiles for host and device.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DMATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DMATTN_HOST_DEVICE inline
#endif

namespace dmattn {

// rows: int32 [Bb, Lq, 4] = (lo, hi, segment, compare) per query row; key_segments: int32 [Bb, Lk] or null (no
// segment ids). Row i of batch b keeps key j iff lo <= j < hi and, where compare is set, segment ==
// key_segments[j] (compare is clear where [lo, hi) already is the row's segment exactly, i.e. sorted ids; it is
// the same for every row of a batch element). lo and hi are non-decreasing in i, so the keys a query tile may keep
// are [lo(first row), hi(last row)), and the rows that may keep a key tile are found by bisection. Bb is 1
// (strides 0) or B.
// One row's bounds, read once and tested per key (RowBounds::range).
struct RowRange {
  int32_t lo = 0, hi = 0, segment = 0;
  const int32_t* key_segments = nullptr;  // the element's key ids where the row compares them, else null

  DMATTN_HOST_DEVICE bool keeps(int64_t j) const {
    return lo <= j && j < hi && (key_segments == nullptr || key_segments[j] == segment);
  }
};

struct RowBounds {
  const int32_t* rows = nullptr;  // nullptr: no bounds
  const int32_t* key_segments = nullptr;
  static constexpr int kColumns = 4;
  int64_t rows_batch_stride = 0;      // 4 * Lq, or 0 for Bb = 1
  int64_t segments_batch_stride = 0;  // Lk, or 0 for Bb = 1

  DMATTN_HOST_DEVICE bool present() const { return rows != nullptr; }
  DMATTN_HOST_DEVICE const int32_t* row(int64_t b, int64_t i) const {
    return rows + b * rows_batch_stride + kColumns * i;
  }
  DMATTN_HOST_DEVICE int32_t lo(int64_t b, int64_t i) const { return row(b, i)[0]; }
  DMATTN_HOST_DEVICE int32_t hi(int64_t b, int64_t i) const { return row(b, i)[1]; }
  DMATTN_HOST_DEVICE const int32_t* segments(int64_t b) const {
    return key_segments == nullptr ? nullptr : key_segments + b * segments_batch_stride;
  }
  DMATTN_HOST_DEVICE RowRange range(int64_t b, int64_t i) const {
    const int32_t* r = row(b, i);
    return RowRange{r[0], r[1], r[2], key_segments != nullptr && r[3] != 0 ? segments(b) : nullptr};
  }
  // Whether query rows [r0, r1) of batch b keep every key of [n0, n1) (n1 <= Lk): inside every row's range, with no
  // ids to compare. Then a tile needs no per-element test of the bounds.
  DMATTN_HOST_DEVICE bool keeps_all(int64_t b, int64_t r0, int64_t r1, int64_t n0, int64_t n1) const {
    return lo(b, r1 - 1) <= n0 && hi(b, r0) >= n1 && (key_segments == nullptr || row(b, r0)[3] == 0);
  }

  // First row in [r0, r1) whose hi exceeds key n (r1 if none): rows before it keep no key >= n.
  DMATTN_HOST_DEVICE int64_t first_row_above(int64_t b, int64_t n, int64_t r0, int64_t r1) const {
    while (r0 < r1) {
      const int64_t mid = r0 + (r1 - r0) / 2;
      if (hi(b, mid) > n) r1 = mid; else r0 = mid + 1;
    }
    return r0;
  }
  // First row in [r0, r1) whose lo is at least key n (r1 if none): it and later rows keep no key < n.
  DMATTN_HOST_DEVICE int64_t first_row_from(int64_t b, int64_t n, int64_t r0, int64_t r1) const {
    while (r0 < r1) {
      const int64_t mid = r0 + (r1 - r0) / 2;
      if (lo(b, mid) >= n) r1 = mid; else r0 = mid + 1;
    }
    return r0;
  }
};

}  // namespace dmattn
