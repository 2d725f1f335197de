// The FFI handlers this extension exports, as (target name, XLA_FFI_Handler*) pairs; csrc/module.cc wraps them
// in capsules and jax_dmattn/_ffi.py registers them.
#pragma once
#include <utility>
#include <vector>

namespace dmattn {

using FfiTarget = std::pair<const char*, void*>;

std::vector<FfiTarget> cpu_targets();
// Empty unless the extension was built with CUDA (DMATTN_WITH_CUDA). The backward's handlers and the live-key
// list pre-pass live in their own translation units (csrc/ffi/cuda_bwd_handlers.cc,
// csrc/ffi/cuda_key_lists_handler.cc).
std::vector<FfiTarget> cuda_targets();
std::vector<FfiTarget> cuda_bwd_targets();
std::vector<FfiTarget> cuda_key_lists_targets();

}  // namespace dmattn
