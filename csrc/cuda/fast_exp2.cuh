// exp2 for the kernels' softmax weights: the MUFU unit's ex2.approx with results below 2^-126 flushed to zero.
// exp2f compiles to the same MUFU.EX2 plus a range test and two predicated scalings per call, which keep such results
// denormal; a weight that small changes no sum it joins (the row's largest weight is at least 1), and the extra
// instructions were about a third of the per-score work of the softmax loops (ptxas, sm_90a).
// exp2_ftz(-inf) = +0, exp2_ftz(+inf) = +inf, NaN stays NaN, as with exp2f.
#pragma once

namespace dmattn {

// The online softmax of the forwards keeps a row's reference (the max it subtracts) until a tile's max exceeds it by
// more than this many powers of two (FlashAttention-4's lazy rescaling): weights then reach 2^8 at most, far inside
// the range of fp32 sums and of P in 16 bits, and most tiles skip the rescale of the output accumulator.
constexpr float kRescaleSlackLog2 = 8.f;

__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace dmattn
