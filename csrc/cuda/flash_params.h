// The parameter chain of the CUDA kernels, as FlashAttention-2's: QkvParams (the inputs and their sizes) ->
// CallParams (the logit rule, bias, mask, tile classes and row bounds: all that a forward and its backward read
// alike) -> FwdParams (flash_fwd.h) / BwdParams (flash_bwd.h). The CUDA handlers fill CallParams with one function
// (csrc/ffi/cuda_handler_common.h: set_call_params), so the backward's setup starts from the forward's. CuTe-free.
#pragma once
#include <cstdint>

#include "attention_params.h"
#include "row_bounds.h"

namespace dmattn {

struct QkvParams {
  // q [B, Lq, H, D], k / v [B, Lk, Hkv, D] (strides: FwdParams; the backward's layouts are contiguous).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int batch = 0, heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0;
  int group = 1;  // H / Hkv
  bool is_bf16 = true;
};

struct CallParams : QkvParams {
  float scale = 1.f;
  float softcap = 0.f;  // 0: off
  bool is_causal = false;
  // Segment ids, window, lengths (row_bounds.h): the key-tile kernels and the Hopper kernels without a mask; with
  // them is_causal is false (the bounds hold causality).
  RowBounds bounds;

  // Broadcastable bias [Bb, Hb, Mb, Nb]: element strides, 0 on broadcast dims; bias head of query head h is
  // h / bias_hdiv. nullptr: none.
  const void* bias = nullptr;
  DType bias_dtype = DType::kF32;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;
  int bias_hdiv = 1;

  // Broadcastable bool mask, same rule. nullptr: none.
  const uint8_t* mask = nullptr;
  int64_t mask_batch_stride = 0, mask_head_stride = 0, mask_row_stride = 0, mask_col_stride = 0;
  int mask_hdiv = 1;

  // Tile classes of the mask at the kernel's tile shape (kFwdBlockM x kFwdBlockN for the forward, kBwdBlockM x
  // kBwdBlockN for the backward), strides 0 on broadcast dims; nullptr: none (every tile full).
  const uint8_t* classes = nullptr;
  int64_t cls_batch_stride = 0, cls_head_stride = 0, cls_m_stride = 0, cls_n_stride = 0;
};

// Whether the call's bias rows can be copied in 16-byte pieces (the Hopper kernels' bias tiles: TMA boxes in the
// forward, cp.async copies in the backward): 2-byte elements, keys at unit stride, every stride a multiple of 16
// bytes (a broadcast dim's is 0) and the base 16-byte aligned.
inline bool bias_rows_in_16_byte_pieces(const CallParams& p) {
  auto aligned = [](int64_t elems) { return (2 * elems) % 16 == 0; };
  return p.bias != nullptr && p.bias_dtype != DType::kF32 && p.bias_col_stride == 1 && aligned(p.bias_row_stride) &&
         aligned(p.bias_head_stride) && aligned(p.bias_batch_stride) &&
         (reinterpret_cast<uintptr_t>(p.bias) & 15) == 0;
}

// Whether the call's bool mask rows can be read in 16-byte pieces (the Hopper kernels' mask reads: TMA boxes in the
// forward, 16-byte loads in the backward): keys at unit stride, every stride a multiple of 16 bytes (a broadcast
// dim's is 0) and the base 16-byte aligned.
inline bool mask_rows_in_16_byte_pieces(const CallParams& p) {
  auto aligned = [](int64_t bytes) { return bytes % 16 == 0; };
  return p.mask != nullptr && p.mask_col_stride == 1 && aligned(p.mask_row_stride) && aligned(p.mask_head_stride) &&
         aligned(p.mask_batch_stride) && (reinterpret_cast<uintptr_t>(p.mask) & 15) == 0;
}

}  // namespace dmattn
