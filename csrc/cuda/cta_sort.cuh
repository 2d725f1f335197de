// The CTA-wide bitonic sort of the TopKMask list builders (topk_key_lists.cu, topk_bounded_key_lists.cu): they sort
// at most a few thousand keys of one unit in shared memory.
#pragma once
#include <cstdint>

namespace dmattn {

__host__ __device__ constexpr int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Ascending sort of a[0, n) over a CTA of kThreads threads; a has room for pow2_at_least(n) elements, and the
// padding takes `pad` (it sorts last when it is the type's largest value).
template <int kThreads, class T>
__device__ void cta_bitonic_sort(T* a, int n, T pad) {
  const int padded = static_cast<int>(pow2_at_least(n));
  for (int i = n + threadIdx.x; i < padded; i += kThreads) a[i] = pad;
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < padded / 2; i += kThreads) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool up = (lo & size) == 0;
        const T x = a[lo], y = a[hi];
        if ((x > y) == up) a[lo] = y, a[hi] = x;
      }
      __syncthreads();
    }
  }
}

}  // namespace dmattn
