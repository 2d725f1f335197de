// One element of a bias stored in its own dtype (f32, bf16, f16: DType of attention_params.h, as FwdParams and
// BwdParams carry it), read through the read-only cache as fp32. The template serves loops that dispatch on the
// dtype once, outside the loop; the runtime form dispatches per element.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "attention_params.h"

namespace dmattn {

template <DType kDtype>
__device__ __forceinline__ float load_bias(const void* base, int64_t off) {
  if constexpr (kDtype == DType::kBF16) {
    const uint16_t bits = __ldg(static_cast<const unsigned short*>(base) + off);
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else if constexpr (kDtype == DType::kF16) {
    return __half2float(__ldg(static_cast<const __half*>(base) + off));
  } else {
    return __ldg(static_cast<const float*>(base) + off);
  }
}

__device__ __forceinline__ float load_bias(const void* base, int64_t off, DType dtype) {
  if (dtype == DType::kBF16) return load_bias<DType::kBF16>(base, off);
  if (dtype == DType::kF16) return load_bias<DType::kF16>(base, off);
  return load_bias<DType::kF32>(base, off);
}

}  // namespace dmattn
