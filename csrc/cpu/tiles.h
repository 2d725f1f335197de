// Tile loads and the logits step shared by the CPU forward and backward kernels. Every tile buffer is a
// kBlockM x kBlockN (or kBlock x Dp) float32 array, zero-padded past the sequence ends and the head dim.
#pragma once
#include <algorithm>

#include "cpu/cpu_common.h"
#include "cpu/mask_source.h"

namespace dmattn::cpu {

// Rows [r0, r0 + rows) of head `head` of a [B, L, Hx, D] tensor -> dst[block_rows][Dp] (zero padding).
inline void load_seq_tile(const void* base, DType t, int64_t L, int64_t Hx, int64_t D, int64_t b, int64_t head,
                          int64_t r0, int64_t rows, int64_t block_rows, int64_t Dp, float* dst) {
  std::fill(dst, dst + block_rows * Dp, 0.f);
  for (int64_t r = 0; r < rows; ++r) load_row(base, t, ((b * L + r0 + r) * Hx + head) * D, D, dst + r * Dp);
}

inline void store_seq_tile(void* base, DType t, int64_t L, int64_t Hx, int64_t D, int64_t b, int64_t head,
                           int64_t r0, int64_t rows, int64_t Dp, const float* src) {
  for (int64_t r = 0; r < rows; ++r) store_row(base, t, ((b * L + r0 + r) * Hx + head) * D, D, src + r * Dp);
}

// Where a tile sits: batch b, query head h, query rows [m0, m0 + bm), keys [n0, n0 + bn).
struct TileCoord {
  int64_t b, h, m0, bm, n0, bn;
  TileClass cls;
};

// S (kBlockM x kBlockN, holding q.k) -> logits cap(scale * q.k) + bias, -inf where the key is not kept.
// Keys past the tile's end, above the causal diagonal, or dropped by the mask in a partial tile are not kept.
// If tanh_out is given it receives tanh(scale * q.k / softcap) (the softcap chain rule needs it).
inline void logits_tile(const AttentionParams& p, const MaskSource& mask, const TileCoord& t, float* S,
                        float* tanh_out) {
  const float scale = p.scale;
  const float cap = p.softcap;
  const int64_t off = p.causal_offset();
  for (int64_t r = 0; r < t.bm; ++r) {
    float* s = S + r * kBlockN;
    if (cap > 0.f) {
      float* th = tanh_out ? tanh_out + r * kBlockN : nullptr;
      for (int64_t c = 0; c < t.bn; ++c) {
        const float tv = std::tanh(s[c] * scale / cap);
        if (th) th[c] = tv;
        s[c] = cap * tv;
      }
    } else {
      for (int64_t c = 0; c < kBlockN; ++c) s[c] *= scale;
    }
    const int64_t i = t.m0 + r;
    if (p.bias.present()) {
      const BroadcastOperand& bias = p.bias;
      const int64_t base = bias.offset(t.b, t.h, i, t.n0);
      if (bias.col_stride == 0) {
        const float v = load_f32(bias.data, bias.dtype, base);
        for (int64_t c = 0; c < t.bn; ++c) s[c] += v;
      } else {
        float row[kBlockN];
        load_row(bias.data, bias.dtype, base, t.bn, row);
        for (int64_t c = 0; c < t.bn; ++c) s[c] += row[c];
      }
    }
    // Keys visible from row i: [n0, limit) before the mask.
    int64_t limit = t.bn;
    if (p.is_causal) limit = std::min<int64_t>(limit, std::max<int64_t>(0, i + off + 1 - t.n0));
    for (int64_t c = limit; c < kBlockN; ++c) s[c] = kNegInf;
    if (t.cls == kPartial) mask.drop_row(t.b, t.h, i, t.n0, limit, s);
  }
  for (int64_t r = t.bm; r < kBlockM; ++r) std::fill(S + r * kBlockN, S + (r + 1) * kBlockN, kNegInf);
}

// The key range of query tile [m0, m0 + bm) under bottom-right causality: keys [0, end).
inline int64_t causal_key_end(const AttentionParams& p, int64_t m0, int64_t bm) {
  if (!p.is_causal) return p.kv_len;
  return std::clamp<int64_t>(m0 + bm + p.causal_offset(), 0, p.kv_len);
}

// First query row that sees key n0 under causality (0 without it).
inline int64_t causal_row_begin(const AttentionParams& p, int64_t n0) {
  if (!p.is_causal) return 0;
  return std::clamp<int64_t>(n0 - p.causal_offset(), 0, p.q_len);
}

}  // namespace dmattn::cpu
