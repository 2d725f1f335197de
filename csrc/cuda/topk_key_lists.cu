#include "cuda/topk_key_lists.h"

#include <atomic>
#include <climits>
#include <cstdint>

#include "cuda/cta_scan.cuh"
#include "cuda/cta_sort.cuh"
#include "cuda/smem_limit.cuh"

namespace dmattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kKeyListBlockM;
constexpr int kOrderPerThread = 8;  // two 16-byte loads of `order` per thread and pass
constexpr int kOrderSegment = kThreads * kOrderPerThread;
static_assert(kRows == 4 * 32, "the row words' prefix XOR gives each lane four rows");

struct StaticSmem {
  int scratch[kWarps + 1];
  // The diagonal keys D = [d0, d0 + dlen), by position m (key d0 + m). At most kRows - 1 of them.
  float d_score[kRows];
  int d_rank[kRows];    // positions m in (score desc, index asc) order
  int d_beaten[kRows];  // cA: how many keys of A beat key d0 + m
  int d_kept[kRows];    // the D keys some row keeps, ascending
  // Per row of the unit: its k-th best key, the threshold. "Keeps all it sees" is (-inf, INT_MAX), which every
  // finite score passes. Non-decreasing along the rows (see rows_reaching).
  float thr_score[kRows];
  int thr_index[kRows];
  // Per warp, one 64-key chunk's row words under construction, as low and high halves: first the rows where a
  // key's row interval starts or ends, then (after a prefix XOR over the rows) the words themselves.
  alignas(16) uint32_t words[kWarps][2][kRows];
};

// Dynamic shared memory: A's indices (room for the bitonic sort's power-of-two padding), then A's scores.
__host__ __device__ constexpr int64_t dynamic_smem_bytes(int64_t k) {
  return pow2_at_least(k) * int64_t(sizeof(int)) + k * int64_t(sizeof(float));
}

// (s1, j1) ranks before (s2, j2): higher score, then lower index. A strict total order over distinct keys.
__device__ __forceinline__ bool better(float s1, int j1, float s2, int j2) {
  return s1 > s2 || (s1 == s2 && j1 < j2);
}

// How many of the unit's first rows keep key (s, j) if they see it. Row r + 1 sees the keys of row r and one more,
// and a larger set's k-th best is at least as good, so the thresholds never decrease along the rows: the rows
// whose threshold (s, j) reaches are a prefix, and a key's rows are the interval [first row seeing it, this).
__device__ __forceinline__ int rows_reaching(const StaticSmem& sm, int rows, float s, int j) {
  int lo = 0, hi = rows;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (better(sm.thr_score[mid], sm.thr_index[mid], s, j)) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// a[0, n) (distinct keys of [0, 32 * words)) in ascending order through a bitmap of `words` words: O(n + words)
// instead of the bitonic sort's O(n log^2 n), when the keys' range is small enough for one.
__device__ void cta_sort_by_bitmap(int* a, int n, uint32_t* bitmap, int words, int* scratch) {
  for (int w = threadIdx.x; w < words; w += kThreads) bitmap[w] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreads) atomicOr(bitmap + (a[i] >> 5), 1u << (a[i] & 31));
  __syncthreads();
  const int per = (words + kThreads - 1) / kThreads;
  const int w0 = threadIdx.x * per, w1 = w0 + per < words ? w0 + per : words;
  int mine = 0;
  for (int w = w0; w < w1; ++w) mine += __popc(bitmap[w]);
  int total = 0;
  int pos = cta_exclusive_scan<kWarps>(mine, scratch, total);
  for (int w = w0; w < w1; ++w) {
    for (uint32_t b = bitmap[w]; b; b &= b - 1) a[pos++] = w * 32 + __ffs(b) - 1;
  }
  __syncthreads();
}

// One CTA per unit (b, h, 128-row query tile); the header says why the list is A ∪ {kept diagonal keys}.
__global__ void __launch_bounds__(kThreads) build_topk_key_lists_kernel(TopKKeyListArgs args) {
  __shared__ StaticSmem sm;
  extern __shared__ int4 dynamic_smem[];
  const KeyListArgs& L = args.lists;
  const int k = static_cast<int>(args.k);
  int* a_index = reinterpret_cast<int*>(dynamic_smem);
  float* a_score = reinterpret_cast<float*>(a_index + pow2_at_least(k));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m_tiles = L.m_tiles();
  const int64_t unit = blockIdx.x;
  const int64_t bh = unit / m_tiles;
  const int64_t row0 = (unit % m_tiles) * kRows;
  const int rows = static_cast<int>(L.rows - row0 < kRows ? L.rows - row0 : kRows);
  const int rows_per_unit = static_cast<int>(L.rows_per_unit());
  const int lk = static_cast<int>(L.cols);
  const float* scores = args.scores + bh * lk;
  const int32_t* order = args.order + bh * lk;
  // Lq, Lk < 2^31: p >= -Lq does not underflow, and p + rows - 1 = last row's bound <= Lk - 1.
  const int p = static_cast<int>(row0 + L.causal_offset);
  const int d0 = p + 1 > 0 ? p + 1 : 0;
  const int d_end = p + rows;  // one past the last row's last visible key
  const int dlen = d_end > d0 ? d_end - d0 : 0;
  const int a_want = p < 0 ? 0 : (p + 1 < k ? p + 1 : k);  // |A|
  // Rows seeing <= k keys keep all of them; when even the last row does, no ranking is needed at all.
  const bool ranked = p + rows > k;

  for (int m = tid; m < dlen; m += kThreads) sm.d_score[m] = __ldg(scores + d0 + m);

  int a = a_want;
  if (!ranked) {
    for (int i = tid; i < a; i += kThreads) a_index[i] = i;
  } else if (a_want > 0) {
    // A in rank order: the first a_want entries of `order` that are <= p. Entries outside [0, p] are skipped,
    // so a malformed `order` cannot index out of bounds.
    const bool vec = lk % 4 == 0 && reinterpret_cast<uintptr_t>(order) % 16 == 0;
    int found = 0;  // uniform over the CTA
    for (int64_t s0 = 0; s0 < lk && found < a_want; s0 += kOrderSegment) {
      const int64_t e0 = s0 + int64_t(tid) * kOrderPerThread;
      int idx[kOrderPerThread];
      if (vec && e0 + kOrderPerThread <= lk) {
        const int4 v0 = __ldg(reinterpret_cast<const int4*>(order + e0));
        const int4 v1 = __ldg(reinterpret_cast<const int4*>(order + e0 + 4));
        idx[0] = v0.x, idx[1] = v0.y, idx[2] = v0.z, idx[3] = v0.w;
        idx[4] = v1.x, idx[5] = v1.y, idx[6] = v1.z, idx[7] = v1.w;
      } else {
#pragma unroll
        for (int i = 0; i < kOrderPerThread; ++i) idx[i] = e0 + i < lk ? __ldg(order + e0 + i) : -1;
      }
      uint32_t hit = 0;
#pragma unroll
      for (int i = 0; i < kOrderPerThread; ++i) hit |= (idx[i] >= 0 && idx[i] <= p) ? (1u << i) : 0u;
      int total = 0;
      int pos = found + cta_exclusive_scan<kWarps>(__popc(hit), sm.scratch, total);
#pragma unroll
      for (int i = 0; i < kOrderPerThread; ++i) {
        if ((hit >> i) & 1u) {
          if (pos < a_want) a_index[pos] = idx[i], a_score[pos] = __ldg(scores + idx[i]);
          ++pos;
        }
      }
      found += total;
    }
    a = found < a_want ? found : a_want;  // short only if `order` is not a permutation
  }
  __syncthreads();

  if (ranked) {
    // Rank D by counting (|D| <= 127), and place each D key against A by binary search (A is in rank order).
    for (int m = tid; m < dlen; m += kThreads) {
      const float s = sm.d_score[m];
      const int j = d0 + m;
      int rank = 0;
      for (int m2 = 0; m2 < dlen; ++m2) rank += better(sm.d_score[m2], d0 + m2, s, j);
      sm.d_rank[rank] = m;
      int lo = 0, hi = a;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (better(a_score[mid], a_index[mid], s, j)) lo = mid + 1;
        else hi = mid;
      }
      sm.d_beaten[m] = lo;
    }
    __syncthreads();
  }

  // Per-row thresholds. Walking D in rank order, the i-th key e of D_r sits at cA(e) + i in the union's order;
  // the first one at >= k ends the walk, and x = the D_r keys in the top k. The top k is then A[0, k - x) and
  // D_r's first x keys, so the k-th best is the worse of A[k - x - 1] and the x-th key of D_r.
  for (int r = tid; r < kRows; r += kThreads) {
    float ts = -INFINITY;
    int tj = INT_MAX;
    if (r >= rows) {
      ts = INFINITY, tj = -1;
    } else if (ranked && p + r + 1 > k) {
      const int vis = p + r;
      int x = 0, last = -1;
      for (int q = 0; q < dlen; ++q) {
        const int m = sm.d_rank[q];
        if (d0 + m > vis) continue;
        if (sm.d_beaten[m] + x >= k) break;
        last = m, ++x;
      }
      bool have = false;
      if (x > 0) ts = sm.d_score[last], tj = d0 + last, have = true;
      const int ai = k - x - 1;
      if (ai >= 0 && ai < a && (!have || better(ts, tj, a_score[ai], a_index[ai])))
        ts = a_score[ai], tj = a_index[ai], have = true;
      if (!have) ts = -INFINITY, tj = INT_MAX;  // only with a malformed `order`; keeps the bounds intact
    }
    sm.thr_score[r] = ts, sm.thr_index[r] = tj;
  }
  __syncthreads();

  // The D keys some row keeps: key j is first seen by row j - p (>= 1).
  bool d_keep = false;
  int d_key = 0;
  if (tid < dlen) {
    d_key = d0 + tid;
    d_keep = rows_reaching(sm, rows, sm.d_score[tid], d_key) > d_key - p;
  }
  int n_kept = 0;
  const int d_pos = cta_exclusive_scan<kWarps>(d_keep ? 1 : 0, sm.scratch, n_kept);
  if (d_keep) sm.d_kept[d_pos] = d_key;

  const int count = a + n_kept;
  if (count > L.capacity) __trap();  // impossible for sizes the handler accepts; see the header

  // A by index. The rank order (and a_score) is no longer needed: the thresholds are done.
  const int bitmap_words = (p + 32) / 32;  // covers [0, p]
  if (a == p + 1) {
    for (int i = tid; i < a; i += kThreads) a_index[i] = i;
    __syncthreads();
  } else if (bitmap_words <= k) {
    cta_sort_by_bitmap(a_index, a, reinterpret_cast<uint32_t*>(a_score), bitmap_words, sm.scratch);
  } else {
    cta_bitonic_sort<kThreads>(a_index, a, INT_MAX);
  }

  int32_t* keys = L.keys + unit * L.keys_stride();
  for (int i = tid; i < count; i += kThreads) keys[1 + i] = i < a ? a_index[i] : sm.d_kept[i - a];
  if (tid == 0) keys[0] = count;

  // Bit words, one 64-key chunk per warp at a time. Key q of the chunk is kept by the rows [lo, hi) (lo: the
  // first row seeing it, hi: rows_reaching), so it toggles bit q at rows lo and hi, and a prefix XOR over the
  // rows turns the toggles into the row words. Lane l scans rows 4 l .. 4 l + 3.
  const int chunks = (count + kKeyListChunk - 1) / kKeyListChunk;
  uint64_t* bits = L.bits + unit * L.chunks() * rows_per_unit;
  uint32_t* w_lo = sm.words[warp][0];
  uint32_t* w_hi = sm.words[warp][1];
  for (int c = warp; c < chunks; c += kWarps) {
    for (int r = lane; r < kRows; r += 32) w_lo[r] = 0, w_hi[r] = 0;
    __syncwarp();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int q = c * kKeyListChunk + half * 32 + lane;
      if (q < count) {
        const int j = q < a ? a_index[q] : sm.d_kept[q - a];
        const int lo = j <= p ? 0 : j - p;
        const int hi = rows_reaching(sm, rows, __ldg(scores + j), j);
        uint32_t* w = half ? w_hi : w_lo;
        if (lo < hi) {
          atomicXor(w + lo, 1u << lane);
          if (hi < kRows) atomicXor(w + hi, 1u << lane);
        }
      }
    }
    __syncwarp();
    uint4 x = reinterpret_cast<const uint4*>(w_lo)[lane], y = reinterpret_cast<const uint4*>(w_hi)[lane];
    x.y ^= x.x, x.z ^= x.y, x.w ^= x.z;
    y.y ^= y.x, y.z ^= y.y, y.w ^= y.z;
    uint32_t cx = x.w, cy = y.w;  // this lane's rows XORed; after the loop, with those of the lanes below
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const uint32_t ux = __shfl_up_sync(0xffffffffu, cx, d), uy = __shfl_up_sync(0xffffffffu, cy, d);
      if (lane >= d) cx ^= ux, cy ^= uy;
    }
    cx ^= x.w, cy ^= y.w;  // exclusive
    x.x ^= cx, x.y ^= cx, x.z ^= cx, x.w ^= cx;
    y.x ^= cy, y.y ^= cy, y.z ^= cy, y.w ^= cy;
    reinterpret_cast<uint4*>(w_lo)[lane] = x, reinterpret_cast<uint4*>(w_hi)[lane] = y;
    __syncwarp();
    for (int r = lane; r < rows_per_unit; r += 32)
      bits[int64_t(c) * rows_per_unit + r] = (uint64_t(w_hi[r]) << 32) | w_lo[r];
    __syncwarp();  // the next chunk clears the words
  }
}

// The static part as the compiled kernel has it (ptxas pads it beyond sizeof(StaticSmem)).
cudaError_t static_smem_bytes(size_t* bytes) {
  cudaFuncAttributes attr;
  if (cudaError_t err = cudaFuncGetAttributes(&attr, build_topk_key_lists_kernel); err != cudaSuccess) return err;
  *bytes = attr.sharedSizeBytes;
  return cudaSuccess;
}

}  // namespace

cudaError_t topk_key_lists_smem_bytes(int64_t k, size_t* bytes) {
  size_t fixed = 0;
  if (cudaError_t err = static_smem_bytes(&fixed); err != cudaSuccess) return err;
  *bytes = fixed + static_cast<size_t>(dynamic_smem_bytes(k < 1 ? 1 : k));
  return cudaSuccess;
}

cudaError_t launch_build_topk_key_lists(const TopKKeyListArgs& args, cudaStream_t stream) {
  const KeyListArgs& L = args.lists;
  if (!L.capacity_ok() || args.k < 1 || args.k >= L.cols || L.cols > INT_MAX || L.rows > INT_MAX ||
      L.units() > INT_MAX)
    return cudaErrorInvalidValue;
  const int64_t min_capacity = args.k + L.rows_per_unit() - 1 < L.cols ? args.k + L.rows_per_unit() - 1 : L.cols;
  if (L.capacity < min_capacity) return cudaErrorInvalidValue;
  const int64_t units = L.units();
  if (units == 0) return cudaSuccess;
  const int64_t dynamic = dynamic_smem_bytes(args.k);
  int device = 0, optin = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
      err != cudaSuccess)
    return err;
  size_t fixed = 0;
  if (cudaError_t err = static_smem_bytes(&fixed); err != cudaSuccess) return err;
  const int64_t room = optin - static_cast<int64_t>(fixed);
  if (dynamic > room) return cudaErrorInvalidValue;
  // Raised once per device to all the room there is, not to this call's need: the attribute is per kernel, and
  // calls with different k may race. (Static + dynamic above 48 KiB needs the raise, whatever the split.)
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(build_topk_key_lists_kernel, static_cast<int>(room), configured);
      err != cudaSuccess)
    return err;
  build_topk_key_lists_kernel<<<static_cast<unsigned>(units), kThreads, static_cast<size_t>(dynamic), stream>>>(
      args);
  return cudaGetLastError();
}

}  // namespace dmattn
