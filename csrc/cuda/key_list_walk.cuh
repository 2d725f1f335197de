// What a forward CTA on the key-list path walks (csrc/cuda/key_lists.h): its unit's list of live keys 64 at a time,
// or, for a dense unit, every key up to the causal bound. Shared by the sm80 key-list forward
// (flash_fwd_key_list_kernel.cuh) and the Hopper one (sm90/flash_fwd_key_list_sm90_kernel.cuh), so both walk the same
// keys in the same order.
#pragma once

#include <cstdint>

#include "cuda/flash_fwd.h"
#include "cuda/key_lists.h"

namespace dmattn {

struct KeyListWalk {
  const int32_t* keys;  // the unit's ascending live keys (unused for a dense unit)
  const uint64_t* bits;  // the unit's bit words [chunks][kb_rows]
  bool dense;            // walk 0 .. last_key, reading the mask itself
  int last_key;          // the largest key the CTA's last row may see (-1: none)
  int n_live;            // keys walked
  int n_chunks;          // ceil(n_live / chunk), 0 when no row sees a key

  // Key index of chunk-relative position j of chunk c, or -1 past the walked keys.
  __device__ __forceinline__ int key_at(int c, int j, int chunk) const {
    const int i = c * chunk + j;
    return i < n_live ? (dense ? i : keys[i]) : -1;
  }
};

// The walk of the CTA of (batch b, query head h, query tile m_block of kBlockM rows). Every thread of the CTA must
// call it (it counts the visible keys of a causal list with a CTA barrier).
template <int kBlockM, int kChunk, int kThreads>
__device__ __forceinline__ KeyListWalk key_list_walk(const FwdParams& p, int b, int h, int m_block) {
  const int row0 = m_block * kBlockM;
  const int tid = threadIdx.x;
  KeyListWalk w;
  w.last_key = p.is_causal ? min(row0 + kBlockM, p.q_len) - 1 + (p.kv_len - p.q_len) : p.kv_len - 1;
  const int64_t unit = b * p.kl_batch_stride + (h / p.mask_hdiv) * p.kl_head_stride + m_block * p.kl_m_stride;
  const int32_t* list = p.key_lists + unit * p.kl_keys_stride;
  w.keys = list + 1;
  w.bits = p.key_bits + unit * p.kb_unit_stride;
  const int count = list[0];
  w.dense = count == kKeyListDense;
  // Lists: the live keys visible from the tile's last row (the list is ascending); lists of a row-full causal mask
  // are already cut at that bound, a row-broadcast mask's list is shared by every query tile.
  w.n_live = w.dense ? w.last_key + 1 : count;
  if (p.is_causal && !w.dense) {
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

}  // namespace dmattn
