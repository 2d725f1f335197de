// Shapes, broadcast strides and flags of one attention call (AttentionParams: what the CPU kernels take), and the
// broadcast-operand strides every FFI handler derives from the canonical FFI layout (docs/design.md): the CPU
// handlers fill AttentionParams with them, the CUDA handlers their kernels' FwdParams / BwdParams.
#pragma once
#include <cstdint>

#include "row_bounds.h"

namespace dmattn {

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// How AttentionParams::mask says which keys a query row keeps; the values are the FFI attribute `mask_kind`.
// kBool: a broadcastable bool mask. kTopK: f32 key scores [Bs, Hs, 1, Lk]; row i keeps key j iff
// s[j] > t[i] || (s[j] == t[i] && j <= jt[i]) with t = row_threshold, jt = row_threshold_key (t = -inf keeps
// every key). kKeyIndices: s32 [Bm, Hm, Mq, K], each row the kept keys ascending, padded with values >= Lk.
enum class MaskKind : int { kBool = 0, kTopK = 1, kKeyIndices = 2 };

// A rank-4 broadcastable operand ([Bx, Hx, Mx, Nx] with each dim 1 or full). Strides are in elements and are 0
// on broadcast dims, so `offset(b, h, i, j)` works for any (b, query head, query row, key) without branches.
struct BroadcastOperand {
  const void* data = nullptr;   // nullptr: operand absent
  DType dtype = DType::kF32;
  int64_t batch = 1, heads = 1, rows = 1, cols = 1;              // its own shape
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0, col_stride = 0;
  int64_t heads_per_index = 1;  // query heads that share one of its heads: H / heads

  bool present() const { return data != nullptr; }
  int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return b * batch_stride + (h / heads_per_index) * head_stride + i * row_stride + j * col_stride;
  }
  int64_t size() const { return batch * heads * rows * cols; }
};

inline BroadcastOperand make_broadcast_operand(const void* data, DType dtype, const int64_t dims[4],
                                               int64_t num_query_heads) {
  BroadcastOperand op;
  op.data = data;
  op.dtype = dtype;
  op.batch = dims[0];
  op.heads = dims[1];
  op.rows = dims[2];
  op.cols = dims[3];
  op.col_stride = op.cols == 1 ? 0 : 1;
  op.row_stride = op.rows == 1 ? 0 : op.cols;
  op.head_stride = op.heads == 1 ? 0 : op.rows * op.cols;
  op.batch_stride = op.batch == 1 ? 0 : op.heads * op.rows * op.cols;
  op.heads_per_index = num_query_heads / op.heads;
  return op;
}

struct AttentionParams {
  int64_t batch = 0, q_len = 0, kv_len = 0, heads = 0, kv_heads = 0, head_dim = 0;
  DType dtype = DType::kF32;      // dtype of q, k, v, out and their gradients
  float scale = 1.f;
  float softcap = 0.f;            // 0: off
  bool is_causal = false;
  BroadcastOperand bias, mask;
  MaskKind mask_kind = MaskKind::kBool;
  // kTopK only: f32 / s32 [Bs, Hs, Lq, 1], the batch and heads of the scores in `mask`.
  BroadcastOperand row_threshold, row_threshold_key;
  // Segment ids, window, lengths (row_bounds.h); with them is_causal is false (the bounds hold causality).
  RowBounds bounds;

  int64_t group() const { return heads / kv_heads; }
  // Bottom-right causal: key j is visible from query i iff j <= i + causal_offset().
  int64_t causal_offset() const { return kv_len - q_len; }
};

}  // namespace dmattn
