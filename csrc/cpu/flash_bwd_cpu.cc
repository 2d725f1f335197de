// CPU flash-attention backward, FlashAttention-2 style: one work item per key tile (and per batch / kv head
// unless the bias is broadcast across them), looping over every query head of the GQA group and every query
// tile that sees the key tile. dk / dv of the whole group accumulate in the item; dbias columns of the key tile
// belong to exactly one item, so they are reduced there without atomics; dq accumulates in per-thread float32
// buffers that are summed in thread order at the end. Items run on a static schedule, so the result is
// bitwise reproducible. A tile that reads a NaN or inf (in q, k, v, dout, lse or delta) keeps its dropped pairs
// out of every product, so the value reaches exactly the gradients it touches (see kept_pairs).
#include "cpu/flash_bwd_cpu.h"

#include <vector>

#include "cpu/tiles.h"

namespace dmattn::cpu {
namespace {

int64_t dtype_size(DType t) { return t == DType::kF32 ? 4 : 2; }

// delta[b, h, i] = sum_d dout * out - dlse: the row term of dS = P * (dP - delta).
std::vector<float> row_deltas(const AttentionParams& p, const void* out, const void* dout, const float* dlse) {
  const int64_t D = p.head_dim;
  std::vector<float> delta(p.batch * p.heads * p.q_len);
  parallel_for(p.batch * p.q_len, [&](int64_t bi, int) {
    const int64_t b = bi / p.q_len, i = bi % p.q_len;
    std::vector<float> o(D), d_o(D);
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t off = (bi * p.heads + h) * D;
      load_row(out, p.dtype, off, D, o.data());
      load_row(dout, p.dtype, off, D, d_o.data());
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += o[d] * d_o[d];
      const int64_t row = (b * p.heads + h) * p.q_len + i;
      delta[row] = acc - dlse[row];
    }
  });
  return delta;
}

}  // namespace

void flash_bwd(const AttentionParams& p, const void* q, const void* k, const void* v, const void* out,
               const float* lse, const void* dout, const float* dlse, void* dq, void* dk, void* dv, void* dbias) {
  const int64_t D = p.head_dim, Dp = round_up(D, 16), g = p.group();
  const int64_t m_tiles = ceil_div(p.q_len, kBlockM), n_tiles = ceil_div(p.kv_len, kBlockN);
  const MaskSource mask(p);
  const MaskTileMap classes(mask);
  const std::vector<float> delta = row_deltas(p, out, dout, dlse);
  const BroadcastOperand& bias = p.bias;
  // Tiles free of NaN and inf: a key tile (k, v) and a query tile (q, dout, lse, delta) that both are take the
  // plain GEMMs; any other pair cuts its dropped pairs out of every product.
  const std::vector<uint8_t> kv_finite = finite_tiles({k, v}, p.dtype, p.batch, p.kv_len, p.kv_heads, D, kBlockN);
  std::vector<uint8_t> q_finite = finite_tiles({q, dout}, p.dtype, p.batch, p.q_len, p.heads, D, kBlockM);
  for (int64_t row = 0; row < p.batch * p.heads * p.q_len; ++row) {  // row = (b * H + h) * Lq + i
    const bool ok = !std::isnan(lse[row]) && std::isfinite(delta[row]);
    if (!ok) q_finite[row / p.q_len * m_tiles + row % p.q_len / kBlockM] = 0;
  }

  // A bias constant along keys shifts every logit of a row equally; softmax cancels it, so its gradient is 0.
  const bool has_dbias = bias.present() && bias.cols > 1;
  if (bias.present() && !has_dbias) std::memset(dbias, 0, bias.size() * dtype_size(bias.dtype));
  // An item owns whole dbias columns: it spans every batch / kv head that shares one bias batch / head.
  const int64_t batches_per_item = (has_dbias && bias.batch == 1) ? p.batch : 1;
  const int64_t kv_heads_per_item = (has_dbias && bias.heads == 1) ? p.kv_heads : 1;
  const int64_t items = (p.batch / batches_per_item) * (p.kv_heads / kv_heads_per_item) * n_tiles;
  // Each dbias element gets one dS value (full bias): write it straight out. Else reduce in a float32 scratch.
  const bool dbias_direct = has_dbias && bias.batch == p.batch && bias.heads == p.heads && bias.rows == p.q_len;

  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), items));
  const int64_t q_elems = p.batch * p.q_len * p.heads * D;
  std::vector<std::vector<float>> dq_partial(std::max(threads, 1));

  parallel_for(items, [&](int64_t item, int thread) {
    std::vector<float>& dq_acc = dq_partial[thread];
    if (dq_acc.empty()) dq_acc.assign(q_elems, 0.f);
    const int64_t nt = item % n_tiles;
    const int64_t kv_group = (item / n_tiles) % (p.kv_heads / kv_heads_per_item);
    const int64_t b_group = item / (n_tiles * (p.kv_heads / kv_heads_per_item));
    const int64_t b_begin = b_group * batches_per_item, kvh_begin = kv_group * kv_heads_per_item;
    const int64_t n0 = nt * kBlockN, bn = std::min<int64_t>(kBlockN, p.kv_len - n0);

    const int64_t q_tile = kBlockM * Dp, kv_tile = kBlockN * Dp, s_tile = kBlockM * kBlockN;
    // S: the logits, then P; T: tanh of the capped logits (softcap only); dS: dP, then dS; Tr: P^T, then dS^T
    auto [Q, dO, dQ, K, Kt, V, Vt, dK, dV, S, T, dS, Tr] =
        thread_scratch({q_tile, q_tile, q_tile, kv_tile, kv_tile, kv_tile, kv_tile, kv_tile, kv_tile, s_tile, s_tile,
                        s_tile, s_tile});
    uint8_t keep[kBlockM * kBlockN];

    // dbias scratch for the bias heads this item touches: [heads][bias rows][kBlockN].
    const int64_t h_first = kvh_begin * g, h_last = (kvh_begin + kv_heads_per_item) * g - 1;
    const int64_t hb_first = has_dbias ? h_first / bias.heads_per_index : 0;
    const int64_t hb_count = has_dbias ? h_last / bias.heads_per_index - hb_first + 1 : 0;
    const int64_t bb = (has_dbias && bias.batch > 1) ? b_begin : 0;
    thread_local std::vector<float> dbias_acc;
    if (has_dbias) {
      if (dbias_direct) {
        std::vector<float> zeros(bn, 0.f);
        for (int64_t hb = hb_first; hb < hb_first + hb_count; ++hb)
          for (int64_t i = 0; i < bias.rows; ++i)
            store_row(dbias, bias.dtype, bb * bias.batch_stride + hb * bias.head_stride + i * bias.row_stride + n0,
                      bn, zeros.data());
      } else {
        dbias_acc.assign(hb_count * bias.rows * kBlockN, 0.f);
      }
    }

    for (int64_t b = b_begin; b < b_begin + batches_per_item; ++b) {
      for (int64_t kvh = kvh_begin; kvh < kvh_begin + kv_heads_per_item; ++kvh) {
        load_seq_tile(k, p.dtype, p.kv_len, p.kv_heads, D, b, kvh, n0, bn, kBlockN, Dp, K);
        load_seq_tile(v, p.dtype, p.kv_len, p.kv_heads, D, b, kvh, n0, bn, kBlockN, Dp, V);
        transpose(kBlockN, Dp, K, Dp, Kt, kBlockN);
        transpose(kBlockN, Dp, V, Dp, Vt, kBlockN);
        std::fill(dK, dK + kBlockN * Dp, 0.f);
        std::fill(dV, dV + kBlockN * Dp, 0.f);
        const Range rows = tile_row_range(p, b, n0, n0 + bn);

        for (int64_t h = kvh * g; h < (kvh + 1) * g; ++h) {
          const float* lse_h = lse + (b * p.heads + h) * p.q_len;
          const float* delta_h = delta.data() + (b * p.heads + h) * p.q_len;
          for (int64_t mt = rows.begin / kBlockM; mt < ceil_div(rows.end, kBlockM); ++mt) {
            const TileClass cls = classes.at(b, h, mt, nt);
            if (cls == kTileEmpty) continue;
            const int64_t m0 = mt * kBlockM, bm = std::min<int64_t>(kBlockM, p.q_len - m0);
            load_seq_tile(q, p.dtype, p.q_len, p.heads, D, b, h, m0, bm, kBlockM, Dp, Q);
            load_seq_tile(dout, p.dtype, p.q_len, p.heads, D, b, h, m0, bm, kBlockM, Dp, dO);
            // With finite operands a dropped pair's zero P and dS multiply finite values, so the plain GEMMs are
            // exact; otherwise 0 * NaN would carry a dropped pair's NaN into the gradients.
            const bool finite = kv_finite[(b * p.kv_heads + kvh) * n_tiles + nt] &&
                                q_finite[(b * p.heads + h) * m_tiles + mt];
            const uint8_t* kept = finite ? nullptr : keep;

            std::fill(S, S + kBlockM * kBlockN, 0.f);
            gemm_acc(kBlockM, kBlockN, Dp, Q, Dp, Kt, kBlockN, S, kBlockN);
            logits_tile(p, mask, TileCoord{b, h, m0, bm, n0, bn, cls}, S, p.softcap > 0.f ? T : nullptr);
            if (!finite) kept_pairs(S, keep);
            for (int64_t r = 0; r < kBlockM; ++r) {
              float* s = S + r * kBlockN;
              const float l = r < bm ? lse_h[m0 + r] : kNegInf;
              if (l == kNegInf) {  // a row with no kept key: P = 0
                std::fill(s, s + kBlockN, 0.f);
                continue;
              }
              if (l != l) {  // a NaN row (zero_dropped below clears its dropped pairs)
                std::fill(s, s + kBlockN, NAN);
                continue;
              }
              // Subtract, then scale, as the forward: the top term of a row is exact at any magnitude.
              for (int64_t c = 0; c < kBlockN; ++c) s[c] = exp2_nonpositive((s[c] - l) * kLog2e);
            }
            if (!finite) zero_dropped(S, keep);

            transpose(kBlockM, kBlockN, S, kBlockN, Tr, kBlockM);
            gemm_acc_kept(kBlockN, Dp, kBlockM, Tr, kBlockM, dO, Dp, dV, Dp, kept, 1, kBlockN);  // dV += P^T dO

            std::fill(dS, dS + kBlockM * kBlockN, 0.f);
            gemm_acc(kBlockM, kBlockN, Dp, dO, Dp, Vt, kBlockN, dS, kBlockN);  // dP = dO V^T
            for (int64_t r = 0; r < bm; ++r) {
              const float dr = delta_h[m0 + r];
              float* ds = dS + r * kBlockN;
              const float* pr = S + r * kBlockN;
              for (int64_t c = 0; c < kBlockN; ++c) ds[c] = pr[c] * (ds[c] - dr);
            }
            std::fill(dS + bm * kBlockN, dS + kBlockM * kBlockN, 0.f);
            if (!finite) zero_dropped(dS, keep);  // dP and delta may be NaN or inf there

            if (has_dbias) {
              const int64_t hb = h / bias.heads_per_index;
              for (int64_t r = 0; r < bm; ++r) {
                const float* ds = dS + r * kBlockN;
                if (dbias_direct) {
                  store_row(dbias, bias.dtype, bias.offset(b, h, m0 + r, n0), bn, ds);
                } else {
                  const int64_t row = bias.rows == 1 ? 0 : m0 + r;
                  float* acc = dbias_acc.data() + ((hb - hb_first) * bias.rows + row) * kBlockN;
                  for (int64_t c = 0; c < bn; ++c) acc[c] += ds[c];
                }
              }
            }

            // Back through the cap and the scale: d(scale * q.k) = dS * (1 - tanh^2) * scale.
            if (!finite && p.softcap > 0.f) zero_dropped(T, keep);  // tanh of a dropped pair's NaN q.k
            for (int64_t r = 0; r < bm; ++r) {
              float* ds = dS + r * kBlockN;
              if (p.softcap > 0.f) {
                const float* t = T + r * kBlockN;
                for (int64_t c = 0; c < kBlockN; ++c) ds[c] *= (1.f - t[c] * t[c]) * p.scale;
              } else {
                for (int64_t c = 0; c < kBlockN; ++c) ds[c] *= p.scale;
              }
            }

            transpose(kBlockM, kBlockN, dS, kBlockN, Tr, kBlockM);
            gemm_acc_kept(kBlockN, Dp, kBlockM, Tr, kBlockM, Q, Dp, dK, Dp, kept, 1, kBlockN);  // dK += dS^T Q
            std::fill(dQ, dQ + kBlockM * Dp, 0.f);
            gemm_acc_kept(kBlockM, Dp, kBlockN, dS, kBlockN, K, Dp, dQ, Dp, kept, kBlockN, 1);  // dQ = dS K
            for (int64_t r = 0; r < bm; ++r) {
              float* dst = dq_acc.data() + ((b * p.q_len + m0 + r) * p.heads + h) * D;
              const float* src = dQ + r * Dp;
              for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
            }
          }
        }
        store_seq_tile(dk, p.dtype, p.kv_len, p.kv_heads, D, b, kvh, n0, bn, Dp, dK);
        store_seq_tile(dv, p.dtype, p.kv_len, p.kv_heads, D, b, kvh, n0, bn, Dp, dV);
      }
    }

    if (has_dbias && !dbias_direct) {
      for (int64_t hb = hb_first; hb < hb_first + hb_count; ++hb)
        for (int64_t i = 0; i < bias.rows; ++i)
          store_row(dbias, bias.dtype, bb * bias.batch_stride + hb * bias.head_stride + i * bias.row_stride + n0,
                    bn, dbias_acc.data() + ((hb - hb_first) * bias.rows + i) * kBlockN);
    }
  }, /*static_schedule=*/true);

  // dq = sum of the per-thread partials, always in thread order.
  const int64_t rows = p.batch * p.q_len * p.heads;
  parallel_for(ceil_div(rows, 64), [&](int64_t chunk, int) {
    std::vector<float> acc(D);
    for (int64_t row = chunk * 64; row < std::min(rows, (chunk + 1) * 64); ++row) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (const auto& part : dq_partial) {
        if (part.empty()) continue;
        const float* src = part.data() + row * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += src[d];
      }
      store_row(dq, p.dtype, row * D, D, acc.data());
    }
  });
}

}  // namespace dmattn::cpu
