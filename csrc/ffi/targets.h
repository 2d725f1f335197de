// The FFI handlers this extension exports, as (target name, XLA_FFI_Handler*) pairs; csrc/module.cc wraps them
// in capsules and jax_dmattn/_ffi.py registers them.
#pragma once
#include <utility>
#include <vector>

namespace dmattn {

using FfiTarget = std::pair<const char*, void*>;

std::vector<FfiTarget> cpu_targets();
// Empty unless the extension was built with CUDA (DMATTN_WITH_CUDA). The backward's handlers live in their
// own translation unit (csrc/ffi/cuda_bwd_handlers.cc).
std::vector<FfiTarget> cuda_targets();
std::vector<FfiTarget> cuda_bwd_targets();

}  // namespace dmattn
