// The backward's launch sequence (no CuTe here: the main / dq kernels live in the generated flash_bwd_hdim*.cu and
// flash_bwd_sm90_hdim*.cu): dbias zero-fill, the preprocess (delta, the dq accumulator's zeros, on the Hopper route
// the non-finite scan), main kernel (on the Hopper route the Hopper main kernel and the sm80 one, of which exactly
// one does the work), deterministic dq kernel or dq conversion, dbias conversion.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/flash_bwd.h"
#include "cuda/half_float.cuh"
#if defined(DMATTN_WITH_SM90)
#include "cuda/sm90/flash_bwd_sm90.h"
#endif

namespace dmattn {
namespace {

constexpr int kThreads = 256;

// Whether any of the eight 2-byte floats of w is an inf or NaN (all exponent bits set: `exp_mask` 0x7f80 for bf16,
// 0x7c00 for f16).
__device__ __forceinline__ bool any_nonfinite8(uint4 w, uint32_t exp_mask) {
  const uint32_t mask2 = exp_mask | (exp_mask << 16);
  bool bad = false;
  for (uint32_t word : {w.x, w.y, w.z, w.w}) {
    const uint32_t e = word & mask2;
    bad |= (e & 0xffffu) == exp_mask || (e >> 16) == exp_mask;
  }
  return bad;
}

template <class T>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  const T* x = reinterpret_cast<const T*>(&a);
  const T* y = reinterpret_cast<const T*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc = fmaf(to_f32(x[i]), to_f32(y[i]), acc);
  return acc;
}

// The backward's preprocess, one pass over the [B, Lq, H, D] rows of out and dout: delta[b, h, i] = sum_d dout * out
// - dlse; with `dq_zero`, the row's fp32 dq accumulator zeroed (it is written as the rows are read, instead of by
// a memset of its own); with `nonfinite`, q and dout scanned for inf / NaN (the Hopper routes' word, zeroed
// before). kThreadsPerRow threads share a row, 8 elements (16 bytes) each per step: D / 8 rounded up to a power
// of two, so that a warp's loads cover whole rows.
template <class T, int kThreadsPerRow>
__global__ void __launch_bounds__(kThreads) bwd_preprocess_kernel(BwdParams p, float* dq_zero, uint32_t* nonfinite) {
  const int64_t rows = int64_t(p.batch) * p.q_len * p.heads;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / kThreadsPerRow) + threadIdx.x / kThreadsPerRow;
  const int sub = int(threadIdx.x) % kThreadsPerRow;
  const int pieces = p.head_dim / 8;
  const uint32_t exp_mask = p.is_bf16 ? 0x7f80u : 0x7c00u;
  float acc = 0.f;
  bool bad = false;
  if (row < rows) {
    const uint4* o = reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + row * p.head_dim);
    const uint4* d_o = reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + row * p.head_dim);
    const uint4* q = reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + row * p.head_dim);
    float4* dq = dq_zero == nullptr ? nullptr : reinterpret_cast<float4*>(dq_zero + row * p.head_dim);
    for (int i = sub; i < pieces; i += kThreadsPerRow) {
      const uint4 g = __ldg(d_o + i);
      acc += dot8<T>(__ldg(o + i), g);
      if (nonfinite != nullptr) bad |= any_nonfinite8(g, exp_mask) || any_nonfinite8(__ldg(q + i), exp_mask);
      if (dq != nullptr) dq[2 * i] = dq[2 * i + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int s = kThreadsPerRow / 2; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (sub == 0 && row < rows) {
    const int64_t h = row % p.heads;
    const int64_t i = (row / p.heads) % p.q_len;
    const int64_t b = row / (int64_t(p.heads) * p.q_len);
    const int64_t idx = (b * p.heads + h) * p.q_len + i;
    p.delta[idx] = acc - p.dlse[idx];
  }
  if (nonfinite != nullptr && __syncthreads_or(bad) && threadIdx.x == 0) *nonfinite = 1u;
}

// *flag = 1 if any of the n 2-byte floats at x is an inf or NaN, 8 per 16-byte load.
__global__ void __launch_bounds__(kThreads) flag_nonfinite_kernel(const uint16_t* __restrict__ x, int64_t n,
                                                                  uint32_t exp_mask, uint32_t* flag) {
  const int64_t vecs = n / 8;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  bool bad = false;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < vecs; i += stride)
    bad |= any_nonfinite8(__ldg(reinterpret_cast<const uint4*>(x) + i), exp_mask);
  for (int64_t i = vecs * 8 + int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    bad |= (x[i] & exp_mask) == exp_mask;
  if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1u;
}

cudaError_t flag_nonfinite(const void* x, int64_t n, bool bf16, uint32_t* flag, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n / 8 + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 1 ? 1 : (blocks < 4096 ? blocks : 4096));
  flag_nonfinite_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(x), n, bf16 ? 0x7f80u : 0x7c00u,
                                                       flag);
  return cudaGetLastError();
}

// dst = src rounded to T, 8 elements a step (two 16-byte loads, one 16-byte store) where both are 16-byte aligned,
// the tail (and unaligned buffers) one at a time.
template <class T>
__global__ void __launch_bounds__(kThreads) convert_kernel(const float* __restrict__ src, T* __restrict__ dst,
                                                           int64_t n, bool vec) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t vecs = vec ? n / 8 : 0;
  for (int64_t i = first; i < vecs; i += stride) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(src) + 2 * i);
    const float4 b = __ldg(reinterpret_cast<const float4*>(src) + 2 * i + 1);
    const T out[8] = {from_f32<T>(a.x), from_f32<T>(a.y), from_f32<T>(a.z), from_f32<T>(a.w),
                      from_f32<T>(b.x), from_f32<T>(b.y), from_f32<T>(b.z), from_f32<T>(b.w)};
    reinterpret_cast<uint4*>(dst)[i] = *reinterpret_cast<const uint4*>(out);
  }
  for (int64_t i = vecs * 8 + first; i < n; i += stride) dst[i] = from_f32<T>(src[i]);
}

template <class T>
cudaError_t convert(const float* src, void* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool vec = (reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) % 16 == 0;
  const int64_t blocks = ((vec ? n / 8 : n) + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 1 ? 1 : (blocks < 65536 ? blocks : 65536));
  convert_kernel<T><<<grid, kThreads, 0, stream>>>(src, static_cast<T*>(dst), n, vec);
  return cudaGetLastError();
}

cudaError_t run_main(const BwdParams& p, cudaStream_t stream, bool dq_pass) {
#define DMATTN_BWD_CASE(D)                                                                             \
  case D:                                                                                              \
    if (dq_pass) return p.is_bf16 ? run_flash_bwd_dq<D, true>(p, stream) : run_flash_bwd_dq<D, false>(p, stream); \
    return p.is_bf16 ? run_flash_bwd_main<D, true>(p, stream) : run_flash_bwd_main<D, false>(p, stream);
  switch (p.head_dim) {
    DMATTN_FOR_EACH_CUDA_HEAD_DIM(DMATTN_BWD_CASE)
    default:
      return cudaErrorInvalidValue;
  }
#undef DMATTN_BWD_CASE
}

}  // namespace

cudaError_t launch_bwd_preprocess(const BwdParams& p, float* dq_zero, bool scan_nonfinite, cudaStream_t stream) {
  cudaError_t err;
  uint32_t* nonfinite = scan_nonfinite ? p.nonfinite : nullptr;
  if (scan_nonfinite) {
    if (nonfinite == nullptr) return cudaErrorInvalidValue;
    if ((err = cudaMemsetAsync(nonfinite, 0, sizeof(uint32_t), stream)) != cudaSuccess) return err;
  }
  const int64_t rows = int64_t(p.batch) * p.q_len * p.heads;
  if (rows > 0) {
    // The rows are read 16 bytes at a time: every head dim the kernels take is a multiple of 8, and XLA's buffers
    // are aligned.
    if (p.head_dim % 8 != 0) return cudaErrorInvalidValue;
    auto launch = [&](auto threads_per_row) {
      constexpr int kPerRow = decltype(threads_per_row)::value;
      const int64_t blocks = (rows + kThreads / kPerRow - 1) / (kThreads / kPerRow);
      if (p.is_bf16)
        bwd_preprocess_kernel<__nv_bfloat16, kPerRow><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, dq_zero, nonfinite);
      else
        bwd_preprocess_kernel<__half, kPerRow><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, dq_zero, nonfinite);
    };
    const int pieces = p.head_dim / 8;
    if (pieces <= 4) launch(std::integral_constant<int, 4>{});
    else if (pieces <= 8) launch(std::integral_constant<int, 8>{});
    else if (pieces <= 16) launch(std::integral_constant<int, 16>{});
    else if (pieces <= 32) launch(std::integral_constant<int, 32>{});
    else return cudaErrorInvalidValue;
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (scan_nonfinite) {
    const int64_t k_elems = int64_t(p.batch) * p.kv_len * p.kv_heads * p.head_dim;
    if ((err = flag_nonfinite(p.k, k_elems, p.is_bf16, nonfinite, stream)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_f32_to_half(const float* src, void* dst, int64_t n, bool to_bf16, cudaStream_t stream) {
  return to_bf16 ? convert<__nv_bfloat16>(src, dst, n, stream) : convert<__half>(src, dst, n, stream);
}

cudaError_t launch_flash_bwd(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err;
  const int64_t q_elems = int64_t(p.batch) * p.q_len * p.heads * p.head_dim;
  if (p.bias != nullptr) {
    const int64_t esize = p.bias_dtype == DType::kF32 ? 4 : 2;
    if (p.dbias_mode == kDbiasAccum) {
      err = cudaMemsetAsync(p.dbias_accum, 0, p.bias_size * sizeof(float), stream);
    } else {  // skipped / never visited tiles (and a key-broadcast bias) get exact zeros
      err = cudaMemsetAsync(p.dbias, 0, p.bias_size * esize, stream);
    }
    if (err != cudaSuccess) return err;
  }
  // The Hopper kernel multiplies the exact zeros of dropped pairs by q, dout and k in its products, so an inf or NaN
  // there would reach gradients of pairs that drop it: the preprocess scans the three and sets the word, and then
  // only the sm80 main kernel (which routes such tiles through its kept-pair sums) does the work.
  bool hopper = false;
#if defined(DMATTN_WITH_SM90)
  hopper = p.nonfinite != nullptr && flash_bwd_sm90_serves(p);
#endif
  // The non-deterministic kernels add dq into dq_accum, which the preprocess zeroes.
  if ((err = launch_bwd_preprocess(p, p.deterministic ? nullptr : p.dq_accum, hopper, stream)) != cudaSuccess)
    return err;
  BwdParams sm80 = p;
  sm80.nonfinite = nullptr;  // the sm80 main kernel does the work unless the Hopper route takes the call
#if defined(DMATTN_WITH_SM90)
  if (hopper) {
    if ((err = launch_flash_bwd_sm90(p, stream)) != cudaSuccess) return err;
    sm80.nonfinite = p.nonfinite;
  }
#endif
  if ((err = run_main(sm80, stream, /*dq_pass=*/false)) != cudaSuccess) return err;
  if (p.deterministic) {
    if ((err = run_main(p, stream, /*dq_pass=*/true)) != cudaSuccess) return err;
  } else {
    err = p.is_bf16 ? convert<__nv_bfloat16>(p.dq_accum, p.dq, q_elems, stream)
                    : convert<__half>(p.dq_accum, p.dq, q_elems, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.bias != nullptr && p.dbias_mode == kDbiasAccum && p.bias_dtype != DType::kF32) {
    err = p.bias_dtype == DType::kBF16 ? convert<__nv_bfloat16>(p.dbias_accum, p.dbias, p.bias_size, stream)
                                       : convert<__half>(p.dbias_accum, p.dbias, p.bias_size, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace dmattn
