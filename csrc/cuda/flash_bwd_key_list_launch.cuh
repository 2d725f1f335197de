// Launch templates of the CUDA backward's key-list kernel (csrc/cuda/flash_bwd_key_list_kernel.cuh) and the
// instantiation of both dtypes of one head dim (one generated flash_bwd_key_list_hdim<D>.cu file per head dim,
// cmake/Cuda.cmake). The launch sequence around it is csrc/cuda/flash_bwd_key_list_dispatch.cu.
#pragma once

#include <atomic>
#include <cstdint>

#include "cuda/flash_bwd_key_list_kernel.cuh"
#include "cuda/smem_limit.cuh"

namespace dmattn {
namespace bwd_key_list {

template <int kHeadDim, bool kIsBF16, int kBlockM, bool kFixed>
cudaError_t launch_key_list_kernel(const BwdKeyListParams& sp, cudaStream_t stream) {
  using Kt = BwdKeyListTraits<kHeadDim, kIsBF16, kBlockM>;
  auto kernel = flash_bwd_key_list_kernel<Kt, kFixed>;
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(kernel, Kt::kSmemBytes, configured); err != cudaSuccess) return err;
  const BwdParams& p = sp.base;
  const dim3 grid((p.q_len + Kt::kBlockM - 1) / Kt::kBlockM, sp.accum_kv_heads * p.group, p.batch);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  kernel<<<grid, Kt::kNThreads, Kt::kSmemBytes, stream>>>(sp);
  return cudaGetLastError();
}

template <int kHeadDim, bool kIsBF16, int kBlockM>
cudaError_t launch_key_list_rows(const BwdKeyListParams& sp, cudaStream_t stream) {
  return sp.fixed.dk != nullptr ? launch_key_list_kernel<kHeadDim, kIsBF16, kBlockM, true>(sp, stream)
                                : launch_key_list_kernel<kHeadDim, kIsBF16, kBlockM, false>(sp, stream);
}

// The builds of a head dim (flash_bwd_key_list.h: key_list_bwd_has_rows): 128 rows up to D = 128, 64 from D = 128.
template <int kHeadDim, bool kIsBF16>
cudaError_t launch_key_list(const BwdKeyListParams& sp, cudaStream_t stream) {
  if (!key_list_bwd_has_rows(kHeadDim, sp.rows_per_cta)) return cudaErrorInvalidValue;
  if constexpr (kHeadDim <= 128) {
    if (sp.rows_per_cta == 128) return launch_key_list_rows<kHeadDim, kIsBF16, 128>(sp, stream);
  }
  if constexpr (kHeadDim >= 128) {
    if (sp.rows_per_cta == 64) return launch_key_list_rows<kHeadDim, kIsBF16, 64>(sp, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace bwd_key_list
}  // namespace dmattn

// Explicit instantiation of both dtypes for one head dim (one .cu file per head dim).
#define DMATTN_INSTANTIATE_BWD_KEY_LIST(D)                                                \
  namespace dmattn {                                                                    \
  template <>                                                                           \
  cudaError_t run_flash_bwd_key_list<D, true>(const BwdKeyListParams& p, cudaStream_t s) {  \
    return bwd_key_list::launch_key_list<D, true>(p, s);                                    \
  }                                                                                     \
  template <>                                                                           \
  cudaError_t run_flash_bwd_key_list<D, false>(const BwdKeyListParams& p, cudaStream_t s) { \
    return bwd_key_list::launch_key_list<D, false>(p, s);                                   \
  }                                                                                     \
  }
