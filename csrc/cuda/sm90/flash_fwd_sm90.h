// Plain (CuTe-free) interface of the Hopper forward (csrc/cuda/sm90/): which calls it serves and its launcher.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/flash_fwd.h"

namespace dmattn {

// Whether the Hopper forward serves this call on this device: built for sm_90a, a compute-capability-9.0 device, no
// mask (bool, key lists or tile classes), any bias, row bounds or none, head dim in
// DMATTN_FOR_EACH_SM90_HEAD_DIM (kernel_facts.h), TMA-compatible strides (unit stride along D, the others 16-byte
// multiples that fit in 32 bits), and JAX_DMATTN_CUDA_KERNELS not "sm80" (tests and benchmarks force the sm80
// kernels with it).
bool flash_fwd_sm90_serves(const FwdParams& params);

// Whether the Hopper forward serves the tile units (key_list_unit_on_tiles: dense units, lists of most visible keys)
// of this key-list call (flash_fwd_key_list_sm90_serves's calls with a bool mask): no row bounds, the mask's keys at unit stride and its rows 16-byte aligned, the operands as for
// flash_fwd_sm90_serves. launch_flash_fwd_key_list_sm90 asks it.
bool flash_fwd_sm90_serves_tile_units(const FwdParams& params);

// How many key-list calls had their tile units served by the Hopper forward in this process.
int64_t flash_fwd_sm90_tile_unit_launches();

// Launches the Hopper forward (one launch over every query head); callers check flash_fwd_sm90_serves first.
cudaError_t launch_flash_fwd_sm90(const FwdParams& params, cudaStream_t stream);

// Recomputes, over their kept keys only, the rows the Hopper forward marked with lse = +inf (an inf or NaN of V
// reached them through P V); launch_flash_fwd_sm90 runs it after the kernels.
cudaError_t launch_flash_fwd_exact_rows(const FwdParams& params, cudaStream_t stream);

// How many calls launch_flash_fwd_sm90 has served in this process (tests check the route with it).
int64_t flash_fwd_sm90_launches();

// Whether the Hopper key-list forward (flash_fwd_key_list_sm90_kernel.cuh) serves this call: a call on the key-list
// path (live-key lists of a bool mask or of a compact mask), head dim in DMATTN_FOR_EACH_SM90_HEAD_DIM, on a device
// where the Hopper kernels may serve calls (sm90_route.h).
bool flash_fwd_key_list_sm90_serves(const FwdParams& params);

// Launches the Hopper key-list forward, and the Hopper forward over the tile units where it serves them
// (flash_fwd_sm90_serves_tile_units); callers check flash_fwd_key_list_sm90_serves first.
cudaError_t launch_flash_fwd_key_list_sm90(const FwdParams& params, cudaStream_t stream);

// How many calls launch_flash_fwd_key_list_sm90 has served in this process.
int64_t flash_fwd_key_list_sm90_launches();

// One instantiation per (head dim, dtype), defined in the generated flash_fwd_sm90_hdim<D>.cu and
// flash_fwd_key_list_sm90_hdim<D>.cu (cmake/Cuda.cmake).
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_fwd_sm90(const FwdParams& params, cudaStream_t stream);
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_fwd_key_list_sm90(const FwdParams& params, cudaStream_t stream);

}  // namespace dmattn
