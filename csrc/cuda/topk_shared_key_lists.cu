#include "cuda/topk_shared_key_lists.h"

#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/cta_scan.cuh"
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
constexpr int kMaxBins = kSelectMaxBins;
static_assert(kStep < (1 << 16), "a step's counts are packed as two 16-bit halves");

// The key of entry e of this thread's scores in the step starting at `base`: entry 4 i + c is key
// base + (i * kThreads + tid) * 4 + c.
__device__ __forceinline__ int64_t key_of(int64_t base, int e) {
  return base + (int64_t(e / 4) * kThreads + threadIdx.x) * 4 + e % 4;
}

// Four scores of type T at row + j0 as their bits (a 16-bit score's in the low half), by one vector load: 16 bytes
// of float, 8 bytes of a 16-bit type. The caller checks that the piece lies in the row and is aligned.
template <class T>
__device__ __forceinline__ void load_four(const T* row, int64_t j0, uint32_t* x) {
  if constexpr (std::is_same_v<T, float>) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + j0));
    x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
  } else {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + j0));
    x[0] = v.x & 0xffffu, x[1] = v.x >> 16, x[2] = v.y & 0xffffu, x[3] = v.y >> 16;
  }
}
template <class T>
__device__ __forceinline__ uint32_t load_one(const T* row, int64_t j) {
  if constexpr (std::is_same_v<T, float>) return __ldg(reinterpret_cast<const uint32_t*>(row) + j);
  else return __ldg(reinterpret_cast<const uint16_t*>(row) + j);
}
// Whether a row of T allows the vector loads of load_four (each piece of four keys from a multiple of 4).
template <class T>
__device__ __forceinline__ bool vector_row(const T* row, int lk) {
  return lk % 4 == 0 && reinterpret_cast<uintptr_t>(row) % (4 * sizeof(T)) == 0;
}

// Keys [j0, j0 + 4) of the row as bits, with a bit per key inside [lo, end), by one vector load where the
// whole piece lies in the range and the row allows it. Nothing here uses the loaded values, so the loads stay in
// flight until the caller reads them.
struct Piece {
  uint32_t x[4];
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
      p.x[c] = in ? load_one(row, j0 + c) : 0u;
      p.valid |= in ? (1u << c) : 0u;
    }
  }
  return p;
}
// This thread's kPerThread scores of the step starting at `base`, as bits, with a bit per entry whose key lies in
// [lo, end): one piece of four per vector load.
template <class T>
__device__ __forceinline__ uint32_t load_step(const T* row, int lo, int end, bool vec, int64_t base,
                                              uint32_t (&x)[kPerThread]) {
  uint32_t valid = 0;
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const Piece p = load_piece(row, key_of(base, 4 * i), lo, end, vec);
#pragma unroll
    for (int c = 0; c < 4; ++c) x[4 * i + c] = p.x[c];
    valid |= p.valid << (4 * i);
  }
  return valid;
}

// f(base, valid, scores) over the steps from `begin` (a multiple of 4) below `end`, the keys of [lo, end) valid, in
// order, while the next step's loads are in flight (two register buffers in turn: a copy from one to the other
// would wait for the loads). f returns false to stop; it must return the same on every thread of the CTA.
template <class T, class F>
__device__ __forceinline__ void for_each_step(const T* row, int64_t begin, int lo, int end, bool vec, F&& f) {
  if (begin >= end) return;
  uint32_t a[kPerThread], b[kPerThread];
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

// The row of team bh: its scores, whether they allow vector loads, the keys it may keep ([lo, hi) of its batch
// element's bounds, else all), its list's count k and entries.
template <class T>
struct ScoreRow {
  const T* scores;
  bool vec;
  int lo, hi, k;
  int32_t* keys;
};
template <class T>
__device__ __forceinline__ ScoreRow<T> score_row(const TopKSharedKeyListArgs& args, int64_t bh) {
  const KeyListArgs& L = args.lists;
  const int lk = static_cast<int>(L.cols);
  const int64_t b = bh / L.heads;
  ScoreRow<T> r;
  r.scores = static_cast<const T*>(args.scores) + b * args.scores_batch_stride + (bh % L.heads) * lk;
  r.vec = vector_row(r.scores, lk);
  r.lo = 0, r.hi = lk;
  if (args.bounds.present()) {
    r.hi = min(max(args.bounds.hi(b, 0), 0), lk);
    r.lo = min(max(args.bounds.lo(b, 0), 0), r.hi);
  }
  r.k = static_cast<int>(args.k < r.hi - r.lo ? args.k : r.hi - r.lo);
  r.keys = L.keys + bh * L.keys_stride();
  return r;
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
  using Score = ScoreKeys<T>;
  __shared__ Smem sm;
  const KeyListArgs& L = args.lists;
  const int64_t bh = blockIdx.x / kCluster;
  const int rank = Team::rank();
  const ScoreRow<T> sr = score_row<T>(args, bh);
  const T* row = sr.scores;
  const bool vec = sr.vec;
  const int lo = sr.lo, hi = sr.hi, k = sr.k;
  int32_t* keys = sr.keys;
  const int tid = threadIdx.x;
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
  // The digit count made opaque: with two digits (16-bit scores) known, ptxas spilled 60-272 bytes of the teams'
  // instantiations at their 64-register bound (sm_90a); the loop stays a loop either way.
  int digits = Score::kDigits;
  asm volatile("" : "+r"(digits));
#pragma unroll 1
  for (int d = 0; d < digits; ++d) {
    const int shift = Score::shift(d), bins = Score::bins(d);
    for (int i = tid; i < bins; i += kThreads) sm.hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = sm.prefix;
    for_each_step(row, begin, lo, end, vec, [&](int64_t, uint32_t valid, const uint32_t (&x)[kPerThread]) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const uint32_t key = ScoreKeys<T>::of(x[i]);
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
      if (d == digits - 1) own_equal = sm.hist[chosen];
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
  for_each_step(row, begin, lo, end, vec, [&](int64_t base, uint32_t valid, const uint32_t (&x)[kPerThread]) {
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      uint32_t above = 0, equal = 0;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = 4 * v + c;
        const uint32_t key = ScoreKeys<T>::of(x[i]);
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
// shared memory. A slice of at most ResidentKeys<T>::kMaxRun keys a thread (1024 threads) runs here when it fits the
// device's shared memory; longer rows take the streaming kernel above.
constexpr int kResThreads = 1024;
constexpr int kResWarps = kResThreads / 32;
constexpr int kResHistCopies = 2;    // warps of even and odd index count into their own copy (half the contention)
constexpr int kResLoadBatch = 4;     // pieces of four scores a thread has in flight while loading its slice

// Histograms in two buffers, digit d counting into buffer d % 2: a member clears the next digit's buffer while the
// other members may still read this digit's, so one cluster barrier a digit orders them (the one before its select).
struct ResidentSmem {
  int hist[2][kResHistCopies][kMaxBins];
  long long scratch[kResWarps + 1];
  uint32_t prefix;
  int rem;
  int above, equal;  // this member's keys above and equal to T, for the other members of the team
};
// The slice's keys follow the struct, 16-byte aligned.
constexpr int kResSliceOffset = (sizeof(ResidentSmem) + 15) / 16 * 16;

// How a slice holds the order keys of scores of type T: four keys a piece (uint4 of 32-bit keys, uint2 of 16-bit
// ones for 16-bit scores), at most kMaxRun keys a thread. The placement holds a thread's run as two 64-bit masks;
// 48 32-bit keys a thread take 192 KiB, 64 16-bit ones 128 KiB (rows of 384K and 512K keys in teams of 8).
template <class T>
struct ResidentKeys {
  static constexpr bool kHalf = ScoreKeys<T>::kHalf;
  using Vec = std::conditional_t<kHalf, uint2, uint4>;
  static constexpr int kBytes = kHalf ? 2 : 4;
  static constexpr int kMaxRun = kHalf ? 64 : 48;
  static_assert(kMaxRun <= 64, "a run's keys are bits of one 64-bit word");
  // The piece's order keys, 0 for a key outside the range (below every key).
  __device__ __forceinline__ static Vec pack(const Piece& p) {
    uint32_t k[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) k[c] = (p.valid >> c) & 1u ? ScoreKeys<T>::of(p.x[c]) : 0u;
    if constexpr (kHalf) return make_uint2(k[0] | (k[1] << 16), k[2] | (k[3] << 16));
    else return make_uint4(k[0], k[1], k[2], k[3]);
  }
  __device__ __forceinline__ static uint32_t key(const Vec& w, int c) {
    if constexpr (kHalf) return ((c < 2 ? w.x : w.y) >> (16 * (c & 1))) & 0xffffu;
    else return c == 0 ? w.x : (c == 1 ? w.y : (c == 2 ? w.z : w.w));
  }
};

__host__ __device__ constexpr int64_t resident_run(int64_t span, int team) {
  return ((span + int64_t(team) * kResThreads - 1) / (int64_t(team) * kResThreads) + 3) / 4 * 4;
}
__host__ __device__ constexpr int64_t resident_smem_bytes(int64_t run, int key_bytes) {
  return kResSliceOffset + run * kResThreads * key_bytes;
}

template <class T, int kCluster>
__global__ void __launch_bounds__(kResThreads, 1) build_topk_shared_key_lists_resident_kernel(TopKSharedKeyListArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if constexpr (kCluster > 1) __trap();  // the launcher picks clusters only for sm_90 code
#endif
  using Team = RowTeam<kCluster>;
  using Score = ScoreKeys<T>;
  using Keys = ResidentKeys<T>;
  using Vec = typename Keys::Vec;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ResidentSmem& sm = *reinterpret_cast<ResidentSmem*>(smem_raw);
  Vec* slice = reinterpret_cast<Vec*>(smem_raw + kResSliceOffset);
  const KeyListArgs& L = args.lists;
  const int64_t bh = blockIdx.x / kCluster;
  const int rank = Team::rank();
  const ScoreRow<T> sr = score_row<T>(args, bh);
  const T* row = sr.scores;
  const bool vec = sr.vec;
  const int lo = sr.lo, hi = sr.hi, k = sr.k;
  int32_t* keys = sr.keys;
  const int tid = threadIdx.x;
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

  for (int i = tid; i < 2 * kResHistCopies * kMaxBins; i += kResThreads) (&sm.hist[0][0][0])[i] = 0;
  if (tid == 0) sm.prefix = 0, sm.rem = k, sm.above = 0, sm.equal = 0;
  __syncthreads();
  // Piece v of this thread: keys begin + 4 (v * kResThreads + tid) + [0, 4), so each warp-wide load reads whole
  // sectors and each store fills whole banks. The first digit's histogram is built from the registers.
  const int copy = (tid >> 5) & (kResHistCopies - 1);
  int* hist = sm.hist[0][copy];
#pragma unroll 1
  for (int v0 = 0; v0 < vectors; v0 += kResLoadBatch) {
    Piece p[kResLoadBatch];
#pragma unroll
    for (int i = 0; i < kResLoadBatch; ++i)
      if (v0 + i < vectors) p[i] = load_piece(row, begin + 4 * (int64_t(v0 + i) * kResThreads + tid), lo, end, vec);
#pragma unroll
    for (int i = 0; i < kResLoadBatch; ++i) {
      if (v0 + i >= vectors) break;
      const Vec w = Keys::pack(p[i]);
      slice[(v0 + i) * kResThreads + tid] = w;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t key = Keys::key(w, c);
        if (key != 0u) atomicAdd(hist + (key >> Score::shift(0)), 1);
      }
    }
  }

  // The digits. Thread tid reads bins (bins - 2 - 2 tid, bins - 1 - 2 tid) of every member (one 8-byte read per member
  // and copy) and of its own histograms; one prefix sum from the top bin down of (team count, own count), packed in
  // 64 bits, finds the bin where the team's count reaches rem, and the member's own keys above it (the bins before
  // it in that order), which give its place in the list after the last digit.
  static_assert(kResHistCopies == 2 && kResThreads * 2 == kMaxBins, "each thread selects over two bins");
  uint32_t high_mask = 0;
#pragma unroll 1
  for (int d = 0; d < Score::kDigits; ++d) {
    const int shift = Score::shift(d), bins = Score::bins(d);
    int (*buf)[kMaxBins] = sm.hist[d & 1];
    Team::sync();  // every member's histograms of digit d are complete, and every member is past digit d - 1
    const uint32_t prefix = sm.prefix;
    const int rem = sm.rem;
    const int b1 = bins - 2 - 2 * tid;  // this thread's bins b1 + 1 (first from the top) and b1
    int team[2] = {0, 0}, own[2] = {0, 0};
    if (b1 >= 0) {
#pragma unroll
      for (int r = 0; r < kCluster; ++r)
#pragma unroll
        for (int c = 0; c < kResHistCopies; ++c) {
          const int2 x = *reinterpret_cast<const int2*>(Team::member(buf[c] + b1, r));
          team[0] += x.y, team[1] += x.x;
        }
#pragma unroll
      for (int c = 0; c < kResHistCopies; ++c) own[0] += buf[c][b1 + 1], own[1] += buf[c][b1];
    }
    long long total = 0;
    const long long before = cta_exclusive_scan<kResWarps>(
        (static_cast<long long>(team[0] + team[1]) << 32) | static_cast<long long>(own[0] + own[1]), sm.scratch,
        total);
    int team_before = static_cast<int>(before >> 32), own_before = static_cast<int>(before & 0xffffffffll);
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      if (team_before < rem && team_before + team[q] >= rem) {  // one thread of the CTA
        sm.prefix = prefix | (uint32_t(b1 + 1 - q) << shift);
        sm.rem = rem - team_before;
        sm.above += own_before;
        if (d == Score::kDigits - 1) sm.equal = own[q];
      }
      team_before += team[q], own_before += own[q];
    }
    high_mask |= uint32_t(bins - 1) << shift;
    if (d + 1 < Score::kDigits) {
      // The next digit's buffer last held digit d - 1, which every member has read (the barrier above).
      for (int i = tid; i < kResHistCopies * kMaxBins; i += kResThreads) (&sm.hist[(d + 1) & 1][0][0])[i] = 0;
      __syncthreads();  // cleared, and sm.prefix / sm.rem set
      const uint32_t next_prefix = sm.prefix;
      const int next_shift = Score::shift(d + 1), next_bins = Score::bins(d + 1);
      int* next_hist = sm.hist[(d + 1) & 1][copy];
#pragma unroll 4
      for (int v = 0; v < vectors; ++v) {
        const Vec w = slice[v * kResThreads + tid];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint32_t key = Keys::key(w, c);
          if ((key & high_mask) == next_prefix)
            atomicAdd(next_hist + ((key >> next_shift) & uint32_t(next_bins - 1)), 1);
        }
      }
    }
  }
  __syncthreads();  // the last digit's T, take and this member's counts are set

  const uint32_t t = sm.prefix;
  const int take = sm.rem;
  int placed_above = 0, placed_equal = 0;
  if (kCluster > 1) {
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
  const Vec* mine = slice + tid * vectors;
  uint64_t above = 0, equal = 0;
  const int start = tid % vectors;
#pragma unroll 4
  for (int q = 0; q < vectors; ++q) {
    const int v = q + start < vectors ? q + start : q + start - vectors;
    const Vec w = mine[v];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t key = Keys::key(w, c);
      above |= uint64_t(key > t) << (4 * v + c);
      equal |= uint64_t(key == t) << (4 * v + c);
    }
  }
  long long total = 0;
  const long long excl = cta_exclusive_scan<kResWarps>(
      (static_cast<long long>(__popcll(above)) << 32) | static_cast<long long>(__popcll(equal)), sm.scratch, total);
  int n_above = placed_above + static_cast<int>(excl >> 32);
  int n_equal = placed_equal + static_cast<int>(excl & 0xffffffffll);
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
  using Keys = ResidentKeys<T>;
  const int64_t longest = resident_smem_bytes(Keys::kMaxRun, Keys::kBytes);
  const int64_t most = longest < smem_limit ? longest : smem_limit;
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(kernel, static_cast<int>(most), configured); err != cudaSuccess)
    return err;
  return launch_teams<kCluster>(kernel, args, units, kResThreads,
                                static_cast<size_t>(resident_smem_bytes(run, Keys::kBytes)), stream);
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

// The launch for scores of type T: the resident kernel with the smallest team whose runs hold at most
// kResTargetRun keys a thread, else the smallest whose slices fit in a thread's run and in the device's shared memory
// (teams above 1 only where clusters run); else the streaming one with `team` members. Longer runs leave a member
// too long a serial pass, more members add cluster barriers and sums over distributed shared memory (NVIDIA H100,
// Nsight Compute, 2026-12-07, us, float32 / bfloat16 scores, the smallest team that fits against teams of at least
// 2: 64 rows of 64K keys 25.7 / 32.5 (teams of 2 / 1, runs of 32 / 64) against 25.7 / 23.2 (2 / 2); 8 rows of 32K
// 18.8 / 20.1 (1 / 1, runs of 32) against 17.6 / 16.9 (2 / 2); 64 rows of 8K 11.7 / 10.8 (1 / 1, runs of 8) against
// 14.4 / 12.2).
constexpr int kResTargetRun = 32;
template <class T>
cudaError_t launch_for_type(const TopKSharedKeyListArgs& args, int64_t units, int team, int max_team,
                            cudaStream_t stream) {
  using Keys = ResidentKeys<T>;
  const int64_t smem_limit = resident_smem_limit();
  for (const int longest_run : {kResTargetRun, Keys::kMaxRun}) {
    for (int t = 1; t <= max_team; t *= 2) {
      const int64_t run = resident_run(args.lists.cols, t);
      if (run > longest_run || resident_smem_bytes(run, Keys::kBytes) > smem_limit) continue;
      switch (t) {
        case 8: return launch_resident<T, 8>(args, units, run, smem_limit, stream);
        case 4: return launch_resident<T, 4>(args, units, run, smem_limit, stream);
        case 2: return launch_resident<T, 2>(args, units, run, smem_limit, stream);
        default: return launch_resident<T, 1>(args, units, run, smem_limit, stream);
      }
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
