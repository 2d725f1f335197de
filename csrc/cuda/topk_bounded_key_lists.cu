#include "cuda/topk_bounded_key_lists.h"

#include <atomic>
#include <climits>
#include <cstdint>

#include "cuda/cta_scan.cuh"
#include "cuda/cta_sort.cuh"
#include "cuda/score_order.cuh"
#include "cuda/smem_limit.cuh"

namespace dmattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kKeyListBlockM;
constexpr int kSpread = kTopKBoundedGroupSpread;
static_assert(kRows == 4 * 32 && kWarps == 8, "the bit words: four warps of 32 rows, two chunk parities");

struct StaticSmem {
  int hist[kSelectMaxBins];
  int scratch[kWarps + 1];
  // The unit's rows (an empty row has lo >= hi) and their group (-1: empty).
  int lo[kRows], hi[kRows], segment[kRows];
  bool compares[kRows];
  int group_of[kRows];
  // Per row its threshold, the k-th best (order key, index) it sees: it keeps key j iff it sees j and
  // (key_j, -j) >= (thr_key, -thr_index). Keeps all it sees: (0, INT_MAX); an empty row: (UINT32_MAX, -1).
  uint32_t thr_key[kRows];
  int thr_index[kRows];
  // Per group: its first and last row and the extremes of its rows' lo and hi.
  int g_first[kRows], g_last[kRows], g_lo_min[kRows], g_lo_max[kRows], g_hi_min[kRows], g_hi_max[kRows];
  int groups;
  uint32_t prefix;  // the radix select: the digits chosen so far
  int rem;          // how many of the keys matching `prefix` are still to be taken
  int candidates;   // the current group's candidates
  int listed;       // the unit's union entries (with repeats across groups)
};

// The dynamic part: candidates (uint64 rank keys, sortable: (~order key) << 32 | index, so ascending is score desc
// then index asc) and their kept flags, then the union (int32 keys). Both padded to powers of two for the sort.
__host__ __device__ constexpr int64_t candidate_room(int64_t k) { return pow2_at_least(k + 2 * kSpread); }
__host__ __device__ constexpr int64_t union_room(int64_t capacity) { return pow2_at_least(capacity); }
__host__ __device__ constexpr int64_t dynamic_smem_bytes(int64_t k, int64_t capacity) {
  return candidate_room(k) * int64_t(sizeof(uint64_t) + 1) + union_room(capacity) * int64_t(sizeof(int));
}
static_assert(dynamic_smem_bytes(kTopKBoundedListsMaxK, 2 * kTopKBoundedListsMaxK + 4 * kSpread) +
                      int64_t(sizeof(StaticSmem)) <= 163 * 1024,
              "the largest k fits an A100's shared memory per block");

__device__ __forceinline__ uint64_t rank_key(uint32_t key, int j) {
  return (uint64_t(~key) << 32) | uint32_t(j);
}
__device__ __forceinline__ int rank_index(uint64_t e) { return static_cast<int>(uint32_t(e)); }
__device__ __forceinline__ uint32_t rank_order_key(uint64_t e) { return ~uint32_t(e >> 32); }

// Groups the unit's non-empty rows (thread 0; the header gives the rule).
__device__ void form_groups(StaticSmem& sm, int rows) {
  int g = -1;
  for (int r = 0; r < rows; ++r) {
    const int lo = sm.lo[r], hi = sm.hi[r];
    if (lo >= hi) {
      sm.group_of[r] = -1;
      continue;
    }
    const bool joins = g >= 0 && sm.compares[r] == sm.compares[sm.g_first[g]] &&
                       (!sm.compares[r] || sm.segment[r] == sm.segment[sm.g_first[g]]) &&
                       max(sm.g_lo_max[g], lo) - min(sm.g_lo_min[g], lo) <= kSpread &&
                       max(sm.g_hi_max[g], hi) - min(sm.g_hi_min[g], hi) <= kSpread;
    if (joins) {
      sm.g_lo_min[g] = min(sm.g_lo_min[g], lo), sm.g_lo_max[g] = max(sm.g_lo_max[g], lo);
      sm.g_hi_min[g] = min(sm.g_hi_min[g], hi), sm.g_hi_max[g] = max(sm.g_hi_max[g], hi);
    } else {
      ++g;
      sm.g_first[g] = r;
      sm.g_lo_min[g] = sm.g_lo_max[g] = lo;
      sm.g_hi_min[g] = sm.g_hi_max[g] = hi;
    }
    sm.group_of[r] = g;
    sm.g_last[g] = r;
  }
  sm.groups = g + 1;
}

// The k-th best (order key T, and how many keys equal to T are taken, the lowest indices) of the keys of [q0, q1)
// that `sees` lets in, by a radix select; take = INT_MAX and T = 0 when at most k are let in (all are taken).
template <class Sees>
__device__ void select_kth(StaticSmem& sm, const float* s, int q0, int q1, int k, Sees sees, uint32_t& t,
                           int& take) {
  const int tid = threadIdx.x;
  if (tid == 0) sm.prefix = 0, sm.rem = k;
  uint32_t high_mask = 0;
  bool all = false;
#pragma unroll 1
  for (int d = 0; d < kSelectDigits; ++d) {
    const int shift = digit_shift(d), bins = digit_bins(d);
    for (int i = tid; i < bins; i += kThreads) sm.hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = sm.prefix;
    const int rem = sm.rem;
    for (int j = q0 + tid; j < q1; j += kThreads) {
      if (!sees(j)) continue;
      const uint32_t key = canonical_order_key(__ldg(s + j));
      if ((key & high_mask) == prefix) atomicAdd(sm.hist + ((key >> shift) & uint32_t(bins - 1)), 1);
    }
    __syncthreads();
    const int total = select_digit<kThreads>(bins, shift, prefix, rem, [&](int b) { return sm.hist[b]; }, sm.scratch,
                                             &sm.prefix, &sm.rem);
    if (d == 0 && total <= k) {  // total is the same on every thread
      all = true;
      break;
    }
    high_mask |= uint32_t(bins - 1) << shift;
    __syncthreads();
  }
  t = all ? 0u : sm.prefix;
  take = all ? INT_MAX : sm.rem;
  __syncthreads();  // sm.prefix / rem are rewritten by the next group
}

__device__ __forceinline__ void push_candidate(StaticSmem& sm, uint64_t* cand, int room, uint32_t key, int j) {
  const int at = atomicAdd(&sm.candidates, 1);
  if (at < room) cand[at] = rank_key(key, j);
}

__global__ void __launch_bounds__(kThreads) build_topk_bounded_key_lists_kernel(TopKBoundedKeyListArgs args) {
  __shared__ StaticSmem sm;
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  const KeyListArgs& L = args.lists;
  const int k = static_cast<int>(args.k);
  const int lk = static_cast<int>(L.cols);
  const int capacity = static_cast<int>(L.capacity);
  const int cand_room = static_cast<int>(candidate_room(k));
  const int uni_room = static_cast<int>(union_room(capacity));
  uint64_t* cand = reinterpret_cast<uint64_t*>(dynamic_smem);
  int* uni = reinterpret_cast<int*>(cand + cand_room);
  uint8_t* kept = reinterpret_cast<uint8_t*>(uni + uni_room);

  const int64_t unit = blockIdx.x;
  const int64_t m_tiles = L.m_tiles();
  const int64_t bh = unit / m_tiles;
  const int64_t b = bh / L.heads, h = bh % L.heads;
  const int r0 = static_cast<int>(unit % m_tiles) * kRows;
  const int rows = min(kRows, static_cast<int>(L.rows) - r0);
  const int rows_per_unit = static_cast<int>(L.rows_per_unit());
  const float* s = args.scores + ((args.scores_batch == 1 ? 0 : b) * L.heads + h) * int64_t(lk);
  const int32_t* key_segments = args.bounds.segments(b);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int r = tid; r < kRows; r += kThreads) {
    if (r < rows) {
      const RowRange range = args.bounds.range(b, r0 + r);
      sm.lo[r] = range.lo, sm.hi[r] = range.hi, sm.segment[r] = range.segment;
      sm.compares[r] = range.key_segments != nullptr;
    } else {
      sm.lo[r] = sm.hi[r] = 0, sm.segment[r] = 0, sm.compares[r] = false;
    }
    sm.thr_key[r] = UINT32_MAX, sm.thr_index[r] = -1;
  }
  if (tid == 0) sm.listed = 0;
  __syncthreads();
  if (tid == 0) form_groups(sm, rows);
  __syncthreads();

#pragma unroll 1
  for (int g = 0; g < sm.groups; ++g) {
    const int first = sm.g_first[g], last = sm.g_last[g];
    const int lo_min = sm.g_lo_min[g], lo_max = sm.g_lo_max[g], hi_min = sm.g_hi_min[g], hi_max = sm.g_hi_max[g];
    const int32_t* ids = sm.compares[first] ? key_segments : nullptr;
    const int id = sm.segment[first];
    const auto sees = [&](int j) { return ids == nullptr || __ldg(ids + j) == id; };
    if (tid == 0) sm.candidates = 0;
    __syncthreads();
    const bool has_q = lo_max < hi_min;
    if (has_q) {
      uint32_t t = 0;
      int take = 0;
      select_kth(sm, s, lo_max, hi_min, k, sees, t, take);
      // Q's k best in index order: the keys above T, and the first `take` equal to it.
      int ties_before = 0;
      for (int base = lo_max; base < hi_min; base += kThreads) {
        const int j = base + tid;
        const bool in = j < hi_min && sees(j);
        const uint32_t key = in ? canonical_order_key(__ldg(s + j)) : 0u;
        const bool above = in && key > t, equal = in && key == t;
        int step_equal = 0;
        const int before = cta_exclusive_scan<kWarps>(equal ? 1 : 0, sm.scratch, step_equal);
        if (above || (equal && ties_before + before < take)) push_candidate(sm, cand, cand_room, key, j);
        ties_before += step_equal;
      }
    }
    // The end ranges: [lo_min, lo_max) and [hi_min, hi_max) beside Q, or [lo_min, hi_max) without it.
    const int end0 = has_q ? lo_max : hi_max, begin1 = has_q ? hi_min : hi_max;
    for (int j = lo_min + tid; j < end0; j += kThreads)
      if (sees(j)) push_candidate(sm, cand, cand_room, canonical_order_key(__ldg(s + j)), j);
    for (int j = begin1 + tid; j < hi_max; j += kThreads)
      if (sees(j)) push_candidate(sm, cand, cand_room, canonical_order_key(__ldg(s + j)), j);
    __syncthreads();
    const int n = sm.candidates;
    if (n > cand_room) __trap();  // at most k + 2 * kSpread by the grouping rule
    cta_bitonic_sort<kThreads>(cand, n, ~uint64_t(0));
    for (int c = tid; c < n; c += kThreads) kept[c] = 0;
    __syncthreads();

    // A warp per row: the row's k-th visible candidate in rank order (every candidate passed the group's id test,
    // so the row sees exactly those inside its own range), marking the ones it keeps.
    for (int r = first + warp; r <= last; r += kWarps) {
      if (sm.group_of[r] != g) continue;
      const int lo = sm.lo[r], hi = sm.hi[r];
      uint32_t thr_key = 0;
      int thr_index = INT_MAX, count = 0;
      for (int base = 0; base < n; base += 32) {
        const int c = base + lane;
        const uint64_t e = c < n ? cand[c] : 0;
        const int j = rank_index(e);
        const bool in = c < n && lo <= j && j < hi;
        const uint32_t ballot = __ballot_sync(0xffffffffu, in);
        const int found = __popc(ballot);
        if (count + found >= k) {
          uint32_t m = ballot;
          for (int i = 1; i < k - count; ++i) m &= m - 1;  // drop the lowest set bits before the k-th
          const int at = __ffs(m) - 1;
          if (in && lane <= at) kept[c] = 1;
          const uint64_t kth = __shfl_sync(0xffffffffu, e, at);
          thr_key = rank_order_key(kth), thr_index = rank_index(kth);
          break;
        }
        if (in) kept[c] = 1;
        count += found;
      }
      if (lane == 0) sm.thr_key[r] = thr_key, sm.thr_index[r] = thr_index;
    }
    __syncthreads();
    for (int c = tid; c < n; c += kThreads) {
      if (!kept[c]) continue;
      const int at = atomicAdd(&sm.listed, 1);
      if (at < uni_room) uni[at] = rank_index(cand[c]);
    }
    __syncthreads();
  }

  // The union: sorted, each key once, into the list.
  int32_t* keys = L.keys + unit * L.keys_stride();
  const int listed = sm.listed;
  bool overflow = listed > uni_room;
  int count = 0;
  if (!overflow) {
    cta_bitonic_sort<kThreads>(uni, listed, INT_MAX);
    for (int base = 0; base < listed; base += kThreads) {
      const int i = base + tid;
      const bool opens = i < listed && (i == 0 || uni[i] != uni[i - 1]);
      int step = 0;
      const int at = count + cta_exclusive_scan<kWarps>(opens ? 1 : 0, sm.scratch, step);
      if (opens && at < capacity) keys[1 + at] = uni[i];
      count += step;
    }
    overflow = count > capacity;
  }
  if (overflow) {
    if (!args.may_overflow) __trap();  // the caller's capacity claimed a bound that does not hold
    if (tid == 0) keys[0] = kKeyListDense;
    return;
  }
  if (tid == 0) keys[0] = count;
  for (int i = count + tid; i < capacity; i += kThreads) keys[1 + i] = 0;
  __syncthreads();  // the list is read back below

  // Bit words: lane = row (four warps of 32 rows), the two warps of a row block take alternate chunks; the chunk's
  // keys, order keys and ids are loaded once per lane and passed around the warp.
  const int row = (warp & 3) * 32 + lane;
  const bool live = row < rows && sm.group_of[row] >= 0;
  const int lo = live ? sm.lo[row] : 0, hi = live ? sm.hi[row] : 0, id = sm.segment[row < kRows ? row : 0];
  const bool compares = live && sm.compares[row];
  const uint32_t thr_key = live ? sm.thr_key[row] : UINT32_MAX;
  const int thr_index = live ? sm.thr_index[row] : -1;
  const int chunks = static_cast<int>(L.chunks()), used = (count + kKeyListChunk - 1) / kKeyListChunk;
  uint64_t* bits = L.bits + unit * L.chunks() * rows_per_unit;
  for (int c = warp >> 2; c < chunks; c += 2) {
    uint64_t word = 0;
    if (c < used) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int p = c * kKeyListChunk + half * 32 + lane;
        const int j = p < count ? keys[1 + p] : -1;
        const uint32_t key = j >= 0 ? canonical_order_key(__ldg(s + j)) : 0u;
        const int key_id = j >= 0 && key_segments != nullptr ? __ldg(key_segments + j) : 0;
#pragma unroll 8
        for (int i = 0; i < 32; ++i) {
          const int jj = __shfl_sync(0xffffffffu, j, i);
          const uint32_t kk = __shfl_sync(0xffffffffu, key, i);
          const int ii = __shfl_sync(0xffffffffu, key_id, i);
          const bool keep = jj >= lo && jj < hi && (!compares || ii == id) &&
                            (kk > thr_key || (kk == thr_key && jj <= thr_index));
          word |= uint64_t(keep) << (half * 32 + i);
        }
      }
    }
    if (row < rows_per_unit) bits[int64_t(c) * rows_per_unit + row] = word;
  }
}

}  // namespace

int64_t topk_bounded_key_lists_smem_bytes(int64_t k, int64_t capacity) {
  return dynamic_smem_bytes(k, capacity) + int64_t(sizeof(StaticSmem));
}

cudaError_t launch_build_topk_bounded_key_lists(const TopKBoundedKeyListArgs& args, cudaStream_t stream) {
  const KeyListArgs& L = args.lists;
  if (!L.capacity_ok() || args.k < 1 || args.k >= L.cols || args.k > kTopKBoundedListsMaxK || L.cols > INT_MAX ||
      L.rows > INT_MAX || L.units() > INT_MAX || L.is_causal)
    return cudaErrorInvalidValue;
  const int64_t units = L.units();
  if (units == 0) return cudaSuccess;
  const int64_t dynamic = dynamic_smem_bytes(args.k, L.capacity);
  int device = 0, optin = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      err != cudaSuccess)
    return err;
  cudaFuncAttributes attr;
  if (cudaError_t err = cudaFuncGetAttributes(&attr, build_topk_bounded_key_lists_kernel); err != cudaSuccess)
    return err;
  const int64_t room = optin - static_cast<int64_t>(attr.sharedSizeBytes);
  if (dynamic > room) return cudaErrorInvalidValue;
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(build_topk_bounded_key_lists_kernel, static_cast<int>(room), configured);
      err != cudaSuccess)
    return err;
  build_topk_bounded_key_lists_kernel<<<static_cast<unsigned>(units), kThreads, static_cast<size_t>(dynamic),
                                        stream>>>(args);
  return cudaGetLastError();
}

}  // namespace dmattn
