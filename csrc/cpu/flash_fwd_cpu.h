#pragma once
#include "attention_params.h"

namespace dmattn::cpu {

// out [B, Lq, H, D] (params.dtype), lse [B, H, Lq] float32 (natural log; -inf for rows with no kept key).
void flash_fwd(const AttentionParams& params, const void* q, const void* k, const void* v, void* out, float* lse);

}  // namespace dmattn::cpu
