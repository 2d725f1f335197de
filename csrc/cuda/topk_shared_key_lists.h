// Live-key lists (the layout of csrc/cuda/key_lists.h) of a top-k mask every query row shares: a TopKMask without
// causality, or with it and a single query row (which sees every key), reached through "dmattn_topk_key_lists_cuda"
// with is_causal = false; and a TopKMask over one query row per unit under row bounds without segment ids (a
// decoding step over a ragged batch: each element's row sees its keys [lo, hi)), reached through
// "dmattn_topk_bounded_key_lists_cuda" with q_len = 1.
//
// The mask: scores s [Bs, Hs, Lk] (canonical: finite, no -0.0). Every row keeps the k best keys of its range (all
// keys, or [lo, hi) of its batch element) in (score desc, index asc) order, or the whole range when it holds at
// most k keys. So each (b, h) has one list, over the row-broadcast geometry (rows = 1): count = min(k, range), the
// kept keys ascending, zeros past the count, and the first count bits of its words set.
//
// One CTA per (b, h), no sort. The scores map to order-preserving uint32 keys (sign-flipped IEEE bits), and a
// radix select over three digits (11, 11 and 10 bits, most significant first) finds T, the k-th largest key: each
// digit's pass histograms the keys that match the digits chosen so far and picks the bucket where the count from
// the top reaches k. The kept keys are then those above T and the first `take` (in index order) equal to it, where
// take = k - #{keys above T}: the index tie-break. A last pass in index order places them with a CTA prefix sum
// and stops as soon as k are placed. Every pass reads the range's scores (4 bytes a key; from L2 after the first),
// so the work is O(range), and no workspace but the outputs.
//
// A long row is read by a team of 2, 4 or 8 CTAs on sm_90 (a thread-block cluster; one CTA elsewhere) when the teams
// of all rows still fit on the multiprocessors at once (one CTA each), each member taking a slice of whole steps:
// the members build their histograms over their slices, and each sums all of them through distributed shared
// memory, so every member picks the same digits. A member's keys above T and equal to T come from its own
// histograms (at each digit, the bins above the chosen one hold keys above T; the last digit's chosen bin, those
// equal to it), and their sums over the members before it give its place in the list.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/key_lists.h"
#include "row_bounds.h"

namespace dmattn {

struct TopKSharedKeyListArgs {
  const float* scores = nullptr;     // [Bs, Hs, Lk]
  int64_t scores_batch_stride = 0;   // Hs * Lk, or 0 when Bs = 1 (broadcast over the lists' batch)
  int64_t k = 0;                     // 1 <= k < Lk
  RowBounds bounds;                  // absent, or rows [Bb, 1, 4] without key segment ids (lo, hi of row 0)
  // The layout: batch = max(Bs, Bb), heads = Hs, rows = 1, cols = Lk, not causal, capacity C >= k, keys, bits.
  KeyListArgs lists;
};

// One kernel on `stream`, one CTA or cluster per (b, h). No allocation, no sync. Expects sizes the handler validated:
// capacity_ok(), capacity >= k, 1 <= k < Lk < 2^31, rows == 1.
cudaError_t launch_build_topk_shared_key_lists(const TopKSharedKeyListArgs& args, cudaStream_t stream);

}  // namespace dmattn
