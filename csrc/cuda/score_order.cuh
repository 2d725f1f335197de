// How the TopKMask builders rank scores (topk_shared_key_lists.cu, topk_bounded_key_lists.cu): as order-preserving
// uint32 keys, selected by a radix select over three digits.
#pragma once
#include <cstdint>

namespace dmattn {

// The order-preserving image of a score: a larger key is a better score (canonical scores hold no NaN or -0.0).
__device__ __forceinline__ uint32_t order_key(float s) {
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The radix select's digits, most significant first: bits [21, 32), [10, 21), [0, 10).
constexpr int kSelectDigits = 3;
constexpr int kSelectMaxBins = 2048;
__device__ __forceinline__ int digit_shift(int d) { return d == 0 ? 21 : (d == 1 ? 10 : 0); }
__device__ __forceinline__ int digit_bins(int d) { return d == 2 ? 1024 : 2048; }

}  // namespace dmattn
