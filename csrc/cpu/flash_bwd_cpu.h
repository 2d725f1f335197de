#pragma once
#include "attention_params.h"

namespace dmattn::cpu {

// Gradients of flash_fwd. dlse is the cotangent of lse ([B, H, Lq] float32). dbias has the bias's own shape and
// dtype (nullptr when there is no bias). The result is bitwise reproducible for a given thread count.
void flash_bwd(const AttentionParams& params, const void* q, const void* k, const void* v, const void* out,
               const float* lse, const void* dout, const float* dlse, void* dq, void* dk, void* dv, void* dbias);

}  // namespace dmattn::cpu
