#include "cuda/topk_shared_key_lists.h"

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cooperative_groups.h>

#include "cuda/cta_scan.cuh"
#include "cuda/half_float.cuh"
#include "cuda/score_order.cuh"
#include "cuda/smem_limit.cuh"

namespace dmattn {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// The streaming kernel: two vector loads of four scores per thread and step (4096 keys a step), with the next step's
// loads in flight while one is processed (for_each_step); 64 registers a thread, two CTAs of 512 threads per
// multiprocessor. Load i of a step covers its keys [i * 4 * kThreads, (i + 1) * 4 * kThreads), four per thread in
// thread order, so each warp-wide load reads whole 32-byte sectors.
constexpr int kCtasPerSm = 2;
constexpr int kVectors = 2;
constexpr int kPerThread = 4 * kVectors;
constexpr int kStep = kThreads * kPerThread;
constexpr int kDigits = kSelectDigits;
constexpr int kMaxBins = kSelectMaxBins;
static_assert(kStep < (1 << 16), "a step's counts are packed as two 16-bit halves");

// The key of entry e of this thread's scores in the step starting at `base`: entry 4 i + c is key
// base + (i * kThreads + tid) * 4 + c.
__device__ __forceinline__ int64_t key_of(int64_t base, int e) {
  return base + (int64_t(e / 4) * kThreads + threadIdx.x) * 4 + e % 4;
}

// Four scores of type T at row + j0 as floats (16-bit ones convert exactly), by one vector load: 16 bytes of float,
// 8 bytes of a 16-bit type. The caller checks that the piece lies in the row and is aligned.
template <class T>
__device__ __forceinline__ void load_four(const T* row, int64_t j0, float* x) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(row + j0));
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    constexpr bool kBF16 = std::is_same_v<T, __nv_bfloat16>;
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + j0));
    x[0] = half_bits_to_f32<kBF16>(v.x), x[1] = half_bits_to_f32<kBF16>(v.x >> 16);
    x[2] = half_bits_to_f32<kBF16>(v.y), x[3] = half_bits_to_f32<kBF16>(v.y >> 16);
  }
}
template <class T>
__device__ __forceinline__ float load_one(const T* row, int64_t j) {
  if constexpr (std::is_same_v<T, float>) return __ldg(row + j);
  else return half_bits_to_f32<std::is_same_v<T, __nv_bfloat16>>(__ldg(reinterpret_cast<const uint16_t*>(row) + j));
}
// Whether a row of T allows the vector loads of load_four (each piece of four keys from a multiple of 4).
template <class T>
__device__ __forceinline__ bool vector_row(const T* row, int lk) {
  return lk % 4 == 0 && reinterpret_cast<uintptr_t>(row) % (4 * sizeof(T)) == 0;
}

// This thread's kPerThread scores of the step starting at `base`, as floats, with a bit per entry whose key lies in
// [lo, end). Vector loads where a whole piece of four lies in the range and the row allows them. Nothing here uses
// the loaded values, so the loads stay in flight until the caller reads them.
template <class T>
__device__ __forceinline__ uint32_t load_step(const T* row, int lo, int end, bool vec, int64_t base,
                                              float (&x)[kPerThread]) {
  uint32_t valid = 0;
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int64_t j0 = key_of(base, 4 * i);
    if (vec && j0 >= lo && j0 + 4 <= end) {
      load_four(row, j0, x + 4 * i);
      valid |= 0xfu << (4 * i);
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool in = j0 + c >= lo && j0 + c < end;
        x[4 * i + c] = in ? load_one(row, j0 + c) : 0.f;
        valid |= in ? (1u << (4 * i + c)) : 0u;
      }
    }
  }
  return valid;
}

// f(base, valid, scores) over the steps from `begin` (a multiple of 4) below `end`, the keys of [lo, end) valid, in
// order, while the next step's loads are in flight (two register buffers in turn: a copy from one to the other
// would wait for the loads). f returns false to stop; it must return the same on every thread of the CTA.
template <class T, class F>
__device__ __forceinline__ void for_each_step(const T* row, int64_t begin, int lo, int end, bool vec, F&& f) {
  if (begin >= end) return;
  float a[kPerThread], b[kPerThread];
  uint32_t valid_a = load_step(row, lo, end, vec, begin, a), valid_b = 0;
  for (int64_t base = begin;;) {
    if (base + kStep < end) valid_b = load_step(row, lo, end, vec, base + kStep, b);
    if (!f(base, valid_a, a) || (base += kStep) >= end) return;
    if (base + kStep < end) valid_a = load_step(row, lo, end, vec, base + kStep, a);
    if (!f(base, valid_b, b) || (base += kStep) >= end) return;
  }
}

struct Smem {
  int hist[kMaxBins];
  int scratch[kWarps + 1];
  uint32_t prefix;  // the digits chosen so far, in place
  int rem;          // how many of the keys matching `prefix` are still to be taken
  int above, equal;  // this CTA's keys above and equal to T (its slice), for the other CTAs of the cluster
};

// The CTAs of one (b, h): a thread-block cluster of kCluster CTAs on sm_90 (each takes a slice of the row and reads
// the others' histograms and counts through distributed shared memory), a single CTA elsewhere.
template <int kCluster>
struct RowTeam {
  __device__ __forceinline__ static int rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kCluster > 1) return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
    return 0;
  }
  // A barrier over the team, which also orders its shared-memory accesses.
  __device__ __forceinline__ static void sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kCluster > 1) {
      cooperative_groups::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }
  // `p` (in this CTA's shared memory) in the shared memory of team member r.
  template <class T>
  __device__ __forceinline__ static T* member(T* p, int r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kCluster > 1) return cooperative_groups::this_cluster().map_shared_rank(p, r);
#endif
    return p;
  }
};

// The rest of list bh once its first k entries are placed: the count, zeros past it, and the words (one row per
// unit: the first k bits), split over `workers` threads of which this is `worker`.
__device__ __forceinline__ void finish_list(const KeyListArgs& L, int64_t bh, int k, int worker, int workers) {
  int32_t* keys = L.keys + bh * L.keys_stride();
  if (worker == 0) keys[0] = k;
  for (int64_t i = k + worker; i < L.capacity; i += workers) keys[1 + i] = 0;
  uint64_t* bits = L.bits + bh * L.chunks();
  for (int64_t c = worker; c < L.chunks(); c += workers) {
    const int64_t n = k - c * kKeyListChunk;
    bits[c] = n >= kKeyListChunk ? ~uint64_t(0) : (n > 0 ? (uint64_t(1) << n) - 1 : uint64_t(0));
  }
}

// One team per (b, h); the header gives the algorithm. Member r of the team reads the r-th slice of the row (whole
// steps); the histograms and the above / equal counts are summed over the team, so every member selects the same
// T and places its slice's kept keys at their places in the whole row's list.
template <class T, int kCluster>
__global__ void __launch_bounds__(kThreads, kCtasPerSm) build_topk_shared_key_lists_kernel(TopKSharedKeyListArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (kCluster > 1) __trap();  // the launcher picks clusters only for sm_90 code
#endif
  using Team = RowTeam<kCluster>;
  __shared__ Smem sm;
  const KeyListArgs& L = args.lists;
  const int lk = static_cast<int>(L.cols);
  const int64_t bh = blockIdx.x / kCluster;
  const int64_t b = bh / L.heads;
  const int rank = Team::rank();
  const T* row = static_cast<const T*>(args.scores) + b * args.scores_batch_stride + (bh % L.heads) * lk;
  const bool vec = vector_row(row, lk);
  const int tid = threadIdx.x;
  // The keys the row may keep: [lo, hi) of its batch element's bounds, else all.
  int lo = 0, hi = lk;
  if (args.bounds.present()) {
    hi = min(max(args.bounds.hi(b, 0), 0), lk);
    lo = min(max(args.bounds.lo(b, 0), 0), hi);
  }
  const int k = static_cast<int>(args.k < hi - lo ? args.k : hi - lo);  // the list's count
  int32_t* keys = L.keys + bh * L.keys_stride();
  const int worker = rank * kThreads + tid;
  const int workers = kThreads * kCluster;
  if (k == hi - lo) {  // the row keeps every key it sees (uniform over the team)
    for (int i = worker; i < k; i += workers) keys[1 + i] = lo + i;
    finish_list(L, bh, k, worker, workers);
    return;
  }
  // Member r reads the r-th slice of whole steps from lo rounded down to a piece of four.
  const int64_t first = lo & ~3;
  const int64_t steps = (int64_t(hi) - first + kStep - 1) / kStep;
  const int64_t per_member = (steps + kCluster - 1) / kCluster;
  const int64_t begin = first + rank * per_member * kStep;
  const int end = static_cast<int>(begin + per_member * kStep < hi ? begin + per_member * kStep : hi);

  if (tid == 0) sm.prefix = 0, sm.rem = k;
  uint32_t high_mask = 0;  // the bits of the digits chosen so far
  // This member's keys above T and equal to T (a team's members place their slices after the earlier members').
  // A key lies above T where its first digit that differs from T's is larger, so they are summed from the member's
  // own histograms, digit by digit: the bins above the chosen one (its keys match the digits chosen before); the
  // last digit's chosen bin holds the keys equal to T. No pass over the row counts them.
  int own_above = 0, own_equal = 0;
#pragma unroll 1
  for (int d = 0; d < kDigits; ++d) {
    const int shift = digit_shift(d), bins = digit_bins(d);
    for (int i = tid; i < bins; i += kThreads) sm.hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = sm.prefix;
    for_each_step(row, begin, lo, end, vec, [&](int64_t, uint32_t valid, const float (&x)[kPerThread]) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const uint32_t key = canonical_order_key(x[i]);
        if (((valid >> i) & 1u) && (key & high_mask) == prefix)
          atomicAdd(sm.hist + ((key >> shift) & uint32_t(bins - 1)), 1);
      }
      return true;
    });
    Team::sync();  // every member's histogram is complete
    // The bin counts summed over the team.
    select_digit<kThreads>(bins, shift, prefix, sm.rem, [&](int bin) {
      int n = 0;
#pragma unroll
      for (int r = 0; r < kCluster; ++r) n += *Team::member(sm.hist + bin, r);
      return n;
    }, sm.scratch, &sm.prefix, &sm.rem);
    high_mask |= uint32_t(bins - 1) << shift;
    Team::sync();  // the members are done reading the histograms (the next digit clears them), and sm is set
    if constexpr (kCluster > 1) {
      const int chosen = static_cast<int>((sm.prefix >> shift) & uint32_t(bins - 1));
      int above = 0;
      for (int i = chosen + 1 + tid; i < bins; i += kThreads) above += sm.hist[i];
      int total = 0;
      cta_exclusive_scan<kWarps>(above, sm.scratch, total);  // its barriers precede the next digit's clearing
      own_above += total;
      if (d == kDigits - 1) own_equal = sm.hist[chosen];
    }
  }

  // T = sm.prefix, the k-th largest key; take = how many keys equal to T are kept (the lowest indices).
  const uint32_t t = sm.prefix;
  const int take = sm.rem;
  // The keys before this member's slice: its place in the list (a single CTA starts at 0).
  int placed_above = 0, placed_equal = 0;  // uniform: the kept keys before this piece, by kind
  if (kCluster > 1) {
    if (tid == 0) sm.above = own_above, sm.equal = own_equal;
    Team::sync();  // every member's counts are set
    for (int r = 0; r < rank; ++r) {
      placed_above += *Team::member(&sm.above, r);
      placed_equal += *Team::member(&sm.equal, r);
    }
    Team::sync();  // no member leaves while another reads its counts
  }
  // Placement in index order: one CTA prefix sum per vector load of the step (the loads' keys are in thread order).
  for_each_step(row, begin, lo, end, vec, [&](int64_t base, uint32_t valid, const float (&x)[kPerThread]) {
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      uint32_t above = 0, equal = 0;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = 4 * v + c;
        const uint32_t key = canonical_order_key(x[i]);
        above |= ((valid >> i) & 1u) && key > t ? (1u << c) : 0u;
        equal |= ((valid >> i) & 1u) && key == t ? (1u << c) : 0u;
      }
      int piece_total = 0;
      const int excl = cta_exclusive_scan<kWarps>(__popc(above) | (__popc(equal) << 16), sm.scratch, piece_total);
      int n_above = placed_above + (excl & 0xffff), n_equal = placed_equal + (excl >> 16);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        // A key's place in the list: the kept keys before it, i.e. all keys above T and the first `take` equal.
        const int32_t j = static_cast<int32_t>(key_of(base, 4 * v + c));
        if ((above >> c) & 1u) {
          keys[1 + n_above + (n_equal < take ? n_equal : take)] = j;
          ++n_above;
        } else if ((equal >> c) & 1u) {
          if (n_equal < take) keys[1 + n_above + n_equal] = j;
          ++n_equal;
        }
      }
      placed_above += piece_total & 0xffff, placed_equal += piece_total >> 16;
    }
    return placed_above + (placed_equal < take ? placed_equal : take) < k;
  });
  finish_list(L, bh, k, worker, workers);
}


// ------------------------------------------------------------------------------------------ resident slices
// The same selection with each member's slice of the row held in shared memory as order keys: the row is read from
// global memory once, the first digit's histogram built as it arrives, and the later digits and the placement read
// shared memory. A slice of at most kResMaxRun keys a thread (1024 threads) runs here when it fits the device's
// shared memory; longer rows take the streaming kernel above.
constexpr int kResThreads = 1024;
constexpr int kResWarps = kResThreads / 32;
constexpr int kResMaxRun = 48;       // keys per thread; the placement holds a thread's run as two 64-bit masks
constexpr int kResHistCopies = 2;    // warps of even and odd index count into their own copy (half the contention)
constexpr int kResLoadBatch = 4;     // pieces of four scores a thread has in flight while loading its slice

struct ResidentSmem {
  int hist[kResHistCopies][kMaxBins];
  int scratch[kResWarps + 1];
  uint32_t prefix;
  int rem;
  int above, equal;
};
// The slice's keys follow the struct, 16-byte aligned.
constexpr int kResSliceOffset = (sizeof(ResidentSmem) + 15) / 16 * 16;

__host__ __device__ constexpr int64_t resident_run(int64_t span, int team) {
  return ((span + int64_t(team) * kResThreads - 1) / (int64_t(team) * kResThreads) + 3) / 4 * 4;
}
__host__ __device__ constexpr int64_t resident_smem_bytes(int64_t run) {
  return kResSliceOffset + run * kResThreads * 4;
}

// Keys [j0, j0 + 4) of the row as floats, with a bit per key inside [lo, end) (load_step's loads, for one piece);
// the caller converts them with keys_of after issuing its other loads.
struct Piece {
  float x[4];
  uint32_t valid;
};
template <class T>
__device__ __forceinline__ Piece load_piece(const T* row, int64_t j0, int lo, int end, bool vec) {
  Piece p;
  if (vec && j0 >= lo && j0 + 4 <= end) {
    load_four(row, j0, p.x);
    p.valid = 0xfu;
  } else {
    p.valid = 0;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const bool in = j0 + c >= lo && j0 + c < end;
      p.x[c] = in ? load_one(row, j0 + c) : 0.f;
      p.valid |= in ? (1u << c) : 0u;
    }
  }
  return p;
}
// The piece's canonical order keys, 0 for a key outside the range (below every key).
__device__ __forceinline__ uint4 keys_of(const Piece& p) {
  uint32_t k[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) k[c] = (p.valid >> c) & 1u ? canonical_order_key(p.x[c]) : 0u;
  return make_uint4(k[0], k[1], k[2], k[3]);
}
__device__ __forceinline__ uint32_t key_at(const uint4& w, int c) {
  return c == 0 ? w.x : (c == 1 ? w.y : (c == 2 ? w.z : w.w));
}

template <class T, int kCluster>
__global__ void __launch_bounds__(kResThreads, 1) build_topk_shared_key_lists_resident_kernel(TopKSharedKeyListArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (kCluster > 1) __trap();  // the launcher picks clusters only for sm_90 code
#endif
  using Team = RowTeam<kCluster>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ResidentSmem& sm = *reinterpret_cast<ResidentSmem*>(smem_raw);
  uint32_t* slice = reinterpret_cast<uint32_t*>(smem_raw + kResSliceOffset);
  const KeyListArgs& L = args.lists;
  const int lk = static_cast<int>(L.cols);
  const int64_t bh = blockIdx.x / kCluster;
  const int64_t b = bh / L.heads;
  const int rank = Team::rank();
  const T* row = static_cast<const T*>(args.scores) + b * args.scores_batch_stride + (bh % L.heads) * lk;
  const bool vec = vector_row(row, lk);
  const int tid = threadIdx.x;
  int lo = 0, hi = lk;
  if (args.bounds.present()) {
    hi = min(max(args.bounds.hi(b, 0), 0), lk);
    lo = min(max(args.bounds.lo(b, 0), 0), hi);
  }
  const int k = static_cast<int>(args.k < hi - lo ? args.k : hi - lo);
  int32_t* keys = L.keys + bh * L.keys_stride();
  const int worker = rank * kResThreads + tid, workers = kResThreads * kCluster;
  if (k == hi - lo) {  // the row keeps every key it sees (uniform over the team)
    for (int i = worker; i < k; i += workers) keys[1 + i] = lo + i;
    finish_list(L, bh, k, worker, workers);
    return;
  }
  // Member r holds keys [begin, begin + run * kResThreads) of the row from lo rounded down to a piece of four; those
  // outside [lo, end) are held as 0, below every key.
  const int64_t first = lo & ~3;
  const int run = static_cast<int>(resident_run(hi - first, kCluster));
  const int vectors = run / 4;  // pieces of four keys a thread loads, and in its run
  const int64_t begin = first + int64_t(rank) * run * kResThreads;
  const int end = static_cast<int>(begin + int64_t(run) * kResThreads < hi ? begin + int64_t(run) * kResThreads : hi);
  uint4* slice4 = reinterpret_cast<uint4*>(slice);
  int* hist = sm.hist[(tid >> 5) & (kResHistCopies - 1)];

  for (int i = tid; i < kResHistCopies * kMaxBins; i += kResThreads) (&sm.hist[0][0])[i] = 0;
  if (tid == 0) sm.prefix = 0, sm.rem = k;
  __syncthreads();
  // Piece v of this thread: keys begin + 4 (v * kResThreads + tid) + [0, 4), so each warp-wide load reads whole
  // sectors and each store fills whole banks. The first digit's histogram is built from the registers.
#pragma unroll 1
  for (int v0 = 0; v0 < vectors; v0 += kResLoadBatch) {
    Piece p[kResLoadBatch];
#pragma unroll
    for (int i = 0; i < kResLoadBatch; ++i)
      if (v0 + i < vectors) p[i] = load_piece(row, begin + 4 * (int64_t(v0 + i) * kResThreads + tid), lo, end, vec);
#pragma unroll
    for (int i = 0; i < kResLoadBatch; ++i) {
      if (v0 + i >= vectors) break;
      const uint4 w = keys_of(p[i]);
      slice4[(v0 + i) * kResThreads + tid] = w;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t key = key_at(w, c);
        if (key != 0u) atomicAdd(hist + (key >> digit_shift(0)), 1);
      }
    }
  }

  uint32_t high_mask = 0;
  int own_above = 0, own_equal = 0;  // this member's keys above and equal to T (the streaming kernel's way)
#pragma unroll 1
  for (int d = 0; d < kDigits; ++d) {
    const int shift = digit_shift(d), bins = digit_bins(d);
    if (d > 0) {
      for (int i = tid; i < kResHistCopies * kMaxBins; i += kResThreads) (&sm.hist[0][0])[i] = 0;
      __syncthreads();
      const uint32_t prefix = sm.prefix;
#pragma unroll 4
      for (int v = 0; v < vectors; ++v) {
        const uint4 w = slice4[v * kResThreads + tid];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint32_t key = key_at(w, c);
          if ((key & high_mask) == prefix) atomicAdd(hist + ((key >> shift) & uint32_t(bins - 1)), 1);
        }
      }
    }
    Team::sync();  // every member's histograms are complete (and sm.prefix / sm.rem set)
    const uint32_t prefix = sm.prefix;
    select_digit<kResThreads>(bins, shift, prefix, sm.rem, [&](int bin) {
      int n = 0;
#pragma unroll
      for (int r = 0; r < kCluster; ++r)
#pragma unroll
        for (int c = 0; c < kResHistCopies; ++c) n += *Team::member(sm.hist[c] + bin, r);
      return n;
    }, sm.scratch, &sm.prefix, &sm.rem);
    high_mask |= uint32_t(bins - 1) << shift;
    Team::sync();  // the members are done reading the histograms, and sm is set
    if constexpr (kCluster > 1) {
      const int chosen = static_cast<int>((sm.prefix >> shift) & uint32_t(bins - 1));
      int above = 0;
      for (int i = chosen + 1 + tid; i < bins; i += kResThreads) above += sm.hist[0][i] + sm.hist[1][i];
      int total = 0;
      cta_exclusive_scan<kResWarps>(above, sm.scratch, total);  // its barriers precede the next digit's clearing
      own_above += total;
      if (d == kDigits - 1) own_equal = sm.hist[0][chosen] + sm.hist[1][chosen];
    }
  }
  static_assert(kResHistCopies == 2, "the sums above read both copies");

  const uint32_t t = sm.prefix;
  const int take = sm.rem;
  int placed_above = 0, placed_equal = 0;
  if (kCluster > 1) {
    if (tid == 0) sm.above = own_above, sm.equal = own_equal;
    Team::sync();
    for (int r = 0; r < rank; ++r) {
      placed_above += *Team::member(&sm.above, r);
      placed_equal += *Team::member(&sm.equal, r);
    }
    Team::sync();
  }
  // Placement: thread tid takes the run [tid * run, (tid + 1) * run) of the slice (index order across threads), one
  // bit per key above T and per key equal to T; one CTA prefix sum of the counts gives each thread's places. The run
  // is read starting at piece tid % vectors, so that the threads of a quarter-warp read different banks.
  const uint4* mine = slice4 + tid * vectors;
  uint64_t above = 0, equal = 0;
  const int start = tid % vectors;
#pragma unroll 4
  for (int q = 0; q < vectors; ++q) {
    const int v = q + start < vectors ? q + start : q + start - vectors;
    const uint4 w = mine[v];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t key = key_at(w, c);
      above |= uint64_t(key > t) << (4 * v + c);
      equal |= uint64_t(key == t) << (4 * v + c);
    }
  }
  static_assert(kResMaxRun <= 64, "a run's keys are bits of one 64-bit word");
  static_assert(kResMaxRun * kResThreads < (1 << 16), "a member's counts are packed as two 16-bit halves");
  int total = 0;
  const int excl = cta_exclusive_scan<kResWarps>(__popcll(above) | (__popcll(equal) << 16), sm.scratch, total);
  int n_above = placed_above + (excl & 0xffff), n_equal = placed_equal + (excl >> 16);
  const int64_t run_begin = begin + int64_t(tid) * run;
  for (uint64_t m = above | equal; m != 0; m &= m - 1) {
    const int j = __ffsll(static_cast<long long>(m)) - 1;
    const int32_t index = static_cast<int32_t>(run_begin + j);
    if ((above >> j) & 1u) {
      keys[1 + n_above + (n_equal < take ? n_equal : take)] = index;
      ++n_above;
    } else {
      if (n_equal < take) keys[1 + n_above + n_equal] = index;
      ++n_equal;
    }
  }
  finish_list(L, bh, k, worker, workers);
}

// One launch of `kernel` over units * kCluster CTAs of `threads`, a cluster of kCluster CTAs per unit.
template <int kCluster, class Kernel>
cudaError_t launch_teams(Kernel kernel, const TopKSharedKeyListArgs& args, int64_t units, int threads, size_t smem,
                         cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(units * kCluster));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = kCluster > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args);
}

template <class T, int kCluster>
cudaError_t launch_with_team(const TopKSharedKeyListArgs& args, int64_t units, cudaStream_t stream) {
  return launch_teams<kCluster>(build_topk_shared_key_lists_kernel<T, kCluster>, args, units, kThreads, 0, stream);
}

template <class T, int kCluster>
cudaError_t launch_resident(const TopKSharedKeyListArgs& args, int64_t units, int64_t run, int64_t smem_limit,
                            cudaStream_t stream) {
  auto kernel = build_topk_shared_key_lists_resident_kernel<T, kCluster>;
  // Raised once to what the longest run needs, or the device's whole opt-in where that is less.
  const int64_t most = resident_smem_bytes(kResMaxRun) < smem_limit ? resident_smem_bytes(kResMaxRun) : smem_limit;
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(kernel, static_cast<int>(most), configured); err != cudaSuccess)
    return err;
  return launch_teams<kCluster>(kernel, args, units, kResThreads, static_cast<size_t>(resident_smem_bytes(run)),
                                stream);
}

// How many CTAs a row's team may have on this device: 1 where it does not run the kernel's sm_90 code (thread-block
// clusters; its compute capability and the binary the runtime picked), else its multiprocessor count (the launcher
// fills them once). Asked once per device.
int team_capacity() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  static std::atomic<int> known[64];  // 0 unknown
  if (device < 64 && known[device].load() != 0) return known[device].load();
  cudaFuncAttributes attr;
  int sms = 1;
  const bool clusters = cudaFuncGetAttributes(&attr, build_topk_shared_key_lists_kernel<float, 8>) == cudaSuccess &&
                        attr.binaryVersion >= 90 &&
                        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess;
  const int capacity = clusters && sms > 1 ? sms : 1;
  if (device < 64) known[device].store(capacity);
  return capacity;
}

// The dynamic shared memory a block of the resident kernel may opt in to on this device. Asked once per device.
int64_t resident_smem_limit() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  static std::atomic<int> known[64];  // 0 unknown
  if (device < 64 && known[device].load() != 0) return known[device].load();
  int limit = 0;
  if (cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) limit = 0;
  if (device < 64 && limit > 0) known[device].store(limit);
  return limit;
}

// The launch for scores of type T: the resident kernel with the smallest team whose slices fit in a thread's run and
// in the device's shared memory (teams above 1 only where clusters run), else the streaming one with `team` members.
// A larger resident team than needed only adds cluster barriers and sums over distributed shared memory (NVIDIA H100,
// Nsight Compute, commit c6bccde: 8 rows of 64K keys in teams of 8 took 39 us, 64 rows of 64K in teams of 2 30 us,
// 64 rows of 8K in teams of 1 11 us).
template <class T>
cudaError_t launch_for_type(const TopKSharedKeyListArgs& args, int64_t units, int team, int max_team,
                            cudaStream_t stream) {
  const int64_t smem_limit = resident_smem_limit();
  for (int t = 1; t <= max_team; t *= 2) {
    const int64_t run = resident_run(args.lists.cols, t);
    if (run > kResMaxRun || resident_smem_bytes(run) > smem_limit) continue;
    switch (t) {
      case 8: return launch_resident<T, 8>(args, units, run, smem_limit, stream);
      case 4: return launch_resident<T, 4>(args, units, run, smem_limit, stream);
      case 2: return launch_resident<T, 2>(args, units, run, smem_limit, stream);
      default: return launch_resident<T, 1>(args, units, run, smem_limit, stream);
    }
  }
  switch (team) {
    case 8: return launch_with_team<T, 8>(args, units, stream);
    case 4: return launch_with_team<T, 4>(args, units, stream);
    case 2: return launch_with_team<T, 2>(args, units, stream);
    default: return launch_with_team<T, 1>(args, units, stream);
  }
}

}  // namespace

cudaError_t launch_build_topk_shared_key_lists(const TopKSharedKeyListArgs& args, cudaStream_t stream) {
  const KeyListArgs& L = args.lists;
  if (!L.capacity_ok() || L.rows != 1 || args.k < 1 || args.k >= L.cols || L.capacity < args.k ||
      L.cols > INT_MAX || L.units() > INT_MAX || args.bounds.key_segments != nullptr)
    return cudaErrorInvalidValue;
  const int64_t units = L.units();
  if (units == 0) return cudaSuccess;
  // Members per row: a team's barriers and shared-memory sums cost about as much as a few steps of keys, so a row
  // gets more members only while the teams still fit on the multiprocessors at once, one CTA each, and each member
  // keeps at least two steps; at most 8 (the portable cluster size). (Counting two CTAs a multiprocessor took teams
  // of 4 for 64 rows of 64K keys on an H200 and doubled the kernel's time, 39 -> 77 us: clusters are placed per GPC,
  // and not all 64 clusters of 4 were resident at once.)
  const int64_t steps = (L.cols + kStep - 1) / kStep;
  const int64_t sms = units < INT_MAX / 8 ? team_capacity() : 1;
  const auto fits = [&](int team) { return steps >= 2 * team && units * team <= sms; };
  const int team = fits(8) ? 8 : (fits(4) ? 4 : (fits(2) ? 2 : 1));
  const int max_team = team_capacity() > 1 ? 8 : 1;
  switch (args.scores_dtype) {
    case DType::kF32: return launch_for_type<float>(args, units, team, max_team, stream);
    case DType::kBF16: return launch_for_type<__nv_bfloat16>(args, units, team, max_team, stream);
    case DType::kF16: return launch_for_type<__half>(args, units, team, max_team, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dmattn
