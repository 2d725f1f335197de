// Live-key lists (the layout of csrc/cuda/key_lists.h) of a top-k mask every query row shares: a TopKMask without
// causality, or with it and a single query row (which sees every key). The pre-pass of such a TopKMask, reached
// through "dmattn_topk_key_lists_cuda" with is_causal = false.
//
// The mask: scores s [Bs, Hs, Lk] (canonical: finite, no -0.0). Every row keeps the k best keys in (score desc,
// index asc) order. So each (b, h) has one list, over the row-broadcast geometry (rows = 1): count = k, the kept
// keys ascending, zeros past k, and the first k bits of its words set.
//
// One CTA per (b, h), no sort. The scores map to order-preserving uint32 keys (sign-flipped IEEE bits), and a
// radix select over three digits (11, 11 and 10 bits, most significant first) finds T, the k-th largest key: each
// digit's pass histograms the keys that match the digits chosen so far and picks the bucket where the count from
// the top reaches k. The kept keys are then those above T and the first `take` (in index order) equal to it, where
// take = k - #{keys above T}: the index tie-break. A last pass in index order places them with a CTA prefix sum
// and stops as soon as k are placed. Every pass reads the row's scores (Lk * 4 bytes; from L2 after the first), so
// the work is O(Lk), and no workspace but the outputs.
//
// A long row is read by a team of 2, 4 or 8 CTAs on sm_90 (a thread-block cluster; one CTA elsewhere) when the teams
// of all rows still fit on the multiprocessors at once, each member taking a slice of whole steps: the members build
// their histograms over their slices, and each sums all of them through distributed shared memory, so every member
// picks the same digits; before placing, a count pass gives each member the numbers of kept keys (above T, equal to
// T) in the slices before its own, its place in the list.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/key_lists.h"

namespace dmattn {

struct TopKSharedKeyListArgs {
  const float* scores = nullptr;  // [Bs, Hs, Lk]
  int64_t k = 0;                  // 1 <= k < Lk
  // The layout: batch = Bs, heads = Hs, rows = 1, cols = Lk, not causal, capacity C >= k, keys, bits.
  KeyListArgs lists;
};

// One kernel on `stream`, one CTA or cluster per (b, h). No allocation, no sync. Expects sizes the handler validated:
// capacity_ok(), capacity >= k, 1 <= k < Lk < 2^31, rows == 1.
cudaError_t launch_build_topk_shared_key_lists(const TopKSharedKeyListArgs& args, cudaStream_t stream);

}  // namespace dmattn
