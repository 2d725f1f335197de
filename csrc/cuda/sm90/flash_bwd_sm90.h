// Plain (CuTe-free) interface of the Hopper backwards (csrc/cuda/sm90/): which calls they serve and their kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/flash_bwd.h"
#include "cuda/flash_bwd_key_list.h"

namespace dmattn {

// Whether the Hopper backward serves this call on this device: built for sm_90a, a compute-capability-9.0 device, no
// bias, one constant along query rows (row stride 0: the paper's per-key bias and its broadcasts) or one with query
// rows in q's dtype whose dbias one CTA finishes (16-byte aligned rows; batch not broadcast over several, bias heads H
// or Hkv, or 1 with one kv head), row bounds or none, no mask or a bool mask beside a bias with query rows without
// row bounds (keys at unit stride, Lk a multiple of 16, 16-byte strides and base), no softcap, deterministic=False,
// head dim in
// DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM (kernel_facts.h), sizes whose element strides fit 32 bits, and
// JAX_DMATTN_CUDA_KERNELS not "sm80".
bool flash_bwd_sm90_serves(const BwdParams& params);

// Launches the Hopper main kernel: dK, dV, and dQ added to params.dq_accum. Callers check flash_bwd_sm90_serves
// first and run the rest of the backward's sequence (launch_flash_bwd): the kernel reads params.delta and does
// nothing when *params.nonfinite is set.
cudaError_t launch_flash_bwd_sm90(const BwdParams& params, cudaStream_t stream);

// How many calls launch_flash_bwd_sm90 has served in this process (tests check the route with it).
int64_t flash_bwd_sm90_launches();

// Whether the Hopper key-list backward (flash_bwd_key_list_sm90_kernel.cuh) serves this call on the key-list path:
// either mode (fp32 atomics, or deterministic=True's fixed-point counts), no softcap (its factor would cost the
// registers that keep the kernel free of spills), a non-finite word to scan into,
// head dim in DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM, on a device where the Hopper kernels may serve calls (sm90_route.h).
bool flash_bwd_key_list_sm90_serves(const BwdKeyListParams& params);

// Launches the Hopper key-list kernel: dQ, and dK / dV / dbias added to the key-list workspaces. Callers check
// flash_bwd_key_list_sm90_serves first and run the rest of the key-list sequence (launch_flash_bwd_key_list): the
// kernel reads params.base.delta and does nothing when *params.base.nonfinite is set.
cudaError_t launch_flash_bwd_key_list_sm90(const BwdKeyListParams& params, cudaStream_t stream);

// How many calls launch_flash_bwd_key_list_sm90 has served in this process.
int64_t flash_bwd_key_list_sm90_launches();

// One instantiation per (head dim, dtype), defined in the generated flash_bwd_sm90_hdim<D>.cu and
// flash_bwd_key_list_sm90_hdim<D>.cu (cmake/Cuda.cmake).
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_sm90(const BwdParams& params, cudaStream_t stream);
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_key_list_sm90(const BwdKeyListParams& params, cudaStream_t stream);

}  // namespace dmattn
