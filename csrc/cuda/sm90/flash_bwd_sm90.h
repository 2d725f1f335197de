// Plain (CuTe-free) interface of the Hopper backward (csrc/cuda/sm90/): which calls it serves and its main kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/flash_bwd.h"

namespace dmattn {

// Whether the Hopper backward serves this call on this device: built for sm_90a, a compute-capability-9.0 device, no
// mask (bool or tile classes), no bias or one constant along query rows (row stride 0: the paper's per-key bias and
// its broadcasts), no softcap, deterministic=False, head dim in DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM
// (kernel_facts.h), sizes whose element strides fit 32 bits, and JAX_DMATTN_CUDA_KERNELS not "sm80".
bool flash_bwd_sm90_serves(const BwdParams& params);

// Launches the Hopper main kernel: dK, dV, and dQ added to params.dq_accum. Callers check flash_bwd_sm90_serves
// first and run the rest of the backward's sequence (launch_flash_bwd): the kernel reads params.delta and does
// nothing when *params.nonfinite is set.
cudaError_t launch_flash_bwd_sm90(const BwdParams& params, cudaStream_t stream);

// How many calls launch_flash_bwd_sm90 has served in this process (tests check the route with it).
int64_t flash_bwd_sm90_launches();

// One instantiation per (head dim, dtype), defined in the generated flash_bwd_sm90_hdim<D>.cu (cmake/Cuda.cmake).
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_sm90(const BwdParams& params, cudaStream_t stream);

}  // namespace dmattn
