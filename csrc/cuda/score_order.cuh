// How the TopKMask builders rank scores (topk_shared_key_lists.cu, topk_bounded_key_lists.cu): as order-preserving
// uint32 keys selected by a radix select over three digits; the shared-list builder ranks 16-bit scores by 16-bit
// keys over two digits.
#pragma once
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>

#include "cuda/cta_scan.cuh"

namespace dmattn {

// The order-preserving image of a score: a larger key is a better score (canonical scores hold no NaN or -0.0).
__device__ __forceinline__ uint32_t order_key(float s) {
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// order_key of the score's canonical form (NaN and -inf rank as the lowest finite float, -0.0 as 0.0): the same key
// for a canonical score, and one no canonical score maps below. Never 0, which the builders use for "no key".
__device__ __forceinline__ uint32_t canonical_order_key(float s) {
  uint32_t u = __float_as_uint(s);
  u = s > -3.40282347e+38f ? u : 0xff7fffffu;  // NaN and -inf compare false
  u = s == 0.f ? 0u : u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The radix select's digits, most significant first: bits [21, 32), [10, 21), [0, 10).
constexpr int kSelectDigits = 3;
constexpr int kSelectMaxBins = 2048;
__device__ __forceinline__ int digit_shift(int d) { return d == 0 ? 21 : (d == 1 ? 10 : 0); }
__device__ __forceinline__ int digit_bins(int d) { return d == 2 ? 1024 : 2048; }

// canonical_order_key for the bits of a 16-bit score (bf16 where kBF16, else f16), in 16 bits: NaN and -inf take
// -inf's key, below every finite score's (as the lowest finite float ranks below every 16-bit one), -0.0 takes
// 0.0's. Never 0. Keys of two scores compare as canonical_order_key of their floats do.
template <bool kBF16>
__device__ __forceinline__ uint32_t canonical_order_key16(uint32_t bits) {
  constexpr uint32_t kNegInf = kBF16 ? 0xff80u : 0xfc00u;
  const uint32_t mag = bits & 0x7fffu;
  bits = mag > (kNegInf & 0x7fffu) || bits == kNegInf ? kNegInf : (mag == 0u ? 0u : bits);
  return (bits & 0x8000u) ? (~bits & 0xffffu) : (bits | 0x8000u);
}

// How a select over scores of type T ranks them: float32 scores by canonical_order_key over the three digits above,
// 16-bit ones by canonical_order_key16 over two (bits [5, 16) and [0, 5)).
template <class T>
struct ScoreKeys {
  static constexpr bool kHalf = sizeof(T) == 2;
  static constexpr int kDigits = kHalf ? 2 : kSelectDigits;
  __device__ __forceinline__ static int shift(int d) { return kHalf ? (d == 0 ? 5 : 0) : digit_shift(d); }
  __device__ __forceinline__ static int bins(int d) { return kHalf ? (d == 0 ? 2048 : 32) : digit_bins(d); }
  // The order key of a score's bits as stored (float32: 32 bits; 16-bit: 16, zero-extended); never 0.
  __device__ __forceinline__ static uint32_t of(uint32_t bits) {
    if constexpr (kHalf) return canonical_order_key16<std::is_same_v<T, __nv_bfloat16>>(bits);
    else return canonical_order_key(__uint_as_float(bits));
  }
};

// One digit of the radix select over a CTA of kThreads threads: count(b) is how many of the keys that match the
// digits chosen so far (`prefix`) fall in bin b of this digit (bits from `shift`), and `rem` of them are still to be
// taken. Walking the bins from the top, the bin where the running count reaches rem holds the k-th largest key: the
// one thread that finds it writes the extended prefix and what is left to take to *prefix_out and *rem_out. Returns
// the matching keys' total (the same on every thread). `scratch` holds kThreads / 32 + 1 ints.
template <int kThreads, class Count>
__device__ __forceinline__ int select_digit(int bins, int shift, uint32_t prefix, int rem, Count&& count, int* scratch,
                                            uint32_t* prefix_out, int* rem_out) {
  constexpr int kPer = kSelectMaxBins / kThreads;
  static_assert(kPer * kThreads == kSelectMaxBins, "each thread scans whole bins");
  int c[kPer], mine = 0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int b = bins - 1 - kPer * int(threadIdx.x) - q;
    c[q] = b >= 0 ? count(b) : 0;
    mine += c[q];
  }
  int total = 0;
  int before = cta_exclusive_scan<kThreads / 32>(mine, scratch, total);
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    if (before < rem && before + c[q] >= rem) {
      *prefix_out = prefix | (uint32_t(bins - 1 - kPer * int(threadIdx.x) - q) << shift);
      *rem_out = rem - before;
    }
    before += c[q];
  }
  return total;
}

}  // namespace dmattn
