// Tile loads and the logits step shared by the CPU forward and backward kernels. Every tile buffer is a
// kBlockM x kBlockN (or kBlock x Dp) float32 array, zero-padded past the sequence ends and the head dim.
#pragma once
#include <algorithm>
#include <initializer_list>
#include <vector>

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

// Row i of batch b keeps keys [lo, hi) of its bounds, of its own segment: the keys n0 + c before lo get -inf here,
// *limit drops to hi - n0 (its caller clears from there on).
inline void drop_out_of_bounds(const RowBounds& bounds, int64_t b, int64_t i, int64_t n0, int64_t* limit, float* s) {
  const int32_t* row = bounds.row(b, i);
  *limit = std::min<int64_t>(*limit, std::max<int64_t>(0, row[1] - n0));
  const int64_t first = std::clamp<int64_t>(row[0] - n0, 0, *limit);
  std::fill(s, s + first, kNegInf);
  const int32_t* seg = bounds.segments(b);
  if (seg != nullptr && row[3] != 0) {
    for (int64_t c = first; c < *limit; ++c) s[c] = seg[n0 + c] == row[2] ? s[c] : kNegInf;
  }
}

// S (kBlockM x kBlockN, holding q.k) -> logits cap(scale * q.k) + bias, -inf where the key is not kept.
// Keys past the tile's end, above the causal diagonal, dropped by the mask in a partial tile, or with a -inf bias
// are not kept, whatever their q.k.
// If tanh_out is given it receives tanh(scale * q.k / softcap) (the softcap chain rule needs it).
inline void logits_tile(const AttentionParams& p, const MaskSource& mask, const TileCoord& t, float* S,
                        float* tanh_out) {
  const float scale = p.scale;
  const float cap = p.softcap;
  const int64_t off = p.causal_offset();
  for (int64_t r = 0; r < t.bm; ++r) {
    float* s = S + r * kBlockN;
    if (cap > 0.f) {  // every column, so no stale tanh is left past the tile's end
      float* th = tanh_out ? tanh_out + r * kBlockN : nullptr;
      for (int64_t c = 0; c < kBlockN; ++c) {
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
      // A -inf bias drops its key whatever q.k is (a NaN or +inf q.k plus -inf would be NaN).
      if (bias.col_stride == 0) {
        const float v = load_f32(bias.data, bias.dtype, base);
        if (v == kNegInf) {
          std::fill(s, s + t.bn, kNegInf);
        } else {
          for (int64_t c = 0; c < t.bn; ++c) s[c] += v;
        }
      } else {
        float row[kBlockN];
        load_row(bias.data, bias.dtype, base, t.bn, row);
        for (int64_t c = 0; c < t.bn; ++c) s[c] = row[c] == kNegInf ? kNegInf : s[c] + row[c];
      }
    }
    // Keys visible from row i: [n0, limit) before the mask.
    int64_t limit = t.bn;
    if (p.is_causal) limit = std::min<int64_t>(limit, std::max<int64_t>(0, i + off + 1 - t.n0));
    if (p.bounds.present() && i < p.q_len) drop_out_of_bounds(p.bounds, t.b, i, t.n0, &limit, s);
    for (int64_t c = limit; c < kBlockN; ++c) s[c] = kNegInf;
    if (t.cls == kTilePartial) mask.drop_row(t.b, t.h, i, t.n0, limit, s);
  }
  for (int64_t r = t.bm; r < kBlockM; ++r) std::fill(S + r * kBlockN, S + (r + 1) * kBlockN, kNegInf);
}

// Per (batch, head, tile of `block` rows) of [B, L, Hx, D] tensors of one dtype, [(b * Hx + head) * tiles + t]:
// 1 if no tensor in xs holds a NaN or inf there. One pass per call, so the kernels look tiles up instead of
// scanning a tile once per tile pair.
inline std::vector<uint8_t> finite_tiles(std::initializer_list<const void*> xs, DType t, int64_t B, int64_t L,
                                         int64_t Hx, int64_t D, int64_t block) {
  const int64_t tiles = ceil_div(L, block);
  std::vector<uint8_t> finite(B * Hx * tiles);
  parallel_for(B * Hx * tiles, [&](int64_t item, int) {
    const int64_t tile = item % tiles, head = (item / tiles) % Hx, b = item / (tiles * Hx);
    std::vector<float> row(D);
    bool ok = true;
    for (const void* x : xs) {
      for (int64_t r = tile * block; r < std::min(L, (tile + 1) * block) && ok; ++r) {
        const int64_t offset = ((b * L + r) * Hx + head) * D;
        if (t == DType::kF32) {
          ok = all_finite(static_cast<const float*>(x) + offset, D);
        } else {
          load_row(x, t, offset, D, row.data());
          ok = all_finite(row.data(), D);
        }
      }
    }
    finite[item] = ok;
  });
  return finite;
}

// A pair (row, key) of a logits tile is kept unless its logit is -inf: masked, causal, -inf bias or q.k = -inf.
// Tiles that hold a NaN or inf need the kept pairs explicitly, since 0 * NaN is NaN (the GEMMs would let a dropped
// pair's zero weight pick up its NaN).
inline void kept_pairs(const float* S, uint8_t* keep) {
  for (int64_t i = 0; i < kBlockM * kBlockN; ++i) keep[i] = S[i] != kNegInf;
}

// X[i] = 0 at the dropped pairs of a kBlockM x kBlockN tile (a select, so it vectorises).
inline void zero_dropped(float* X, const uint8_t* keep) {
  for (int64_t i = 0; i < kBlockM * kBlockN; ++i) X[i] = keep[i] ? X[i] : 0.f;
}

// Keys [begin, end) that query tile [m0, m0 + bm) of batch b may keep: bottom-right causality, or the row bounds.
struct Range {
  int64_t begin, end;
};
inline Range tile_key_range(const AttentionParams& p, int64_t b, int64_t m0, int64_t bm) {
  Range r{0, p.kv_len};
  if (p.is_causal) r.end = std::clamp<int64_t>(m0 + bm + p.causal_offset(), 0, p.kv_len);
  if (p.bounds.present()) {
    r.begin = std::max<int64_t>(r.begin, p.bounds.lo(b, m0));
    r.end = std::min<int64_t>(r.end, p.bounds.hi(b, m0 + bm - 1));
  }
  return r;
}

// Query rows [begin, end) of batch b that may keep a key of [n0, n1): causality, or the row bounds.
inline Range tile_row_range(const AttentionParams& p, int64_t b, int64_t n0, int64_t n1) {
  Range r{0, p.q_len};
  if (p.is_causal) r.begin = std::clamp<int64_t>(n0 - p.causal_offset(), 0, p.q_len);
  if (p.bounds.present()) {
    r.begin = p.bounds.first_row_above(b, n0, r.begin, r.end);
    r.end = p.bounds.first_row_from(b, n1, r.begin, r.end);
  }
  return r;
}

}  // namespace dmattn::cpu
