// One element of a bias or dbias stored in its own dtype (f32, bf16, f16: DType of attention_params.h, as FwdParams
// and BwdParams carry it): read through the read-only cache as fp32 (the template serves loops that dispatch on the
// dtype once, outside the loop; the runtime form dispatches per element), stored rounded to nearest, and added to
// a logit by the rule every kernel shares.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention_params.h"
#include "log_constants.h"

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

// The bits of one element as stored (f32: 32; bf16 / f16: 16, zero-extended), or 0 where !pred, read by predicated
// loads with no branch. A loop that reads a bias a step ahead of its use keeps these bits and converts them where it
// uses them (bias_of_bits): converted next to its load, inside the dtype dispatch, the value would be waited for there.
__device__ __forceinline__ uint32_t load_bias_bits(const void* base, int64_t off, DType dtype, bool pred) {
  const bool wide = dtype == DType::kF32;
  const char* addr = static_cast<const char*>(base) + off * (wide ? 4 : 2);
  uint32_t bits;
  asm volatile(
      "{\n\t.reg .pred pw, pn;\n\t"
      "setp.ne.b32 pw, %2, 0;\n\t"
      "setp.ne.b32 pn, %3, 0;\n\t"
      "mov.b32 %0, 0;\n\t"
      "@pw ld.global.nc.b32 %0, [%1];\n\t"
      "@pn ld.global.nc.u16 %0, [%1];\n\t"
      "}"
      : "=r"(bits)
      : "l"(addr), "r"(int(pred && wide)), "r"(int(pred && !wide)));
  return bits;
}

// The value of load_bias_bits' bits (0 bits: 0).
__device__ __forceinline__ float bias_of_bits(uint32_t bits, DType dtype) {
  if (dtype == DType::kBF16) return __uint_as_float(bits << 16);
  if (dtype == DType::kF16) return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  return __uint_as_float(bits);
}

__device__ __forceinline__ void store_bias(void* base, int64_t off, DType dtype, float v) {
  if (dtype == DType::kBF16) {
    static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(v);
  } else if (dtype == DType::kF16) {
    static_cast<__half*>(base)[off] = __float2half_rn(v);
  } else {
    static_cast<float*>(base)[off] = v;
  }
}

// A -inf bias drops the key whatever the logit is (even an inf or NaN q.k).
__device__ __forceinline__ float add_bias(float logit, float bias) {
  return bias == -INFINITY ? -INFINITY : logit + bias;
}

// The same rule for a base-2 logit (the natural one times log2 e, as the Hopper forward works): one fused
// multiply-add, logit2 + bias log2 e, rounded once.
__device__ __forceinline__ float add_bias_log2(float logit2, float bias) {
  return bias == -INFINITY ? -INFINITY : fmaf(bias, kLog2e, logit2);
}

}  // namespace dmattn
