// One element of a bias stored in its own dtype (f32, bf16, f16), read through the read-only cache as fp32.
// The forward and the backward tag the dtype with their own enums (flash_fwd.h, flash_bwd.h, which the FFI
// handlers fill); the codes are the same, which the asserts below hold them to.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/flash_bwd.h"
#include "cuda/flash_fwd.h"

namespace dmattn {

static_assert(int(kBiasF32) == int(kBwdBiasF32) && int(kBiasBF16) == int(kBwdBiasBF16) &&
                  int(kBiasF16) == int(kBwdBiasF16),
              "load_bias reads both the forward's and the backward's bias_dtype");

__device__ __forceinline__ float load_bias(const void* base, int64_t off, int dtype) {
  if (dtype == kBiasBF16) {
    const uint16_t bits = __ldg(static_cast<const unsigned short*>(base) + off);
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  }
  if (dtype == kBiasF16) return __half2float(__ldg(static_cast<const __half*>(base) + off));
  return __ldg(static_cast<const float*>(base) + off);
}

}  // namespace dmattn
