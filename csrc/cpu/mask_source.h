// Which keys a query row keeps, whatever form the mask came in (MaskKind, attention_params.h). The kernels ask it
// for the rows of a partial tile and MaskTileMap asks it for tile classes, so neither depends on the form, and no
// form is ever expanded to the [Lq, Lk] bool mask it stands for.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/cpu_common.h"

namespace dmattn::cpu {

class MaskSource {
 public:
  explicit MaskSource(const AttentionParams& p)
      : kind_(p.mask_kind), mask_(p.mask), threshold_(p.row_threshold), threshold_key_(p.row_threshold_key),
        q_len_(p.q_len), kv_len_(p.kv_len) {}

  // False only for an absent bool mask, which keeps every key: then there are no tile classes to compute.
  bool restricts() const { return kind_ != MaskKind::kBool || mask_.present(); }

  // The grid tile classes live in: the mask's own batch and heads, and its query rows and keys, 1 where it is
  // broadcast. The compact forms always span every key, and top-k every query row (through its thresholds).
  struct Extent {
    int64_t batch, heads, rows, cols, heads_per_index;
  };
  Extent extent() const {
    switch (kind_) {
      case MaskKind::kTopK: return {mask_.batch, mask_.heads, q_len_, kv_len_, mask_.heads_per_index};
      case MaskKind::kKeyIndices: return {mask_.batch, mask_.heads, mask_.rows, kv_len_, mask_.heads_per_index};
      default: return {mask_.batch, mask_.heads, mask_.rows, mask_.cols, mask_.heads_per_index};
    }
  }

  // Class of rows [r0, r1) x keys [c0, c1) of batch-head bh (mask batch * extent().heads + mask head) in
  // extent()'s grid. Never kTileFull or kTileEmpty where it could be wrong; kTilePartial is always safe. Defined next to
  // MaskTileMap (tile_classes_cpu.cc), its only caller.
  TileClass classify(int64_t bh, int64_t r0, int64_t r1, int64_t c0, int64_t c1) const;

  // s[c] = -inf for every key n0 + c, c < limit, that query row i of (batch b, query head h) does not keep.
  void drop_row(int64_t b, int64_t h, int64_t i, int64_t n0, int64_t limit, float* s) const {
    switch (kind_) {
      case MaskKind::kTopK: drop_row_top_k(b, h, i, n0, limit, s); break;
      case MaskKind::kKeyIndices: drop_row_key_indices(b, h, i, n0, limit, s); break;
      default: drop_row_bool(b, h, i, n0, limit, s);
    }
  }

 private:
  void drop_row_bool(int64_t b, int64_t h, int64_t i, int64_t n0, int64_t limit, float* s) const {
    const bool* m = static_cast<const bool*>(mask_.data) + mask_.offset(b, h, i, n0);
    if (mask_.col_stride == 0) {  // constant along keys: the whole row is kept or not
      if (!m[0]) std::fill(s, s + limit, kNegInf);
    } else {  // a select, not a branch, so it vectorises
      for (int64_t c = 0; c < limit; ++c) s[c] = m[c] ? s[c] : kNegInf;
    }
  }

  void drop_row_top_k(int64_t b, int64_t h, int64_t i, int64_t n0, int64_t limit, float* s) const {
    const float* score = static_cast<const float*>(mask_.data) + mask_.offset(b, h, 0, n0);
    const float t = static_cast<const float*>(threshold_.data)[threshold_.offset(b, h, i, 0)];
    // Ties with the threshold are kept up to key jt, i.e. up to tile column jt - n0.
    const int64_t last_tie =
        static_cast<const int32_t*>(threshold_key_.data)[threshold_key_.offset(b, h, i, 0)] - n0;
    for (int64_t c = 0; c < limit; ++c) {
      const bool keep = score[c] > t || (score[c] == t && c <= last_tie);
      s[c] = keep ? s[c] : kNegInf;
    }
  }

  void drop_row_key_indices(int64_t b, int64_t h, int64_t i, int64_t n0, int64_t limit, float* s) const {
    const int32_t* keys = static_cast<const int32_t*>(mask_.data) + mask_.offset(b, h, i, 0);
    const int32_t* end = keys + mask_.cols;
    int64_t c = 0;  // columns before c are settled
    for (const int32_t* k = std::lower_bound(keys, end, n0); k != end && *k < n0 + limit; ++k) {
      const int64_t kept = *k - n0;
      if (kept < c) continue;  // a repeated key (the contract rules it out, but it must not read out of range)
      std::fill(s + c, s + kept, kNegInf);
      c = kept + 1;
    }
    std::fill(s + c, s + limit, kNegInf);
  }

  MaskKind kind_;
  BroadcastOperand mask_, threshold_, threshold_key_;
  int64_t q_len_, kv_len_;
};

}  // namespace dmattn::cpu
