// Fixed-point accumulation of the key-list backward's deterministic mode (docs/cuda_backward.md, "Deterministic
// key-list path"). Device code only, no CuTe: included by the key-list kernel (flash_bwd_key_list_kernel.cuh) and
// by its launch sequence (flash_bwd_key_list_dispatch.cu).
//
// dK, dV and dbias are sums of fp32 partials that CTAs add in a scheduling-dependent order. In this mode each
// partial x is turned into an int64 count of a per-call, per-tensor resolution res = 2^e,
// n = rint(x * 2^-e) (the scaling by a power of two is exact in fp32), and the counts are added with 64-bit
// integer atomics. Integer addition is associative, so the sums (and the outputs n * 2^e) do not depend on the
// order: bitwise reproducible. e is chosen from rigorous bounds on the magnitude of any sum (fixed_exponents),
// computed from the maxima of |q|, |v|, |dout| and |delta| that a small kernel gathers first (stats words).
#pragma once

#include <cstdint>

#include "cuda/flash_bwd_key_list.h"

namespace dmattn {
namespace fixed {

// Bound * 4 < 2^62: the sum of the rounded counts stays below 2^62 even if the computed partials exceed the exact
// ones (fp32 products, bf16 / f16 rounding of P and dS) by up to 4x, well inside int64.
constexpr int kHeadroomBits = 60;
constexpr int kMinExp = -126;  // 2^-e stays a normal float (exact scaling)
constexpr int kMaxExp = 126;

// e with bound < 2^(e + 60), clamped to [-126, 126]. Clamping above is always safe: a partial is a finite float
// (< 2^128), so |x| * 2^-126 < 4 counts. Clamping below only coarsens the resolution of gradients that are all
// below 2^-66 in magnitude. A non-finite bound (non-finite inputs, flagged separately) gets the widest scale.
__device__ __forceinline__ int exponent_for(double bound) {
  if (!(bound <= 1.0e300)) return kMaxExp;  // inf / NaN
  if (!(bound > 0.0)) return kMinExp;        // 0: every partial is 0
  int E;
  frexp(bound, &E);  // bound = m 2^E, m in [0.5, 1): bound < 2^E
  const int e = E - kHeadroomBits;
  return e < kMinExp ? kMinExp : (e > kMaxExp ? kMaxExp : e);
}

// 2^-e as a float (e in [-126, 126]: a normal number, so x * inv_res is exact for a normal product).
__device__ __forceinline__ float inv_res(int e) { return __int_as_float((127 - e) << 23); }

__device__ __forceinline__ float stat(const uint32_t* stats, int i) { return __uint_as_float(stats[i]); }

// True when a maximum is inf / NaN (their |x| bit patterns exceed the largest finite float's) or when the key-list
// kernel met a partial that was non-finite or out of the int64 range: the outputs are then NaN.
__device__ __forceinline__ bool poisoned(const uint32_t* stats) {
  return stats[kFixedMaxQ] >= 0x7f800000u || stats[kFixedMaxV] >= 0x7f800000u ||
         stats[kFixedMaxDout] >= 0x7f800000u || stats[kFixedMaxDelta] >= 0x7f800000u || stats[kFixedBad] != 0u;
}

struct Exponents {
  int dk, dv, dbias;
};

// The bounds (D = head dim, n_kv = Lq * H / Hkv rows summed into one key's dK / dV, n_db = the rows summed into
// one dbias entry: Lq * (B / Bb) * (H / Hb)):
//   P <= 1;  |dP_ij| = |dO_i . V_j| <= D max|dO| max|V|;  |dS_ij| = P |dP_ij - delta_i| <= Smax = D mo mv + md;
//   softcap multiplies dS by 1 - tanh^2 <= 1 for dQ / dK;
//   |dV[j, d]| <= n_kv max|dO|;  |dK[j, d]| <= scale n_kv Smax max|Q|;  |dbias[j]| <= n_db Smax.
// The same function runs in the kernel and in the conversion, so both see the same exponents.
__device__ __forceinline__ Exponents fixed_exponents(const uint32_t* stats, const BwdFixedPoint& fx, int head_dim,
                                                     float scale) {
  const double mq = stat(stats, kFixedMaxQ), mv = stat(stats, kFixedMaxV);
  const double mo = stat(stats, kFixedMaxDout), md = stat(stats, kFixedMaxDelta);
  const double smax = double(head_dim) * mo * mv + md;
  Exponents ex;
  ex.dv = exponent_for(fx.rows_kv * mo);
  ex.dk = exponent_for(fabs(double(scale)) * fx.rows_kv * smax * mq);
  ex.dbias = exponent_for(fx.rows_dbias * smax);
  return ex;
}

// The count factors 2^-e of dK, dV and dbias (factors[0 .. 2]) for this call: the key-list kernels' thread 0
// writes them to shared memory before the chunk loop, whose first barrier publishes them.
__device__ __forceinline__ void store_count_factors(float* factors, const uint32_t* stats, const BwdFixedPoint& fx,
                                                    int head_dim, float scale) {
  const Exponents ex = fixed_exponents(stats, fx, head_dim, scale);
  factors[0] = inv_res(ex.dk);
  factors[1] = inv_res(ex.dv);
  factors[2] = inv_res(ex.dbias);
}

// Count of one partial (already multiplied by inv_res). |y| < 2^62 or NaN / inf sets `bad`.
__device__ __forceinline__ unsigned long long to_count(float y, bool& bad) {
  bad |= !(fabsf(y) < 0x1p62f);
  return static_cast<unsigned long long>(__float2ll_rn(y));
}

// 2^e as a double (the resolution), for from_count.
__device__ __forceinline__ double res(int e) { return ldexp(1.0, e); }

// count * res as a float (via double: the int64 -> double conversion rounds only above 2^53 counts; the
// multiplication by a power of two is exact).
__device__ __forceinline__ float from_count(unsigned long long n, double res) {
  return __double2float_rn(__ll2double_rn(static_cast<long long>(n)) * res);
}

}  // namespace fixed
}  // namespace dmattn
