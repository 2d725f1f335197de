// fp32 to and from the kernels' 2-byte float types, for device code templated on the type (flash_bwd_dispatch.cu,
// flash_fwd_key_list_rows.cu, sm90/flash_fwd_exact_rows.cu, the Hopper mainloops' bias tiles). Rounding to nearest
// even, as the kernels store their outputs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace dmattn {

template <class T>
__device__ __forceinline__ float to_f32(T x) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return __half2float(x);
}

template <class T>
__device__ __forceinline__ T from_f32(float x) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return __float2half_rn(x);
}

// The value of the bf16 (kBF16) or fp16 element in the low 16 bits of `bits`: shared-memory tiles are read a 32-bit
// word (two elements) at a time, and the high element is half_bits_to_f32(word >> 16).
template <bool kBF16>
__device__ __forceinline__ float half_bits_to_f32(uint32_t bits) {
  if constexpr (kBF16) return __uint_as_float(bits << 16);
  else return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

}  // namespace dmattn
