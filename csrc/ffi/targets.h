// The FFI handlers this extension exports, as (target name, XLA_FFI_Handler*) pairs; csrc/module.cc wraps them
// in capsules and jax_dmattn/_ffi.py registers them.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace dmattn {

using FfiTarget = std::pair<const char*, void*>;

std::vector<FfiTarget> cpu_targets();
// Empty unless the extension was built with CUDA (DMATTN_WITH_CUDA). The backward's handlers and the live-key
// list pre-passes live in their own translation units (csrc/ffi/cuda_bwd_handler.cc,
// csrc/ffi/cuda_key_lists_handler.cc, csrc/ffi/cuda_topk_key_lists_handler.cc).
std::vector<FfiTarget> cuda_fwd_targets();
std::vector<FfiTarget> cuda_bwd_targets();
std::vector<FfiTarget> cuda_key_lists_targets();
std::vector<FfiTarget> cuda_topk_key_lists_targets();

// Host-side runs of the CUDA handlers since the extension loaded, and how many of them found XLA recording a
// command buffer (their stream under capture). A handler inside a replayed CUDA graph does not run on the host at
// all. tests/test_cuda_command_buffers.py reads these; {0, 0} without CUDA.
struct CudaHandlerRuns {
  int64_t runs = 0;
  int64_t captured = 0;
};
CudaHandlerRuns cuda_handler_runs();

}  // namespace dmattn
