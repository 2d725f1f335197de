// Live-key lists (the layout of csrc/cuda/key_lists.h) of a causal top-k mask given by per-key scores, built
// without anything of size Lq x Lk: the pre-pass of a TopKMask (jax_dmattn/masks.py), "dmattn_topk_key_lists_cuda".
//
// The mask: scores s [Bs, Hs, Lk] (canonical: finite, no -0.0), bottom-right causality with off = Lk - Lq, so
// query row i sees the keys j <= i + off. Row i keeps key j iff j is visible and (s_j, -j) is among the k best
// of row i's visible keys in (score desc, index asc) order; a row that sees <= k keys keeps all of them. This is
// jax_dmattn.topk_mask of the scores broadcast over the query rows, bit for bit.
//
// One CTA per unit (b, h, 128-row query tile t, rows i0 = 128 t ..). Let p = i0 + off, the last key the tile's
// first row sees; row r of the tile sees [0, p + r].
//   A = the k best keys of [0, p] (all of them when p + 1 <= k). A key j <= p kept by some row r is in A: the
//       keys better than j within [0, p] are a subset of those within [0, p + r], so if fewer than k of the
//       latter beat j, fewer than k of the former do. A comes from one pass over `order` (the keys of (b, h)
//       sorted by (score desc, index asc), computed by XLA): its first k entries with index <= p, in rank order.
//       The pass reads about k * Lk / (p + 1) entries; units whose rows all see <= k keys skip it.
//   D = the diagonal keys (p, p + rows - 1] ∩ [0, Lk), at most 127: the only other keys the tile's rows see.
//   So row r keeps the top k of A ∪ D_r, D_r = D ∩ [0, p + r]. Along rank order the union position of the i-th
//   key e of D_r is cA(e) + i, where cA(e) = #{a in A better than e}; both grow along D_r, so the D_r keys in the
//   top k are a prefix of D_r, and so are those of A. That gives each row's k-th best key (its threshold, one
//   walk over the rank-sorted D), and row r keeps j iff j <= p + r and (s_j, -j) is at least its threshold.
//   Row r + 1 sees one key more than row r, so the thresholds never decrease along the rows: the rows keeping a
//   key form an interval, [first row that sees it, first row whose threshold beats it), one binary search.
//   The list is A in index order (a bitmap over [0, p] when it fits in A's score buffer, else a bitonic sort),
//   then the D keys whose interval is not empty (all > p): ascending. Every key of A is kept by row 0, which
//   sees exactly [0, p]. The bit words come from the intervals: each key toggles its bit at the interval's two
//   ends, and a prefix XOR over the 128 rows gives the words of a 64-key chunk.
//
// Capacity: count = |A| + #{kept D keys} <= k + (rows_per_unit - 1), and the listed keys are distinct keys of
// [0, Lk), so count <= min(k + rows_per_unit - 1, Lk) <= min(k + 127, Lk). The handler requires C to be at least
// that (the caller's C = min(roundup64(k + 127), roundup64(Lk)) is), so a unit never overflows. kKeyListDense
// is never written: a dense unit means "read the mask", and a TopKMask has none. Should the bound fail anyway
// (an `order` that is no permutation could make |A| keys repeat), the kernel traps rather than write a
// truncated list, which would silently drop kept keys.
//
// Shared memory: the k keys of A (indices padded to a power of two for the bitonic sort, plus their scores),
// topk_key_lists_smem_bytes(k) in all; k = 8192 needs about 75 KiB, and a Hopper's 227 KiB per block fits k up
// to about 22.5k (k = 22500 ran on an H200). The handler rejects a k the device cannot fit.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/key_lists.h"

namespace dmattn {

struct TopKKeyListArgs {
  const float* scores = nullptr;   // [Bs, Hs, Lk]
  const int32_t* order = nullptr;  // [Bs, Hs, Lk]: per (b, h), the keys by (score desc, index asc)
  int64_t k = 0;                   // 1 <= k < Lk
  // The layout: batch = Bs, heads = Hs, rows = q_len = Lq, cols = Lk, causal with offset Lk - Lq, capacity C,
  // keys, bits. `mask` stays null: there is none.
  KeyListArgs lists;
};

// Bytes of shared memory (static and dynamic) one CTA needs for this k. A host-side query, fine under capture.
cudaError_t topk_key_lists_smem_bytes(int64_t k, size_t* bytes);

// One kernel on `stream`, one CTA per unit. No allocation, no sync. Expects sizes the handler validated:
// capacity_ok(), capacity >= min(k + rows_per_unit - 1, Lk), 1 <= k < Lk < 2^31, Lq < 2^31, and
// topk_key_lists_smem_bytes(k) within the device's opt-in limit.
cudaError_t launch_build_topk_key_lists(const TopKKeyListArgs& args, cudaStream_t stream);

}  // namespace dmattn
