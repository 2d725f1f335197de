// CPU flash-attention forward: one work item per (batch, query head, query tile), online softmax over key
// tiles in float32. Empty mask tiles are skipped before any load; full tiles read no mask. A NaN or +inf logit
// makes its row NaN; a dropped key never reaches a row, even with NaN or inf values (see kept_pairs).
#include "cpu/flash_fwd_cpu.h"

#include <vector>

#include "cpu/tiles.h"

namespace dmattn::cpu {

void flash_fwd(const AttentionParams& p, const void* q, const void* k, const void* v, void* out, float* lse) {
  const int64_t D = p.head_dim, Dp = round_up(D, 16), g = p.group();
  const int64_t m_tiles = ceil_div(p.q_len, kBlockM), kv_tiles = ceil_div(p.kv_len, kBlockN);
  const MaskSource mask(p);
  const MaskTileMap classes(mask);
  const std::vector<uint8_t> v_finite = finite_tiles({v}, p.dtype, p.batch, p.kv_len, p.kv_heads, D, kBlockN);

  parallel_for(p.batch * p.heads * m_tiles, [&](int64_t item, int) {
    const int64_t mt = item % m_tiles;
    const int64_t h = (item / m_tiles) % p.heads;
    const int64_t b = item / (m_tiles * p.heads);
    const int64_t kvh = h / g;
    const int64_t m0 = mt * kBlockM, bm = std::min<int64_t>(kBlockM, p.q_len - m0);

    const int64_t q_tile = kBlockM * Dp, kv_tile = kBlockN * Dp, s_tile = kBlockM * kBlockN;
    // row_max: the running max of the logits
    auto [Q, O, K, Kt, V, S, row_max, row_sum] = thread_scratch({q_tile, q_tile, kv_tile, kv_tile, kv_tile, s_tile,
                                                                 int64_t(kBlockM), int64_t(kBlockM)});
    uint8_t keep[kBlockM * kBlockN];

    load_seq_tile(q, p.dtype, p.q_len, p.heads, D, b, h, m0, bm, kBlockM, Dp, Q);
    std::fill(O, O + kBlockM * Dp, 0.f);
    std::fill(row_max, row_max + kBlockM, kNegInf);
    std::fill(row_sum, row_sum + kBlockM, 0.f);

    const Range keys = tile_key_range(p, b, m0, bm);
    for (int64_t nt = keys.begin / kBlockN; nt < ceil_div(keys.end, kBlockN); ++nt) {
      const TileClass cls = classes.at(b, h, mt, nt);
      if (cls == kTileEmpty) continue;
      const int64_t n0 = nt * kBlockN, bn = std::min<int64_t>(kBlockN, p.kv_len - n0);
      load_seq_tile(k, p.dtype, p.kv_len, p.kv_heads, D, b, kvh, n0, bn, kBlockN, Dp, K);
      load_seq_tile(v, p.dtype, p.kv_len, p.kv_heads, D, b, kvh, n0, bn, kBlockN, Dp, V);
      transpose(kBlockN, Dp, K, Dp, Kt, kBlockN);
      // A NaN or inf in K reaches only kept logits (logits_tile overwrites the others); one in V would reach every
      // row through P V unless the dropped pairs are cut out.
      const bool finite = v_finite[(b * p.kv_heads + kvh) * kv_tiles + nt];

      std::fill(S, S + kBlockM * kBlockN, 0.f);
      gemm_acc(kBlockM, kBlockN, Dp, Q, Dp, Kt, kBlockN, S, kBlockN);
      logits_tile(p, mask, TileCoord{b, h, m0, bm, n0, bn, cls}, S, nullptr);
      if (!finite) kept_pairs(S, keep);

      for (int64_t r = 0; r < kBlockM; ++r) {
        float* s = S + r * kBlockN;
        const float new_max = nan_max(row_max[r], lane_max(s, kBlockN));
        if (new_max == kNegInf) {  // nothing kept in this row so far
          std::fill(s, s + kBlockN, 0.f);
          continue;
        }
        if (!(new_max < INFINITY)) {  // a NaN or +inf logit: the row is NaN (P V makes O so)
          std::fill(s, s + kBlockN, NAN);
          row_max[r] = row_sum[r] = NAN;
          continue;
        }
        // Subtract, then scale: s - max is exact near the max, so the top term is exactly 1 at any magnitude (a
        // fused s * log2e - max could exceed 0 there).
        for (int64_t c = 0; c < kBlockN; ++c) s[c] = exp2_nonpositive((s[c] - new_max) * kLog2e);
        const float sum = lane_sum(s, kBlockN);
        if (new_max != row_max[r]) {
          const float corr = exp2_nonpositive((row_max[r] - new_max) * kLog2e);
          float* o = O + r * Dp;
          for (int64_t d = 0; d < Dp; ++d) o[d] *= corr;
          row_sum[r] *= corr;
          row_max[r] = new_max;
        }
        row_sum[r] += sum;
      }
      gemm_acc_kept(kBlockM, Dp, kBlockN, S, kBlockN, V, Dp, O, Dp, finite ? nullptr : keep, kBlockN, 1);
    }

    float* lse_row = lse + (b * p.heads + h) * p.q_len + m0;
    for (int64_t r = 0; r < bm; ++r) {
      float* o = O + r * Dp;
      if (row_max[r] == kNegInf) {  // no kept key
        std::fill(o, o + D, 0.f);
        lse_row[r] = kNegInf;
      } else {  // row_sum >= 1 (the max term), or NaN
        const float inv = 1.f / row_sum[r];
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        lse_row[r] = row_max[r] + std::log(row_sum[r]);
      }
    }
    store_seq_tile(out, p.dtype, p.q_len, p.heads, D, b, h, m0, bm, Dp, O);
  });
}

}  // namespace dmattn::cpu
