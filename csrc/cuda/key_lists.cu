#include "cuda/key_lists.h"

#include <cstdint>

#include "cuda/cta_scan.cuh"

namespace dmattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kWordKeys = 16;  // keys of one 16-byte mask word
// Units of at most this many rows (a decoding step's packed heads) read 4 words of each row per thread and pass, so
// that a long row takes a quarter of the passes (each a load latency and a CTA scan); more rows keep one word, which
// already gives each thread a word per row in flight.
constexpr int kFewRows = 8;

// Phase 1 (below) over [key_begin, key_end): the unit's live keys in order into keys[1..], up to the capacity;
// returns their count (past the capacity: some count above it). Each pass examines kThreads * kWords words' keys.
template <int kWords>
__device__ __forceinline__ int list_live_keys(const KeyListArgs& a, const uint8_t* base, int rows, int64_t key_begin,
                                              int64_t key_end, int32_t* keys, int64_t capacity, bool vec,
                                              int* scratch) {
  constexpr int kKeysPerThread = kWordKeys * kWords;
  constexpr int kSegment = kThreads * kKeysPerThread;
  static_assert(kKeysPerThread <= 64, "a thread's keys are one 64-bit word");
  int count = 0;
  for (int64_t s0 = key_begin; s0 < key_end; s0 += kSegment) {
    const int64_t k0 = s0 + int64_t(threadIdx.x) * kKeysPerThread;
    uint64_t live = 0;  // bit i: key k0 + i is kept by some row
    if (k0 < key_end) {
      if (vec && k0 + kKeysPerThread <= key_end) {
        uint4 acc[kWords];
#pragma unroll
        for (int w = 0; w < kWords; ++w) acc[w] = make_uint4(0, 0, 0, 0);
#pragma unroll 8
        for (int r = 0; r < rows; ++r) {
#pragma unroll
          for (int w = 0; w < kWords; ++w) {
            const uint4 x = __ldg(reinterpret_cast<const uint4*>(base + int64_t(r) * a.cols + k0) + w);
            acc[w].x |= x.x, acc[w].y |= x.y, acc[w].z |= x.z, acc[w].w |= x.w;
          }
        }
#pragma unroll
        for (int w = 0; w < kWords; ++w) {
          const uint32_t words[4] = {acc[w].x, acc[w].y, acc[w].z, acc[w].w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              live |= ((words[i] >> (8 * j)) & 0xffu) ? (uint64_t{1} << (kWordKeys * w + 4 * i + j)) : 0u;
            }
          }
        }
      } else {
        for (int r = 0; r < rows; ++r) {
          const uint8_t* src = base + int64_t(r) * a.cols;
          for (int i = 0; i < kKeysPerThread; ++i) {
            if (k0 + i < key_end && src[k0 + i]) live |= uint64_t{1} << i;
          }
        }
      }
    }
    int total = 0;
    const int offset = cta_exclusive_scan<kWarps>(__popcll(live), scratch, total);
    int pos = count + offset;
    while (live && pos < capacity) {
      const int i = __ffsll(live) - 1;
      live &= live - 1;
      keys[1 + pos++] = static_cast<int32_t>(k0 + i);
    }
    count += total;
    if (count > capacity) break;  // uniform: every thread has the same total
  }
  return count;
}

// One CTA per unit (mask batch, mask head, key part, 128-row query tile).
// Phase 1: OR the unit's rows over each 16-key word, then list the live keys in order (CTA prefix sums). A unit
//          whose live keys outgrow the capacity stops reading the mask and is marked dense (list_live_keys).
// Phase 2: for each 64-key chunk of the list and each row, a warp gathers the row's bytes at the listed keys and
//          packs them with a ballot: the mask over the live keys, one uint64 per (chunk, row). A one-row mask keeps
//          each live key in its row, so its words are set from the count alone.
__global__ void __launch_bounds__(kThreads) build_key_lists_kernel(KeyListArgs a) {
  __shared__ int scratch[kWarps + 1];
  const int64_t m_tiles = a.m_tiles();
  const int64_t unit = blockIdx.x;
  const int64_t t = unit % m_tiles;
  const int64_t bhp = unit / m_tiles;  // (bm * heads + hm) * parts + part
  const int64_t bh = bhp / a.parts, part = bhp % a.parts;
  const int64_t row0 = t * kKeyListBlockM;
  const int rows = static_cast<int>(a.rows - row0 < kKeyListBlockM ? a.rows - row0 : kKeyListBlockM);
  const int rows_per_unit = static_cast<int>(a.rows_per_unit());
  const uint8_t* base = a.mask + (bh * a.rows + row0) * a.cols;

  // The part's keys; those past the causal bound of the unit's last row are invisible to every row of the unit.
  const int64_t key_begin = part * a.part_cols();
  int64_t key_end = key_begin + a.part_cols();
  if (a.is_causal && a.rows == a.q_len) {
    const int64_t last = row0 + rows - 1 + a.causal_offset;
    key_end = last < key_begin ? key_begin : (last + 1 < key_end ? last + 1 : key_end);
  }

  int32_t* keys = a.keys + unit * a.keys_stride();
  const int64_t capacity = a.capacity;
  const bool vec =
      (a.cols % 16 == 0) && (a.part_cols() % 16 == 0) && (reinterpret_cast<uintptr_t>(a.mask) % 16 == 0);
  const int count = rows <= kFewRows
                        ? list_live_keys<4>(a, base, rows, key_begin, key_end, keys, capacity, vec, scratch)
                        : list_live_keys<1>(a, base, rows, key_begin, key_end, keys, capacity, vec, scratch);
  if (count > capacity) {
    if (threadIdx.x == 0) keys[0] = kKeyListDense;  // the kernels walk all keys and read the mask themselves
    return;
  }
  if (threadIdx.x == 0) keys[0] = count;
  const int chunks = (count + kKeyListChunk - 1) / kKeyListChunk;
  uint64_t* bits = a.bits + unit * a.chunks() * rows_per_unit;
  if (a.rows == 1) {  // the one row keeps every live key: its words are the first `count` bits, no mask read
    for (int c = threadIdx.x; c < chunks; c += kThreads) {
      const int n = count - c * kKeyListChunk;
      bits[c] = n >= kKeyListChunk ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
    }
    return;
  }
  __syncthreads();  // the list (global, written by this CTA) is visible to the whole CTA

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // Work items of (chunk, block of kRowsPerItem rows), spread over the warps: a unit of a tile's 128 rows gives each
  // warp its block of rows in every chunk, a unit of a few rows (a decoding step's packed heads) its share of the
  // chunks, so that its chunks' two dependent reads (list entries, then the mask bytes) overlap across warps.
  constexpr int kRowsPerItem = kKeyListBlockM / kWarps;
  const int row_blocks = (rows_per_unit + kRowsPerItem - 1) / kRowsPerItem;
  for (int item = warp; item < chunks * row_blocks; item += kWarps) {
    const int c = item / row_blocks, r0 = (item % row_blocks) * kRowsPerItem;
    const int j0 = c * kKeyListChunk + lane, j1 = j0 + 32;
    const int64_t key0 = j0 < count ? keys[1 + j0] : -1;
    const int64_t key1 = j1 < count ? keys[1 + j1] : -1;
    // All of the item's row loads are issued before the first ballot: the gathers are latency-bound.
    bool b0[kRowsPerItem], b1[kRowsPerItem];
#pragma unroll
    for (int i = 0; i < kRowsPerItem; ++i) {
      const int r = r0 + i;
      const uint8_t* src = base + int64_t(r) * a.cols;
      b0[i] = r < rows && key0 >= 0 && src[key0];
      b1[i] = r < rows && key1 >= 0 && src[key1];
    }
#pragma unroll
    for (int i = 0; i < kRowsPerItem; ++i) {
      const int r = r0 + i;
      const uint32_t lo = __ballot_sync(0xffffffffu, b0[i]), hi = __ballot_sync(0xffffffffu, b1[i]);
      if (lane == 0 && r < rows_per_unit) bits[int64_t(c) * rows_per_unit + r] = (uint64_t(hi) << 32) | lo;
    }
  }
}

}  // namespace

cudaError_t launch_build_key_lists(const KeyListArgs& args, cudaStream_t stream) {
  if (!args.capacity_ok()) return cudaErrorInvalidValue;
  const int64_t units = args.units();
  if (units == 0) return cudaSuccess;
  build_key_lists_kernel<<<static_cast<unsigned>(units), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace dmattn
