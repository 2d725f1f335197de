// The CTA-wide prefix sum of the key-list builders (key_lists.cu, topk_key_lists.cu): they place each thread's live
// keys in a unit's list by it.
#pragma once

namespace dmattn {

// Exclusive prefix sum of `x` (int, or a 64-bit integer holding two packed counts) over a CTA of kWarps full warps;
// `total` gets the CTA sum. `scratch` holds kWarps + 1 values of T.
template <int kWarps, class T>
__device__ __forceinline__ T cta_exclusive_scan(T x, T* scratch, T& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T incl = x;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T w = lane < kWarps ? scratch[lane] : T(0);
#pragma unroll
    for (int d = 1; d < kWarps; d <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += y;
    }
    if (lane < kWarps) scratch[lane] = w;  // inclusive warp totals
  }
  __syncthreads();
  const T warp_base = warp == 0 ? T(0) : scratch[warp - 1];
  total = scratch[kWarps - 1];
  __syncthreads();  // scratch is reused by the next call
  return warp_base + incl - x;
}

}  // namespace dmattn
