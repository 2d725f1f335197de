// CUDA FFI handlers of the backward pass (kept apart from the forward's, csrc/ffi/cuda_handlers.cc).
// No CuTe includes here: kernels are reached through plain launch functions.
#include "ffi/targets.h"

namespace dmattn {

std::vector<FfiTarget> cuda_bwd_targets() { return {}; }

}  // namespace dmattn
