// Whether the Hopper kernels (csrc/cuda/sm90/) may serve calls on the current device; each kernel family adds its
// own rules about the call (flash_fwd_sm90_serves, flash_bwd_sm90_serves).
#pragma once

namespace dmattn {

// A compute-capability-9.0 device (sm_90a code runs there only) and JAX_DMATTN_CUDA_KERNELS not "sm80" (tests and
// benchmarks force the sm80 kernels with it). Asked per call: the device can change between calls of one process.
bool sm90_kernels_route_open();

}  // namespace dmattn
