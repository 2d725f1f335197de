// Launch template of the CUDA forward: picks the key-tile kernel or the live-key-list kernel and instantiates both
// dtypes of one head dim (one generated flash_fwd_hdim<D>.cu file per head dim, cmake/Cuda.cmake).
#pragma once

#include <atomic>
#include <cstdint>

#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/flash_fwd_key_list_kernel.cuh"
#include "cuda/smem_limit.cuh"

namespace dmattn {
namespace fwd {

template <int kHeadDim, bool kIsBF16, int kNWarps = (kHeadDim <= 64 ? 4 : 8)>
cudaError_t launch(const FwdParams& p, cudaStream_t stream) {
  using Kt = Traits<kHeadDim, kIsBF16, kNWarps>;
  constexpr int smem = Kt::kSmemBytes;
  const int m_blocks = (p.q_len + Kt::kBlockM - 1) / Kt::kBlockM;
  if (m_blocks == 0 || p.heads == 0 || p.batch == 0) return cudaSuccess;
  if (p.key_lists != nullptr) {
    static std::atomic<uint64_t> configured{0};
    auto kernel = flash_fwd_key_list_kernel<Kt>;
    if (cudaError_t err = raise_smem_limit_once(kernel, smem, configured); err != cudaSuccess) return err;
    kernel<<<dim3(p.heads, m_blocks, p.batch), Kt::kNThreads, smem, stream>>>(p);
  } else {
    static std::atomic<uint64_t> configured{0};
    auto kernel = flash_fwd_kernel<Kt>;
    if (cudaError_t err = raise_smem_limit_once(kernel, smem, configured); err != cudaSuccess) return err;
    kernel<<<dim3(m_blocks, p.heads, p.batch), Kt::kNThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace fwd
}  // namespace dmattn

#define DMATTN_INSTANTIATE_FWD(D)                                                     \
  namespace dmattn {                                                                  \
  template <>                                                                         \
  cudaError_t run_flash_fwd<D, true>(const FwdParams& p, cudaStream_t s) {            \
    return fwd::launch<D, true>(p, s);                                                \
  }                                                                                   \
  template <>                                                                         \
  cudaError_t run_flash_fwd<D, false>(const FwdParams& p, cudaStream_t s) {           \
    return fwd::launch<D, false>(p, s);                                               \
  }                                                                                   \
  }
