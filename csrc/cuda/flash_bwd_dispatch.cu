// The backward's launch sequence (no CuTe here: the main / dq kernels live in the generated flash_bwd_hdim*.cu and
// flash_bwd_sm90_hdim*.cu): zero-fill, delta preprocess, main kernel (on the Hopper route: the non-finite scan, the
// Hopper main kernel and the sm80 one, of which exactly one does the work), deterministic dq kernel or dq
// conversion, dbias conversion.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <utility>

#include "cuda/flash_bwd.h"
#include "cuda/half_float.cuh"
#if defined(DMATTN_WITH_SM90)
#include "cuda/sm90/flash_bwd_sm90.h"
#endif

namespace dmattn {
namespace {

constexpr int kThreads = 256;

// delta[b, h, i] = sum_d dout * out - dlse: one warp per (b, i, h) row of the [B, Lq, H, D] tensors.
template <class T>
__global__ void __launch_bounds__(kThreads) bwd_delta_kernel(BwdParams p) {
  const int64_t rows = int64_t(p.batch) * p.q_len * p.heads;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* o = static_cast<const T*>(p.out) + row * p.head_dim;
  const T* d_o = static_cast<const T*>(p.dout) + row * p.head_dim;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) acc += to_f32(o[d]) * to_f32(d_o[d]);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) {
    const int64_t h = row % p.heads;
    const int64_t i = (row / p.heads) % p.q_len;
    const int64_t b = row / (int64_t(p.heads) * p.q_len);
    const int64_t idx = (b * p.heads + h) * p.q_len + i;
    p.delta[idx] = acc - p.dlse[idx];
  }
}

// *flag = 1 if any of the n 2-byte floats at x is an inf or NaN (all exponent bits set: mask 0x7f80 for bf16,
// 0x7c00 for f16), 8 per 16-byte load.
__global__ void __launch_bounds__(kThreads) flag_nonfinite_kernel(const uint16_t* __restrict__ x, int64_t n,
                                                                  uint32_t exp_mask, uint32_t* flag) {
  const uint32_t mask2 = exp_mask | (exp_mask << 16);
  const int64_t vecs = n / 8;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  bool bad = false;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < vecs; i += stride) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(x) + i);
    for (uint32_t word : {w.x, w.y, w.z, w.w}) {
      const uint32_t e = word & mask2;
      bad |= (e & 0xffffu) == exp_mask || (e >> 16) == exp_mask;
    }
  }
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

template <class T>
__global__ void __launch_bounds__(kThreads) convert_kernel(const float* __restrict__ src, T* __restrict__ dst,
                                                           int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    dst[i] = from_f32<T>(src[i]);
}

template <class T>
cudaError_t convert(const float* src, void* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  convert_kernel<T><<<grid, kThreads, 0, stream>>>(src, static_cast<T*>(dst), n);
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

cudaError_t launch_bwd_delta(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.q_len * p.heads;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  if (p.is_bf16) bwd_delta_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  else bwd_delta_kernel<__half><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_nonfinite_scan(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err;
  if ((err = cudaMemsetAsync(p.nonfinite, 0, sizeof(uint32_t), stream)) != cudaSuccess) return err;
  const int64_t q_elems = int64_t(p.batch) * p.q_len * p.heads * p.head_dim;
  const int64_t k_elems = int64_t(p.batch) * p.kv_len * p.kv_heads * p.head_dim;
  for (auto [x, n] : {std::pair<const void*, int64_t>{p.q, q_elems}, {p.dout, q_elems}, {p.k, k_elems}}) {
    if ((err = flag_nonfinite(x, n, p.is_bf16, p.nonfinite, stream)) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_f32_to_half(const float* src, void* dst, int64_t n, bool to_bf16, cudaStream_t stream) {
  return to_bf16 ? convert<__nv_bfloat16>(src, dst, n, stream) : convert<__half>(src, dst, n, stream);
}

cudaError_t launch_flash_bwd(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err;
  const int64_t q_elems = int64_t(p.batch) * p.q_len * p.heads * p.head_dim;
  if (!p.deterministic) {
    if ((err = cudaMemsetAsync(p.dq_accum, 0, q_elems * sizeof(float), stream)) != cudaSuccess) return err;
  }
  if (p.bias != nullptr) {
    const int64_t esize = p.bias_dtype == DType::kF32 ? 4 : 2;
    if (p.dbias_mode == kDbiasAccum) {
      err = cudaMemsetAsync(p.dbias_accum, 0, p.bias_size * sizeof(float), stream);
    } else {  // skipped / never visited tiles (and a key-broadcast bias) get exact zeros
      err = cudaMemsetAsync(p.dbias, 0, p.bias_size * esize, stream);
    }
    if (err != cudaSuccess) return err;
  }
  if ((err = launch_bwd_delta(p, stream)) != cudaSuccess) return err;
  BwdParams sm80 = p;
  sm80.nonfinite = nullptr;  // the sm80 main kernel does the work unless the Hopper route takes the call
#if defined(DMATTN_WITH_SM90)
  if (p.nonfinite != nullptr && flash_bwd_sm90_serves(p)) {
    // The Hopper kernel multiplies the exact zeros of dropped pairs by q, dout and k in its products, so an inf or
    // NaN there would reach gradients of pairs that drop it: a scan of the three sets the word, and then only the
    // sm80 main kernel (which routes such tiles through its kept-pair sums) does the work.
    if ((err = launch_nonfinite_scan(p, stream)) != cudaSuccess) return err;
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
