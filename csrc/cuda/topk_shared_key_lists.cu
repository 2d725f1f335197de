#include "cuda/topk_shared_key_lists.h"

#include <climits>
#include <cstdint>

#include "cuda/cta_scan.cuh"

namespace dmattn {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Four 16-byte loads in flight per thread and step: one step covers 8192 keys, so a pass over 64K keys is eight
// steps of overlapped loads rather than 32 dependent ones.
constexpr int kVectors = 4;
constexpr int kPerThread = 4 * kVectors;
constexpr int kStep = kThreads * kPerThread;
// Three digits, most significant first: bits [21, 32), [10, 21), [0, 10).
constexpr int kDigits = 3;
constexpr int kMaxBins = 2048;
constexpr int kBinsPerThread = kMaxBins / kThreads;
static_assert(kBinsPerThread * kThreads == kMaxBins, "each thread scans whole bins");
static_assert(kStep < (1 << 16), "a step's counts are packed as two 16-bit halves");

__device__ __forceinline__ int digit_shift(int d) { return d == 0 ? 21 : (d == 1 ? 10 : 0); }
__device__ __forceinline__ int digit_bins(int d) { return d == 2 ? 1024 : 2048; }

// The order-preserving image of a score: a larger key is a better score (canonical scores hold no NaN or -0.0).
__device__ __forceinline__ uint32_t order_key(float s) {
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// This thread's kPerThread scores of the step starting at `base` (key indices base + tid * kPerThread + i), raw,
// with a bit per valid entry. Vector loads when the row allows them. Nothing here uses the loaded values, so the
// loads stay in flight until the caller reads them.
__device__ __forceinline__ uint32_t load_step(const float* row, int lk, bool vec, int64_t base,
                                              float (&x)[kPerThread]) {
  const int64_t j0 = base + int64_t(threadIdx.x) * kPerThread;
  if (vec && j0 + kPerThread <= lk) {
#pragma unroll
    for (int i = 0; i < kVectors; ++i) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(row + j0) + i);
      x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
    }
    return (1u << kPerThread) - 1;
  }
  uint32_t valid = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const bool in = j0 + i < lk;
    x[i] = in ? __ldg(row + j0 + i) : 0.f;
    valid |= in ? (1u << i) : 0u;
  }
  return valid;
}

// f(base, valid, scores) over the row's steps in order, while the next step's loads are in flight (two register
// buffers in turn: a copy from one to the other would wait for the loads). f returns false to stop; it must return
// the same on every thread of the CTA.
template <class F>
__device__ __forceinline__ void for_each_step(const float* row, int lk, bool vec, F&& f) {
  float a[kPerThread], b[kPerThread];
  uint32_t valid_a = load_step(row, lk, vec, 0, a), valid_b = 0;
  for (int64_t base = 0;;) {
    if (base + kStep < lk) valid_b = load_step(row, lk, vec, base + kStep, b);
    if (!f(base, valid_a, a) || (base += kStep) >= lk) return;
    if (base + kStep < lk) valid_a = load_step(row, lk, vec, base + kStep, a);
    if (!f(base, valid_b, b) || (base += kStep) >= lk) return;
  }
}

struct Smem {
  int hist[kMaxBins];
  int scratch[kWarps + 1];
  uint32_t prefix;  // the digits chosen so far, in place
  int rem;          // how many of the keys matching `prefix` are still to be taken
};

// One CTA per (b, h); the header gives the algorithm.
__global__ void __launch_bounds__(kThreads, 1) build_topk_shared_key_lists_kernel(TopKSharedKeyListArgs args) {
  __shared__ Smem sm;
  const KeyListArgs& L = args.lists;
  const int k = static_cast<int>(args.k);
  const int lk = static_cast<int>(L.cols);
  const int64_t bh = blockIdx.x;
  const float* row = args.scores + bh * lk;
  const bool vec = lk % 4 == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0;
  const int tid = threadIdx.x;

  if (tid == 0) sm.prefix = 0, sm.rem = k;
  uint32_t high_mask = 0;  // the bits of the digits chosen so far
#pragma unroll 1
  for (int d = 0; d < kDigits; ++d) {
    const int shift = digit_shift(d), bins = digit_bins(d);
    for (int i = tid; i < bins; i += kThreads) sm.hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = sm.prefix;
    for_each_step(row, lk, vec, [&](int64_t, uint32_t valid, const float (&x)[kPerThread]) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const uint32_t key = order_key(x[i]);
        if (((valid >> i) & 1u) && (key & high_mask) == prefix)
          atomicAdd(sm.hist + ((key >> shift) & uint32_t(bins - 1)), 1);
      }
      return true;
    });
    __syncthreads();
    // Walk the bins from the top: thread t sums bins bins-1-4t .. bins-4-4t; the bin where the running count
    // reaches rem holds the k-th largest key.
    const int rem = sm.rem;
    int c[kBinsPerThread], mine = 0;
#pragma unroll
    for (int q = 0; q < kBinsPerThread; ++q) {
      const int b = bins - 1 - kBinsPerThread * tid - q;
      c[q] = b >= 0 ? sm.hist[b] : 0;
      mine += c[q];
    }
    int total = 0;
    int before = cta_exclusive_scan<kWarps>(mine, sm.scratch, total);
#pragma unroll
    for (int q = 0; q < kBinsPerThread; ++q) {
      if (before < rem && before + c[q] >= rem) {
        const uint32_t b = uint32_t(bins - 1 - kBinsPerThread * tid - q);
        sm.prefix = prefix | (b << shift);
        sm.rem = rem - before;
      }
      before += c[q];
    }
    high_mask |= uint32_t(bins - 1) << shift;
    __syncthreads();
  }

  // T = sm.prefix, the k-th largest key; take = how many keys equal to T are kept (the lowest indices).
  const uint32_t t = sm.prefix;
  const int take = sm.rem;
  int32_t* keys = L.keys + bh * L.keys_stride();
  int placed_above = 0, placed_equal = 0;  // uniform: the kept keys before this step, by kind
  for_each_step(row, lk, vec, [&](int64_t base, uint32_t valid, const float (&x)[kPerThread]) {
    uint32_t above = 0, equal = 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const uint32_t key = order_key(x[i]);
      above |= ((valid >> i) & 1u) && key > t ? (1u << i) : 0u;
      equal |= ((valid >> i) & 1u) && key == t ? (1u << i) : 0u;
    }
    int step_total = 0;
    const int excl = cta_exclusive_scan<kWarps>(__popc(above) | (__popc(equal) << 16), sm.scratch, step_total);
    int n_above = placed_above + (excl & 0xffff), n_equal = placed_equal + (excl >> 16);
    const int64_t j0 = base + int64_t(tid) * kPerThread;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      // A key's place in the list: the kept keys before it, i.e. all keys above T and the first `take` equal.
      if ((above >> i) & 1u) {
        keys[1 + n_above + (n_equal < take ? n_equal : take)] = static_cast<int32_t>(j0 + i);
        ++n_above;
      } else if ((equal >> i) & 1u) {
        if (n_equal < take) keys[1 + n_above + n_equal] = static_cast<int32_t>(j0 + i);
        ++n_equal;
      }
    }
    placed_above += step_total & 0xffff, placed_equal += step_total >> 16;
    return placed_above + (placed_equal < take ? placed_equal : take) < k;
  });

  if (tid == 0) keys[0] = k;
  for (int64_t i = k + tid; i < L.capacity; i += kThreads) keys[1 + i] = 0;
  // One row per unit: the first k bits of the words.
  uint64_t* bits = L.bits + bh * L.chunks();
  for (int64_t c = tid; c < L.chunks(); c += kThreads) {
    const int64_t n = k - c * kKeyListChunk;
    bits[c] = n >= kKeyListChunk ? ~uint64_t(0) : (n > 0 ? (uint64_t(1) << n) - 1 : uint64_t(0));
  }
}

}  // namespace

cudaError_t launch_build_topk_shared_key_lists(const TopKSharedKeyListArgs& args, cudaStream_t stream) {
  const KeyListArgs& L = args.lists;
  if (!L.capacity_ok() || L.rows != 1 || args.k < 1 || args.k >= L.cols || L.capacity < args.k ||
      L.cols > INT_MAX || L.units() > INT_MAX)
    return cudaErrorInvalidValue;
  const int64_t units = L.units();
  if (units == 0) return cudaSuccess;
  build_topk_shared_key_lists_kernel<<<static_cast<unsigned>(units), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace dmattn
