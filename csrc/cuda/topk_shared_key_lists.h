// Live-key lists (the layout of csrc/cuda/key_lists.h) of a top-k mask every query row shares: a TopKMask without
// causality, or with it and a single query row (which sees every key), reached through "dmattn_topk_key_lists_cuda"
// with is_causal = false; and a TopKMask over one query row per unit under row bounds without segment ids (a
// decoding step over a ragged batch: each element's row sees its keys [lo, hi)), reached through
// "dmattn_topk_bounded_key_lists_cuda" with q_len = 1.
//
// The mask: scores s [Bs, Hs, Lk], ranked by their canonical form (canonical_order_key: NaN and -inf as the lowest
// finite float, -0.0 as 0.0). Every row keeps the k best keys of its range (all keys, or [lo, hi) of its batch
// element) in (score desc, index asc) order, or the whole range when it holds at most k keys. So each (b, h) has one
// list, over the row-broadcast geometry (rows = 1): count = min(k, range), the kept keys ascending, zeros past the
// count, and the first count bits of its words set.
//
// One team of CTAs per (b, h), no sort. The scores map to order-preserving keys (sign-flipped IEEE bits: uint32 for
// float32 scores, 16 bits for bfloat16 and float16 ones, score_order.cuh), and a radix select over their digits
// (11, 11 and 10 bits, most significant first; 11 and 5 for 16-bit keys) finds T, the k-th largest key: each
// digit's pass histograms the keys that match the digits chosen so far and picks the bucket where the count from
// the top reaches k. The kept keys are then those above T and the first `take` (in index order) equal to it, where
// take = k - #{keys above T}: the index tie-break. A last pass in index order places them by a CTA prefix sum. The
// work is O(range), and no workspace but the outputs.
//
// A row is read by a team of 1, 2, 4 or 8 CTAs (a thread-block cluster on sm_90; teams of 1 elsewhere), each member
// taking a slice: the members build their histograms over their slices, and each sums all of them through
// distributed shared memory, so every member picks the same digits. A member's keys above T and equal to T come from
// its own histograms (at each digit, the bins above the chosen one hold keys above T; the last digit's chosen bin,
// those equal to it), and their sums over the members before it give its place in the list.
//
// Two kernels. The resident kernel (1024 threads) holds its member's slice in shared memory as order keys, at most 48 a
// thread of 32 bits (192 KiB) or 64 of 16 bits (128 KiB): the slice is read from global memory once, the first digit's
// histogram built from the registers as it arrives, and the later digits and the placement (each thread a run of
// consecutive keys, one prefix sum) read shared memory; a row gets the smallest team whose runs hold at most 32 keys a
// thread, else the smallest whose slices fit (longer runs leave a member a long serial pass, more members add cluster
// barriers and sums over distributed shared memory). Rows too long for teams of 8 (on sm_90 more than 384K float32 or
// 512K 16-bit scores) take the streaming kernel (512 threads), which reads its slice from global memory (L2 after the
// first) for every digit and for the placement, one prefix sum per 2048 keys; its rows get more members while the teams
// of all rows still fit on the multiprocessors at once (one CTA each) and each keeps two steps of 4096 keys.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "attention_params.h"
#include "cuda/key_lists.h"
#include "row_bounds.h"

namespace dmattn {

struct TopKSharedKeyListArgs {
  const void* scores = nullptr;      // [Bs, Hs, Lk] of scores_dtype
  DType scores_dtype = DType::kF32;  // f32, bf16 or f16 (a 16-bit score ranks as its float value)
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
