// The sparse backward's launch sequence (no CuTe here: the kernel lives in flash_bwd_sparse_hdim*.cu). The key
// lists were built by the caller (launch_build_key_lists) on the same stream.
#include "cuda/flash_bwd_sparse.h"

namespace dmattn {
namespace {

cudaError_t run_sparse_kernel(const BwdSparseParams& sp, cudaStream_t stream) {
  const bool bf16 = sp.base.is_bf16;
#define DMATTN_BWD_SPARSE_CASE(D) \
  case D:                         \
    return bf16 ? run_flash_bwd_sparse<D, true>(sp, stream) : run_flash_bwd_sparse<D, false>(sp, stream);
  switch (sp.base.head_dim) {
    DMATTN_BWD_SPARSE_CASE(32)
    DMATTN_BWD_SPARSE_CASE(64)
    DMATTN_BWD_SPARSE_CASE(96)
    DMATTN_BWD_SPARSE_CASE(128)
    DMATTN_BWD_SPARSE_CASE(192)
    DMATTN_BWD_SPARSE_CASE(256)
    default:
      return cudaErrorInvalidValue;
  }
#undef DMATTN_BWD_SPARSE_CASE
}

}  // namespace

cudaError_t launch_flash_bwd_sparse(const BwdSparseParams& sp, cudaStream_t stream) {
  const BwdParams& p = sp.base;
  cudaError_t err;
  const int64_t kv_elems = int64_t(p.batch) * p.kv_len * p.kv_heads * p.head_dim;
  // dK / dV are sums of atomically added partials (several query tiles and the whole GQA group per key).
  if ((err = cudaMemsetAsync(sp.dk_accum, 0, kv_elems * sizeof(float), stream)) != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(sp.dv_accum, 0, kv_elems * sizeof(float), stream)) != cudaSuccess) return err;
  if (p.bias != nullptr) {
    // dbias columns are added atomically into dbias_accum (dbias itself for an f32 bias). A key-broadcast bias
    // (kDbiasNone) gets exact zeros, as does every key no row keeps.
    const int64_t esize = p.bias_dtype == kBwdBiasF32 ? 4 : 2;
    if (p.dbias_mode == kDbiasNone || p.bias_dtype != kBwdBiasF32) {
      if ((err = cudaMemsetAsync(p.dbias, 0, p.bias_size * esize, stream)) != cudaSuccess) return err;
    }
    if (p.dbias_mode != kDbiasNone) {
      if ((err = cudaMemsetAsync(p.dbias_accum, 0, p.bias_size * sizeof(float), stream)) != cudaSuccess) return err;
    }
  }
  if ((err = launch_bwd_delta(p, stream)) != cudaSuccess) return err;
  if ((err = run_sparse_kernel(sp, stream)) != cudaSuccess) return err;
  if ((err = launch_f32_to_half(sp.dk_accum, p.dk, kv_elems, p.is_bf16, stream)) != cudaSuccess) return err;
  if ((err = launch_f32_to_half(sp.dv_accum, p.dv, kv_elems, p.is_bf16, stream)) != cudaSuccess) return err;
  if (p.bias != nullptr && p.dbias_mode != kDbiasNone && p.bias_dtype != kBwdBiasF32) {
    err = launch_f32_to_half(p.dbias_accum, p.dbias, p.bias_size, p.bias_dtype == kBwdBiasBF16, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace dmattn
