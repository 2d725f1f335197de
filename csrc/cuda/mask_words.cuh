// Bit words of a boolean mask read straight from memory: what the key-list kernels use for a dense unit
// (csrc/cuda/key_lists.h), where no pre-packed words exist.
//
// In the SM80 MMA accumulator layout the four lanes of a quad (lane / 4 equal) hold the same rows, so each lane
// packs 16 of the row's 64 mask bytes (lane % 4 picks which) and the quad ORs the pieces together: one 16-byte
// load per lane per row instead of 64 byte loads.
#pragma once

#include <cstdint>

namespace dmattn {

// Bit i of the result: byte i of x is non-zero (i < 4).
__device__ __forceinline__ uint32_t nonzero_bytes_to_bits(uint32_t x) {
  // A byte's high bit ends up set iff the byte is non-zero: its low seven bits plus 0x7F carry into it (never out of
  // the byte), or it was set already.
  const uint32_t high = (((x & 0x7F7F7F7Fu) + 0x7F7F7F7Fu) | x) & 0x80808080u;
  // Byte i's high bit (bit 8 i + 7) lands at bit 28 + i; the other partial products stay below bit 24, so no carries.
  return (high * 0x00204081u) >> 28;
}

__device__ __forceinline__ uint32_t pack16(uint4 w) {
  return nonzero_bytes_to_bits(w.x) | (nonzero_bytes_to_bits(w.y) << 4) | (nonzero_bytes_to_bits(w.z) << 8) |
         (nonzero_bytes_to_bits(w.w) << 12);
}

// The 64-bit word of one row from its quad: `piece` is this lane's 16 bits (keys 16 * (lane % 4) + [0, 16)).
// Every lane of the warp must call it (shuffles).
__device__ __forceinline__ uint64_t quad_word(uint32_t piece) {
  uint64_t w = uint64_t(piece) << (16 * (threadIdx.x & 3));
  w |= __shfl_xor_sync(0xffffffffu, w, 1);
  w |= __shfl_xor_sync(0xffffffffu, w, 2);
  return w;
}

// This lane's 16 mask bytes of keys [k0 + 16 * (lane % 4), + 16) of one row, read from global memory (row ==
// nullptr: a row past the end; keys past kv_len read as 0). `vec`: rows are 16-byte aligned with unit column
// stride, one 16-byte load; otherwise byte loads. Returned raw so that the load can be issued early and packed
// (pack16) once its latency is hidden.
__device__ __forceinline__ uint4 row_bytes_global(const uint8_t* row, int k0, int kv_len, bool vec) {
  uint4 w = make_uint4(0, 0, 0, 0);
  if (row == nullptr) return w;
  const int c0 = k0 + 16 * int(threadIdx.x & 3);
  if (vec && c0 + 16 <= kv_len) return __ldg(reinterpret_cast<const uint4*>(row + c0));
  uint32_t words[4] = {0, 0, 0, 0};
  for (int i = 0; i < 16 && c0 + i < kv_len; ++i) words[i / 4] |= uint32_t(row[c0 + i] != 0) << (8 * (i % 4));
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// A dense unit's mask rows of one (batch, head) (nullptr when the unit is not dense), and whether they allow the
// 16-byte loads: unit column stride and 16-byte aligned rows. Params: FwdParams or BwdParams (CallParams's mask fields).
struct DenseMaskRows {
  const uint8_t* rows;  // row r at rows + r * mask_row_stride
  bool vec;
};

template <class Params>
__device__ __forceinline__ DenseMaskRows dense_mask_rows(const Params& p, int b, int h, bool dense) {
  const uint8_t* rows = dense ? p.mask + b * p.mask_batch_stride + (h / p.mask_hdiv) * p.mask_head_stride : nullptr;
  const bool vec = dense && p.mask_col_stride == 1 && p.mask_row_stride % 16 == 0 &&
                   (reinterpret_cast<uintptr_t>(rows) & 15) == 0;
  return {rows, vec};
}

}  // namespace dmattn
