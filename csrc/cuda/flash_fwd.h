// Plain (CuTe-free) interface of the CUDA flash forward: the parameter block and the launcher. Included by the
// FFI handler TU, which must not see CuTe headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "attention_params.h"
#include "row_bounds.h"
#include "kernel_facts.h"

namespace dmattn {

struct FwdParams {
  // q [B, Lq, H, D], k/v [B, Lk, Hkv, D], out [B, Lq, H, D] (element strides), lse [B, H, Lq] f32.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int batch = 0, heads = 0, kv_heads = 0, q_len = 0, kv_len = 0, head_dim = 0;
  int group = 1;  // H / Hkv
  bool is_bf16 = true;

  float scale = 1.f;
  float softcap = 0.f;  // 0: off
  bool is_causal = false;
  // Segment ids, window, lengths (row_bounds.h): the tile path and the Hopper forward; with them is_causal is false.
  RowBounds bounds;

  // Broadcastable bias [Bb, Hb, Mb, Nb]: element strides, 0 on broadcast dims; bias head = h / bias_hdiv.
  const void* bias = nullptr;
  DType bias_dtype = DType::kF32;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;
  int bias_hdiv = 1;

  // Broadcastable bool mask, same rule.
  const uint8_t* mask = nullptr;
  int64_t mask_batch_stride = 0, mask_head_stride = 0, mask_row_stride = 0, mask_col_stride = 0;
  int mask_hdiv = 1;

  // Tile classes [Bm, Hm, ceil(Mm / BlockM), ceil(Nm / BlockN)] (strides 0 on broadcast dims); nullptr: none.
  const uint8_t* classes = nullptr;
  int64_t cls_batch_stride = 0, cls_head_stride = 0, cls_m_stride = 0, cls_n_stride = 0;
  bool skip_empty_tiles = true;  // false: every mask tile is treated as partial (for bitwise tests)

  // Live-key lists of the mask (csrc/cuda/key_lists.h); when set the kernel walks them instead of key tiles.
  // Unit of (b, h, query tile) = b * kl_batch_stride + (h / mask_hdiv) * kl_head_stride + m * kl_m_stride.
  // A unit whose first word is kKeyListDense walks every key and reads the mask (p.mask) itself.
  const int32_t* key_lists = nullptr;  // [units, kl_keys_stride]
  const uint64_t* key_bits = nullptr;  // [units, capacity / 64, kb_rows]
  int64_t kl_batch_stride = 0, kl_head_stride = 0, kl_m_stride = 0;
  int64_t kl_keys_stride = 0;  // 1 + capacity
  int64_t kb_unit_stride = 0;  // capacity / 64 * kb_rows
  int kb_rows = 0;             // rows per unit: 128, or 1 for a row-broadcast mask
};

// Launches the forward for params.head_dim in {32, 64, 96, 128, 192, 256} and params.is_bf16.
cudaError_t launch_flash_fwd(const FwdParams& params, cudaStream_t stream);

// One instantiation per (head dim, dtype), defined in the generated flash_fwd_hdim<D>.cu (cmake/Cuda.cmake).
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_fwd(const FwdParams& params, cudaStream_t stream);

}  // namespace dmattn
