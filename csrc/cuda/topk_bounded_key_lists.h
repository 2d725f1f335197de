// Live-key lists (the layout of csrc/cuda/key_lists.h) of a top-k mask given by per-key scores under row bounds
// (segment ids, a local window, sequence lengths and their causality: csrc/row_bounds.h), built without anything
// of size Lq x Lk: the pre-pass of a TopKMask with bounds, "dmattn_topk_bounded_key_lists_cuda".
//
// The mask: scores s [Bs, Hs, Lk] (ranked by their canonical form: canonical_order_key) and bounds rows [Bb, Lq, 4],
// key segment ids [Bb, Lk] or none. Row i of batch b sees the keys its bounds keep (RowRange::keeps) and keeps the k
// best of them in (score desc, index asc) order, all of them where it sees at most k. This is jax_dmattn.topk_mask of
// the scores with the bounds' dense mask folded in, bit for bit. The lists are over the geometry
// batch = B' = max(Bs, Bb), heads = Hs, rows = Lq, not causal (the bits hold the bounds).
//
// One CTA per unit (b, h, 128-row query tile). Its non-empty rows form groups: consecutive rows (empty rows
// skipped) whose lo and hi each spread over at most kGroupSpread keys and that compare the same segment id or
// none. Within a group let Q = [max lo, min hi): every row of the group sees all of Q's visible keys, so a key of Q
// that a row keeps is among the k best visible keys of Q (fewer than k keys of Q beat it). Every other key a row
// sees lies in [min lo, max lo) or [min hi, max hi), at most 2 * kGroupSpread keys. So each row's k best are the k
// best of its visible candidates: Q's k best (a radix select over Q: three digits of 11, 11 and 10 bits of the
// order-preserving uint32 image of the scores) and the two end ranges, at most k + 2 * kGroupSpread keys (when Q
// is empty, [min lo, max hi) itself, as many at most). The group ranks its candidates once (a bitonic sort by
// (score desc, index asc)); a warp per row walks that ranking, counting the candidates the row sees, and the
// row's k-th is its threshold (t, jt): it keeps key j iff it sees j and (s_j, -j) >= (t, -jt). The candidates
// some row keeps join the unit's union; after the last group the union is sorted and de-duplicated (the list),
// and a warp per row tests its threshold on every listed key (its bit words).
//
// Work: per group O(|Q|) score reads per digit (Q is a row's whole range: a document, a window, or up to Lk with
// lengths alone), O((k + 2 * kGroupSpread) log^2) for the sort and O(k + 2 * kGroupSpread) per row.
//
// Capacity. Without segment ids a row's lo and hi are clipped i + constants (causality, window, lengths), so the
// non-empty rows of a unit form one group and the union holds at most k + 2 * kGroupSpread keys. With segment ids
// a unit holds one group per segment it meets (or more where ids are not in contiguous runs), and the union has no
// bound short of min(128 k, Lk): a unit whose union exceeds the capacity C is written with count kKeyListDense and
// nothing else, a mark for the caller (jax_dmattn/_compact.py checks it and takes another route for the call), since
// a TopKMask has no mask that a dense unit could read. With may_overflow = false such a unit traps instead.
//
// Shared memory: the candidates (uint64, padded to a power of two for the sort) with a kept flag each, and the
// union (int32, padded likewise): topk_bounded_key_lists_smem_bytes(k, C); kTopKBoundedListsMaxK keeps it within
// an A100's 163 KB per block at C = 2 k + 4 kGroupSpread.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/key_lists.h"
#include "row_bounds.h"

namespace dmattn {

struct TopKBoundedKeyListArgs {
  const float* scores = nullptr;  // [Bs, Hs, Lk]
  int64_t scores_batch = 1;       // Bs: 1 (broadcast over the batch) or B'
  RowBounds bounds;               // rows [Bb, Lq, 4] (Bb in {1, B'}), key segment ids or null
  int64_t k = 0;                  // 1 <= k < Lk, k <= kTopKBoundedListsMaxK
  bool may_overflow = false;      // a unit over capacity: marked (true) or a trap (false)
  // The layout: batch = B', heads = Hs, rows = Lq, cols = Lk, not causal, capacity C, keys, bits.
  KeyListArgs lists;
};

// Bytes of dynamic shared memory one CTA needs for this k and capacity.
int64_t topk_bounded_key_lists_smem_bytes(int64_t k, int64_t capacity);

// One kernel on `stream`, one CTA per unit. No allocation, no sync. Expects sizes the handler validated:
// capacity_ok(), 1 <= k < Lk < 2^31, k <= kTopKBoundedListsMaxK, Lq < 2^31, and the shared memory within the
// device's opt-in limit.
cudaError_t launch_build_topk_bounded_key_lists(const TopKBoundedKeyListArgs& args, cudaStream_t stream);

}  // namespace dmattn
