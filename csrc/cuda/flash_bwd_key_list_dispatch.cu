// The key-list backward's launch sequence (no CuTe here: the kernel lives in the generated
// flash_bwd_key_list_hdim*.cu). The key lists were built by the caller (launch_build_key_lists) on the same stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/bwd_fixed_point.cuh"
#include "cuda/flash_bwd_key_list.h"
#include "cuda/half_float.cuh"
#if defined(DMATTN_WITH_SM90)
#include "cuda/sm90/flash_bwd_sm90.h"
#endif

namespace dmattn {
namespace {

constexpr int kThreads = 256;

// ---- Deterministic mode: the maxima behind the fixed-point bounds (csrc/cuda/bwd_fixed_point.cuh).

// max |x| over n 16-bit floats (bf16 or f16; n % 8 == 0, 16-byte aligned) as the fp32 bit pattern of the value.
// |x| of a bf16 / f16 is its bit pattern with the sign cleared, and those patterns order like the magnitudes
// (inf and NaN above every finite value), so the maximum is taken on the integers, two halves at a time.
__device__ uint32_t max_abs_half_bits(const void* data, int64_t n, bool bf16, int64_t start, int64_t step) {
  const uint4* src = static_cast<const uint4*>(data);
  uint32_t m = 0;
  for (int64_t i = start; i < n / 8; i += step) {
    const uint4 w = __ldg(src + i);
    m = __vmaxu2(m, w.x & 0x7fff7fffu);
    m = __vmaxu2(m, w.y & 0x7fff7fffu);
    m = __vmaxu2(m, w.z & 0x7fff7fffu);
    m = __vmaxu2(m, w.w & 0x7fff7fffu);
  }
  const uint32_t h = max(m & 0xffffu, m >> 16);
  if (bf16) return h << 16;  // a bf16 is the top half of an fp32
  return __float_as_uint(fabsf(__half2float(__ushort_as_half(static_cast<unsigned short>(h)))));
}

// stats[kFixedMaxQ / V / Dout / Delta] = max |q|, |v|, |dout|, |delta| as fp32 bit patterns (atomicMax on the
// patterns of non-negative floats: the result does not depend on the order; NaN / inf land above 0x7f7fffff).
// blockIdx.y picks the tensor.
__global__ void __launch_bounds__(kThreads) fixed_stats_kernel(BwdParams p, uint32_t* stats) {
  const int64_t start = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * kThreads;
  const int64_t q_elems = int64_t(p.batch) * p.q_len * p.heads * p.head_dim;
  const int64_t kv_elems = int64_t(p.batch) * p.kv_len * p.kv_heads * p.head_dim;
  uint32_t m = 0;
  int which;
  switch (blockIdx.y) {
    case 0:
      which = kFixedMaxQ;
      m = max_abs_half_bits(p.q, q_elems, p.is_bf16, start, step);
      break;
    case 1:
      which = kFixedMaxV;
      m = max_abs_half_bits(p.v, kv_elems, p.is_bf16, start, step);
      break;
    case 2:
      which = kFixedMaxDout;
      m = max_abs_half_bits(p.dout, q_elems, p.is_bf16, start, step);
      break;
    default: {
      which = kFixedMaxDelta;
      const int64_t rows = int64_t(p.batch) * p.heads * p.q_len;
      for (int64_t i = start; i < rows; i += step) m = max(m, __float_as_uint(fabsf(p.delta[i])));
      break;
    }
  }
  m = __reduce_max_sync(0xffffffffu, m);
  __shared__ uint32_t warp_max[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t b = 0;
    for (int w = 0; w < kThreads / 32; ++w) b = max(b, warp_max[w]);
    if (b != 0) atomicMax(stats + which, b);
  }
}

// dbias[i] = count[i] * 2^e in the bias dtype, e the dbias exponent from the same bounds as the kernel's; NaN
// everywhere when an input maximum is non-finite or the kernel flagged a partial.
__global__ void __launch_bounds__(kThreads)
    dbias_counts_to_out_kernel(const unsigned long long* __restrict__ src, void* __restrict__ dst, int64_t n,
                               DType dtype, BwdFixedPoint fx, int head_dim, float scale) {
  const double res = fixed::res(fixed::fixed_exponents(fx.stats, fx, head_dim, scale).dbias);
  const bool nan = fixed::poisoned(fx.stats);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const float x = nan ? __int_as_float(0x7fc00000) : fixed::from_count(src[i], res);
    if (dtype == DType::kBF16) static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(x);
    else if (dtype == DType::kF16) static_cast<__half*>(dst)[i] = __float2half_rn(x);
    else static_cast<float*>(dst)[i] = x;
  }
}

// One pass's accumulators into its kv heads of dk or dv: src [B * Lk, cols] (cols = accum_kv_heads * D, contiguous)
// to the rows of dst [B * Lk, Hkv * D] from column dst_col on. One warp per row at a time; cols % 4 == 0 (D % 8 == 0).
// Src is int64 counts (deterministic mode: which 0 dK, 1 dV, scaled by fx's exponents) or fp32 sums.
template <class Out, class Src>
__global__ void __launch_bounds__(kThreads)
    accum_rows_to_out_kernel(const Src* __restrict__ src, Out* __restrict__ dst, int64_t rows, int cols,
                             int64_t dst_stride, int64_t dst_col, int which, BwdFixedPoint fx, int head_dim,
                             float scale) {
  double res = 0;
  bool nan = false;
  if constexpr (std::is_same_v<Src, unsigned long long>) {
    const fixed::Exponents ex = fixed::fixed_exponents(fx.stats, fx, head_dim, scale);
    res = fixed::res(which == 0 ? ex.dk : ex.dv);
    nan = fixed::poisoned(fx.stats);
  }
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t r = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const Src* s = src + r * cols;
    Out* d = dst + r * dst_stride + dst_col;
    for (int c = 4 * lane; c < cols; c += 4 * 32) {
      float x[4];
      if constexpr (std::is_same_v<Src, float>) {
        const float4 v = *reinterpret_cast<const float4*>(s + c);
        x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
      } else {
        for (int j = 0; j < 4; ++j) x[j] = nan ? __int_as_float(0x7fc00000) : fixed::from_count(s[c + j], res);
      }
      for (int j = 0; j < 4; ++j) d[c + j] = from_f32<Out>(x[j]);
    }
  }
}

// The pass's dK and dV accumulators (dk first, then dv, each B * Lk * accum_kv_heads * D elements) into its kv heads
// of dk and dv.
template <class Src>
cudaError_t launch_accum_to_out(const Src* dk_accum, const Src* dv_accum, const BwdKeyListParams& sp,
                                cudaStream_t stream) {
  const BwdParams& p = sp.base;
  const int64_t rows = int64_t(p.batch) * p.kv_len;
  if (rows == 0) return cudaSuccess;
  const int cols = sp.accum_kv_heads * p.head_dim;
  const int64_t dst_stride = int64_t(p.kv_heads) * p.head_dim, dst_col = int64_t(sp.kv_head_begin) * p.head_dim;
  const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  for (int which : {0, 1}) {
    const Src* src = which == 0 ? dk_accum : dv_accum;
    void* dst = which == 0 ? p.dk : p.dv;
    if (p.is_bf16)
      accum_rows_to_out_kernel<<<grid, kThreads, 0, stream>>>(src, static_cast<__nv_bfloat16*>(dst), rows, cols,
                                                              dst_stride, dst_col, which, sp.fixed, p.head_dim,
                                                              p.scale);
    else
      accum_rows_to_out_kernel<<<grid, kThreads, 0, stream>>>(src, static_cast<__half*>(dst), rows, cols,
                                                              dst_stride, dst_col, which, sp.fixed, p.head_dim,
                                                              p.scale);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_fixed_stats(const BwdParams& p, uint32_t* stats, cudaStream_t stream) {
  fixed_stats_kernel<<<dim3(256, 4), kThreads, 0, stream>>>(p, stats);
  return cudaGetLastError();
}

cudaError_t launch_dbias_counts_to_out(const BwdKeyListParams& sp, cudaStream_t stream) {
  const BwdParams& p = sp.base;
  if (p.bias_size == 0) return cudaSuccess;
  const int64_t blocks = (p.bias_size + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  dbias_counts_to_out_kernel<<<grid, kThreads, 0, stream>>>(sp.fixed.dbias, p.dbias, p.bias_size, p.bias_dtype,
                                                            sp.fixed, p.head_dim, p.scale);
  return cudaGetLastError();
}

cudaError_t run_key_list_kernel(const BwdKeyListParams& sp, cudaStream_t stream) {
  const bool bf16 = sp.base.is_bf16;
#define DMATTN_BWD_KEY_LIST_CASE(D) \
  case D:                         \
    return bf16 ? run_flash_bwd_key_list<D, true>(sp, stream) : run_flash_bwd_key_list<D, false>(sp, stream);
  switch (sp.base.head_dim) {
    DMATTN_FOR_EACH_CUDA_HEAD_DIM(DMATTN_BWD_KEY_LIST_CASE)
    default:
      return cudaErrorInvalidValue;
  }
#undef DMATTN_BWD_KEY_LIST_CASE
}

// The key-list kernels of one pass of kv heads: the Hopper kernel when it serves the call (`hopper`), then the sm80
// kernel, which does the work only when there is no Hopper kernel or the non-finite scan flagged the inputs
// (pass_sm80.base.nonfinite).
cudaError_t run_key_list_pass(const BwdKeyListParams& pass, const BwdKeyListParams& pass_sm80, bool hopper,
                              cudaStream_t stream) {
#if defined(DMATTN_WITH_SM90)
  if (hopper) {
    if (cudaError_t err = launch_flash_bwd_key_list_sm90(pass, stream); err != cudaSuccess) return err;
  }
#else
  (void)pass;
  (void)hopper;
#endif
  return run_key_list_kernel(pass_sm80, stream);
}

// Deterministic mode: int64 counts instead of fp32 sums (csrc/cuda/bwd_fixed_point.cuh). The handler laid out
// the workspace as [dK counts | dV counts | stats words] (the counts of one pass's kv heads) and, with a computed
// dbias, an int64 dbias workspace.
cudaError_t launch_flash_bwd_key_list_fixed(const BwdKeyListParams& sp, const BwdKeyListParams& sm80, bool hopper,
                                            cudaStream_t stream) {
  const BwdParams& p = sp.base;
  const BwdFixedPoint& fx = sp.fixed;
  cudaError_t err;
  const int64_t pass_elems = int64_t(p.batch) * p.kv_len * sp.accum_kv_heads * p.head_dim;
  if (fx.dv != fx.dk + pass_elems || reinterpret_cast<unsigned long long*>(fx.stats) != fx.dv + pass_elems)
    return cudaErrorInvalidValue;
  const bool dbias_computed = p.bias != nullptr && p.dbias_mode != kDbiasNone;
  if (p.bias != nullptr) {
    const int64_t esize = p.bias_dtype == DType::kF32 ? 4 : 2;
    if (!dbias_computed) {  // key-broadcast bias: exact zeros
      if ((err = cudaMemsetAsync(p.dbias, 0, p.bias_size * esize, stream)) != cudaSuccess) return err;
    } else {
      if (fx.dbias == nullptr) return cudaErrorInvalidValue;
      err = cudaMemsetAsync(fx.dbias, 0, p.bias_size * sizeof(unsigned long long), stream);
      if (err != cudaSuccess) return err;
    }
  }
  if ((err = cudaMemsetAsync(fx.stats, 0, kFixedStatsWords * sizeof(uint32_t), stream)) != cudaSuccess) return err;
  if ((err = launch_bwd_preprocess(p, nullptr, hopper, stream)) != cudaSuccess) return err;
  if ((err = launch_fixed_stats(p, fx.stats, stream)) != cudaSuccess) return err;
  BwdKeyListParams pass = sp, pass_sm80 = sm80;
  for (int h0 = 0; h0 < p.kv_heads; h0 += sp.accum_kv_heads) {
    pass.kv_head_begin = pass_sm80.kv_head_begin = h0;
    if ((err = cudaMemsetAsync(fx.dk, 0, 2 * pass_elems * sizeof(unsigned long long), stream)) != cudaSuccess)
      return err;
    if ((err = run_key_list_pass(pass, pass_sm80, hopper, stream)) != cudaSuccess) return err;
    if ((err = launch_accum_to_out<unsigned long long>(fx.dk, fx.dv, pass, stream)) != cudaSuccess) return err;
  }
  if (dbias_computed) {
    if ((err = launch_dbias_counts_to_out(sp, stream)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_flash_bwd_key_list(const BwdKeyListParams& sp, cudaStream_t stream) {
  const BwdParams& p = sp.base;
  if (sp.accum_kv_heads <= 0 || p.kv_heads % sp.accum_kv_heads != 0) return cudaErrorInvalidValue;
  cudaError_t err;
  BwdKeyListParams sm80 = sp;
  sm80.base.nonfinite = nullptr;  // the sm80 kernel does the work unless the Hopper route takes the call
  bool hopper = false;
#if defined(DMATTN_WITH_SM90)
  if (flash_bwd_key_list_sm90_serves(sp)) {
    // The Hopper kernel needs finite q, dout and k (see its header); the preprocess's scan sets the word that hands
    // other calls to the sm80 kernel.
    sm80.base.nonfinite = p.nonfinite;
    hopper = true;
  }
#endif
  if (sp.fixed.dk != nullptr) return launch_flash_bwd_key_list_fixed(sp, sm80, hopper, stream);
  const int64_t pass_elems = int64_t(p.batch) * p.kv_len * sp.accum_kv_heads * p.head_dim;
  if (p.bias != nullptr) {
    // dbias columns are added atomically into dbias_accum (dbias itself for an f32 bias). A key-broadcast bias
    // (kDbiasNone) gets exact zeros, as does every key no row keeps.
    const int64_t esize = p.bias_dtype == DType::kF32 ? 4 : 2;
    if (p.dbias_mode == kDbiasNone || p.bias_dtype != DType::kF32) {
      if ((err = cudaMemsetAsync(p.dbias, 0, p.bias_size * esize, stream)) != cudaSuccess) return err;
    }
    if (p.dbias_mode != kDbiasNone) {
      if ((err = cudaMemsetAsync(p.dbias_accum, 0, p.bias_size * sizeof(float), stream)) != cudaSuccess) return err;
    }
  }
  if ((err = launch_bwd_preprocess(p, nullptr, hopper, stream)) != cudaSuccess) return err;
  // dK / dV are sums of atomically added partials (several query tiles and the whole GQA group per key), one pass
  // of kv heads at a time.
  for (int h0 = 0; h0 < p.kv_heads; h0 += sp.accum_kv_heads) {
    BwdKeyListParams pass = sp, pass_sm80 = sm80;
    pass.kv_head_begin = pass_sm80.kv_head_begin = h0;
    if ((err = cudaMemsetAsync(sp.dk_accum, 0, pass_elems * sizeof(float), stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(sp.dv_accum, 0, pass_elems * sizeof(float), stream)) != cudaSuccess) return err;
    if ((err = run_key_list_pass(pass, pass_sm80, hopper, stream)) != cudaSuccess) return err;
    if ((err = launch_accum_to_out<float>(sp.dk_accum, sp.dv_accum, pass, stream)) != cudaSuccess) return err;
  }
  if (p.bias != nullptr && p.dbias_mode != kDbiasNone && p.bias_dtype != DType::kF32) {
    err = launch_f32_to_half(p.dbias_accum, p.dbias, p.bias_size, p.bias_dtype == DType::kBF16, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace dmattn
