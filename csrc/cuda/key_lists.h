// Compacted key lists of a mask ("live keys"): the sparse form of the mask that the CUDA kernels iterate over.
//
// A top-k mask keeps ~k scattered keys per query row, so nearly every (query tile, key tile) of it is partial
// and tile skipping saves nothing. But consecutive query rows keep nearly the same keys: the union of the kept
// keys of a 128-row query tile is ~k + a few. The pre-pass lists that union per query tile (ascending key
// indices) and re-packs the tile's mask over the listed keys as 64-bit row words; the kernels then walk the list
// 64 keys at a time, gathering K/V rows, so the work is proportional to the live keys, not to Lk.
//
// Layout, over the mask's own broadcast shape [Bm, Hm, Mm, Lk] (the key dim must be full), with a per-call list
// capacity C (a multiple of 64, at most ceil(Lk / 64) * 64; jax_dmattn/_cuda_fwd.py: key_list_capacity):
//   unit u = (bm * Hm + hm) * m_tiles + t, t = query tile of kKeyListBlockM rows, m_tiles = ceil(Mm / BlockM)
//   keys [units, 1 + C] int32: keys[u][0] = count, keys[u][1 + i] = i-th live key of the unit (ascending)
//   bits [units, C / 64, rows_per_unit] uint64, rows_per_unit = min(Mm, BlockM):
//     bit j of bits[u][c][r] = mask[bm, hm, t * BlockM + r, keys[u][1 + 64 c + j]] for 64 c + j < count, else 0.
// A unit whose live keys do not fit (count > C) is "dense": keys[u][0] = kKeyListDense, nothing else of the unit
// is written, and the kernels walk every key (up to the causal bound) 64 at a time, reading the mask itself (on
// Hopper the forward without a mask streams such units, and lists of most visible keys: key_list_unit_on_tiles).
// The capacity keeps the workspace at O(B * H * Lq) (C keys of 4 + 16 bytes per 128-row unit) instead of a
// fraction of the O(Lq * Lk) mask; a mask that keeps most keys gains nothing from lists anyway.
// A key is live when some row of the unit keeps it and, with causal masking and a row-full mask (Mm == Lq), it
// is visible from the unit's last row. Causality is not folded into the bits: the kernels still mask it.
//
// Parts (a decoding step's split over the keys, jax_dmattn/_decode.py): with P > 1 parts the key dim is cut into P
// equal ranges of Lk / P keys, and each range of each (bm, hm) is a unit of its own, as if the mask had Hm * P heads
// (head hm * P + p: part p of mask head hm), listing the part's live keys by their positions in the whole key dim.
// A part's lists then hold only its keys, and the kernels read K, V and the bias at those positions, so no operand
// is cut into parts; the capacity bounds a part's keys (at most Lk / P rounded up to 64).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "kernel_facts.h"

namespace dmattn {

struct KeyListArgs {
  const uint8_t* mask = nullptr;  // [Bm, Hm, Mm, Lk] bool, contiguous
  int64_t batch = 0, heads = 0, rows = 0, cols = 0;
  // Causal bound (bottom-right): used only when rows == q_len; key j is visible from row i iff j <= i + offset.
  bool is_causal = false;
  int64_t q_len = 0, causal_offset = 0;
  int64_t capacity = 0;      // C: keys listed per unit, a multiple of 64 in [64, ceil(part_cols() / 64) * 64]
  int64_t parts = 1;         // P: key ranges per (bm, hm), each its own unit (cols a multiple of P)
  int32_t* keys = nullptr;   // [units, 1 + capacity]
  uint64_t* bits = nullptr;  // [units, capacity / 64, rows_per_unit]

  __host__ __device__ int64_t m_tiles() const { return (rows + kKeyListBlockM - 1) / kKeyListBlockM; }
  __host__ __device__ int64_t part_cols() const { return cols / parts; }
  __host__ __device__ int64_t units() const { return batch * heads * parts * m_tiles(); }
  __host__ __device__ int64_t rows_per_unit() const { return rows < kKeyListBlockM ? rows : kKeyListBlockM; }
  __host__ __device__ int64_t chunks() const { return capacity / kKeyListChunk; }  // bit-word chunks per unit
  __host__ __device__ int64_t keys_stride() const { return 1 + capacity; }
  __host__ __device__ int64_t keys_size() const { return units() * keys_stride(); }
  // Parts and a capacity the kernels accept for this mask.
  __host__ __device__ bool parts_ok() const { return parts >= 1 && cols % parts == 0; }
  __host__ __device__ bool capacity_ok() const {
    return parts_ok() && capacity > 0 && capacity % kKeyListChunk == 0 &&
           capacity <= (part_cols() + kKeyListChunk - 1) / kKeyListChunk * kKeyListChunk;
  }
  __host__ __device__ int64_t bits_size() const { return units() * chunks() * rows_per_unit(); }
};

// Whether the Hopper forward computes a unit over its key tiles, reading the mask itself, instead of the key-list
// kernel walking its list (launch_flash_fwd_key_list_sm90, a bool mask): a dense unit, or a list of more than three
// quarters of the keys the unit's rows may see (`visible`: keys 0 .. visible - 1), where the unit sees more than
// kKeyListTileMinVisible keys (kernel_facts.h). `count`: the unit's first word. Both kernels decide each unit with it.
//
// Why these bounds (H100, 16K, D = 128, per key and row: 0.34 ns gathered through a list, 0.17 ns streamed as masked
// tiles): a list of half the visible keys costs about what its tiles do, so only lists well above that move; and
// the tiles' launch costs the call some microseconds even where it holds few units (24 us at 16K with none), which
// units seeing few keys do not repay.
__host__ __device__ inline bool key_list_unit_on_tiles(int32_t count, int64_t visible) {
  return count == kKeyListDense || (visible > kKeyListTileMinVisible && 4 * int64_t(count) > 3 * visible);
}

// Whether some unit of a call with `kv_len` keys and list capacity `capacity` can go to the tiles: one must see more
// than kKeyListTileMinVisible keys or hold more live keys than a list does. Calls where none can skip the tiles'
// launches.
__host__ __device__ inline bool key_list_call_may_hold_tile_units(int64_t kv_len, int64_t capacity) {
  return kv_len > kKeyListTileMinVisible || kv_len > capacity;
}

// One kernel on `stream`, a CTA per unit: its live keys and list, then its bit words. No allocation, no sync.
cudaError_t launch_build_key_lists(const KeyListArgs& args, cudaStream_t stream);

}  // namespace dmattn
