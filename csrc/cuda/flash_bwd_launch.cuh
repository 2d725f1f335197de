// Launch templates of the CUDA backward's key-tile kernels (csrc/cuda/flash_bwd_kernel.cuh: the main kernel and the
// deterministic dQ kernel) and the instantiation of both dtypes of one head dim (one generated flash_bwd_hdim<D>.cu
// file per head dim, cmake/Cuda.cmake). The launch sequence around them is csrc/cuda/flash_bwd_dispatch.cu.
#pragma once

#include <atomic>
#include <cstdint>

#include "cuda/flash_bwd_kernel.cuh"
#include "cuda/smem_limit.cuh"

namespace dmattn {
namespace bwd {

template <int kHeadDim, bool kIsBF16>
cudaError_t launch_main(const BwdParams& p, cudaStream_t stream) {
  using Kt = Traits<kHeadDim, kIsBF16>;
  auto kernel = flash_bwd_main_kernel<Kt>;
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(kernel, Kt::kSmemBytes, configured); err != cudaSuccess) return err;
  const dim3 grid((p.kv_len + Kt::kBlockN - 1) / Kt::kBlockN, p.kv_heads / p.kv_heads_per_item,
                  p.batch / p.batches_per_item);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  kernel<<<grid, Kt::kNThreads, Kt::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <int kHeadDim, bool kIsBF16>
cudaError_t launch_dq(const BwdParams& p, cudaStream_t stream) {
  using Kt = Traits<kHeadDim, kIsBF16>;
  auto kernel = flash_bwd_dq_kernel<Kt>;
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(kernel, Kt::kSmemBytesDq, configured); err != cudaSuccess) return err;
  const dim3 grid((p.q_len + Kt::kBlockM - 1) / Kt::kBlockM, p.heads, p.batch);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  kernel<<<grid, Kt::kNThreads, Kt::kSmemBytesDq, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace bwd
}  // namespace dmattn

// Explicit instantiation of both dtypes for one head dim (one .cu file per head dim).
#define DMATTN_INSTANTIATE_BWD(D)                                                      \
  namespace dmattn {                                                                   \
  template <>                                                                          \
  cudaError_t run_flash_bwd_main<D, true>(const BwdParams& p, cudaStream_t s) {        \
    return bwd::launch_main<D, true>(p, s);                                            \
  }                                                                                    \
  template <>                                                                          \
  cudaError_t run_flash_bwd_main<D, false>(const BwdParams& p, cudaStream_t s) {       \
    return bwd::launch_main<D, false>(p, s);                                           \
  }                                                                                    \
  template <>                                                                          \
  cudaError_t run_flash_bwd_dq<D, true>(const BwdParams& p, cudaStream_t s) {          \
    return bwd::launch_dq<D, true>(p, s);                                              \
  }                                                                                    \
  template <>                                                                          \
  cudaError_t run_flash_bwd_dq<D, false>(const BwdParams& p, cudaStream_t s) {         \
    return bwd::launch_dq<D, false>(p, s);                                             \
  }                                                                                    \
  }
