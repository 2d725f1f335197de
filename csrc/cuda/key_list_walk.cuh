// What a CTA on the key-list path walks (csrc/cuda/key_lists.h): its unit's list of live keys 64 at a time, or, for a
// dense unit, every key up to the causal bound. Shared by the key-list forwards (sm80 flash_fwd_key_list_kernel.cuh,
// Hopper sm90/flash_fwd_key_list_sm90_kernel.cuh) and the Hopper key-list backward
// (sm90/flash_bwd_key_list_sm90_kernel.cuh), so that they walk the same keys in the same order; which chunks need no
// per-element key tests (chunk_keys_uniform) also by the sm80 key-list backward.
#pragma once

#include <cstdint>

#include <cute/arch/copy_sm80.hpp>

#include "cuda/flash_bwd_key_list.h"
#include "cuda/flash_fwd.h"
#include "cuda/key_lists.h"

namespace dmattn {

struct KeyListWalk {
  const int32_t* keys;  // the unit's ascending live keys (unused for a dense unit)
  const uint64_t* bits;  // the unit's bit words [chunks][bit_rows]
  int bit_rows;          // rows of a unit's bit words per chunk (1: one word per chunk, shared by every row)
  bool dense;            // walk 0 .. last_key, reading the mask itself
  int count;             // the unit's first word: its live keys, or kKeyListDense
  int last_key;          // the largest key the CTA's last row may see (-1: none)
  int n_live;            // keys walked
  int n_chunks;          // ceil(n_live / chunk), 0 when no row sees a key

  // Key index of chunk-relative position j of chunk c, or -1 past the walked keys.
  __device__ __forceinline__ int key_at(int c, int j, int chunk) const {
    const int i = c * chunk + j;
    return i < n_live ? (dense ? i : keys[i]) : -1;
  }

  // The bit word of chunk c for the CTA's row rl (a list's unit only).
  __device__ __forceinline__ uint64_t word(int c, int rl) const {
    return __ldg(bits + int64_t(c) * bit_rows + (bit_rows == 1 ? 0 : rl));
  }
};

// The walk over one unit (`list`: its count, then its keys; `bits`: its bit words) of a CTA whose rows end at
// last_row (exclusive bound min(row0 + rows, Lq)). Every thread of the CTA must call it (it counts the visible keys
// of a causal list with a CTA barrier).
template <int kChunk, int kThreads>
__device__ __forceinline__ KeyListWalk key_list_walk_of_unit(const int32_t* list, const uint64_t* bits, int bit_rows,
                                                             bool is_causal, int row_end, int q_len, int kv_len) {
  const int tid = threadIdx.x;
  KeyListWalk w;
  w.last_key = is_causal ? row_end - 1 + (kv_len - q_len) : kv_len - 1;
  w.keys = list + 1;
  w.bits = bits;
  w.bit_rows = bit_rows;
  const int count = list[0];
  w.count = count;
  w.dense = count == kKeyListDense;
  // Lists: the live keys visible from the tile's last row (the list is ascending); lists of a row-full causal mask
  // are already cut at that bound, a row-broadcast mask's list is shared by every query tile.
  w.n_live = w.dense ? w.last_key + 1 : count;
  if (is_causal && !w.dense) {
    __shared__ int visible;
    if (tid == 0) visible = 0;
    __syncthreads();
    int below = 0;
    for (int i = tid; i < count; i += kThreads) below += w.keys[i] <= w.last_key;
    below = __reduce_add_sync(0xffffffffu, below);
    if ((tid & 31) == 0 && below) atomicAdd(&visible, below);
    __syncthreads();
    w.n_live = visible;
  }
  w.n_chunks = w.last_key < 0 ? 0 : (w.n_live + kChunk - 1) / kChunk;
  return w;
}

// The walk of the forward CTA of (batch b, query head h, query tile m_block of kBlockM rows).
template <int kBlockM, int kChunk, int kThreads>
__device__ __forceinline__ KeyListWalk key_list_walk(const FwdParams& p, int b, int h, int m_block) {
  const int row0 = m_block * kBlockM;
  const int64_t unit = b * p.kl_batch_stride + (h / p.mask_hdiv) * p.kl_head_stride + m_block * p.kl_m_stride;
  return key_list_walk_of_unit<kChunk, kThreads>(p.key_lists + unit * p.kl_keys_stride,
                                                 p.key_bits + unit * p.kb_unit_stride, p.kb_rows, p.is_causal,
                                                 min(row0 + kBlockM, p.q_len), p.q_len, p.kv_len);
}

// The walk of the backward CTA of (batch b, query head h, query tile m_block of kBlockM = kKeyListBlockM rows).
template <int kBlockM, int kChunk, int kThreads>
__device__ __forceinline__ KeyListWalk key_list_walk(const BwdKeyListParams& sp, int b, int h, int m_block) {
  static_assert(kBlockM == kKeyListBlockM, "a CTA covers one whole unit");
  const BwdKeyLists& kl = sp.lists;
  const int row0 = m_block * kBlockM;
  const int64_t unit = b * kl.unit_batch_stride + (h / kl.mask_hdiv) * kl.unit_head_stride +
                       (kl.rows_full ? m_block : 0);
  return key_list_walk_of_unit<kChunk, kThreads>(kl.keys + unit * kl.keys_stride,
                                                 kl.bits + unit * kl.chunks * kl.rows_per_unit,
                                                 static_cast<int>(kl.rows_per_unit), sp.base.is_causal,
                                                 min(row0 + kBlockM, sp.base.q_len), sp.base.q_len, sp.base.kv_len);
}

// One 16-byte piece of a gathered K / V (or Q / dO) row, global -> shared by cp.async: a list's keys are scattered
// rows, and a piece per instruction gathers them in any order.
template <class Elem>
__device__ __forceinline__ void copy_piece(const Elem* src, Elem* dst) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(src),
                                                           *reinterpret_cast<cute::uint128_t*>(dst));
}

// The same copy to a shared-memory byte address, zero-filling the piece where `valid` is false (then `src` is not
// read): the Hopper key-list forward keeps its pieces' addresses as 32-bit offsets, so a gather costs an add and a
// copy per piece, with no branch for the padding past the walk.
__device__ __forceinline__ void copy_piece_or_zero(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// Chunk position tid's entries (threads tid < kChunk) of the chunk tables at ring stage `stage`: the key index and
// its per-key bias, which the whole CTA reads after the next barrier.
template <int kChunk>
__device__ __forceinline__ void stage_chunk_tables(int32_t* idx, float* kbias, int stage, int tid, int key,
                                                   float key_bias) {
  if (tid < kChunk) {
    idx[stage * kChunk + tid] = key;
    kbias[stage * kChunk + tid] = key_bias;
  }
}

// Bit j of keep[stage]: chunk position j's per-key bias is not -inf. A -inf bias drops its key whatever the logit
// (even an inf or NaN q.k), so the forwards fold that rule into the rows' mask words (one AND a row) instead of
// testing every element. Threads tid < kChunk (whole warps), CTA-uniformly with stage_chunk_tables.
template <int kChunk>
__device__ __forceinline__ void stage_chunk_keep_word(uint64_t* keep, int stage, int tid, float key_bias) {
  static_assert(kChunk == 64, "two warps' ballots make the word");
  if (tid < kChunk) {
    const uint32_t w = __ballot_sync(0xffffffffu, key_bias != -INFINITY);
    if ((tid & 31) == 0) reinterpret_cast<uint32_t*>(keep + stage)[tid >> 5] = w;
  }
}

// Whether a chunk's keys are uniform for the CTA: every column holds a walked key (a walk is ascending and padded with
// -1 at its end, so its last entry decides) and, under bottom-right causality, every key lies at or below the bound
// of the CTA's first query row row0. A row's bit word alone then decides which of the chunk's keys the row keeps; the
// key-list forwards and backwards take the per-element key and causal tests only in the other chunks (a unit's
// diagonal keys, the end of its list).
template <class Params>
__device__ __forceinline__ bool chunk_keys_uniform(int last_key, const Params& p, int row0) {
  return last_key >= 0 && (!p.is_causal || last_key <= row0 + (p.kv_len - p.q_len));
}

}  // namespace dmattn
