// The TMA map through which the Hopper forward's masked instantiation loads a bool mask's [BlockM, BlockN] tiles
// (flash_fwd_sm90_mainloop.cuh: reduce_masked, apply_mask), and the swizzle its consumers undo.
//
// The map spans the mask as [Bm, Hm, Lq, Lk] bytes (keys innermost); a broadcast batch or head dim (stride 0) is a
// dim of size 1 read at coordinate 0. A box is one tile: BlockN keys of BlockM rows, landing as BlockN-byte rows whose
// 16-byte pieces the TMA swizzles by address (128-byte swizzle for 128-key tiles, 64-byte for 64-key ones), so that
// the eight rows a warp's quads read at once fall in different banks. Keys past Lk and rows past Lq land as 0.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/cuda_host_adapter.hpp"
#include "cuda/flash_fwd.h"

namespace dmattn::sm90 {

// The address bits a tile of `block_n`-byte rows swizzles into a piece's index (bits 4-6 of the address for 128-byte
// rows, 4-5 for 64-byte ones), taken from bits 7-9.
constexpr uint32_t mask_tile_swizzle(int block_n) { return block_n == 128 ? 0x70u : 0x30u; }

// The offset, within a landed tile at shared address `tile_address`, of the 16-byte piece at logical offset `offset`
// (row * BlockN + 16 * piece): the TMA XORs the piece index with the address's row bits.
__device__ __forceinline__ uint32_t mask_tile_piece(uint32_t tile_address, uint32_t offset, uint32_t swizzle) {
  return offset ^ (((tile_address + offset) >> 3) & swizzle);
}

// Non-zero iff some byte of x is zero.
__device__ __forceinline__ uint32_t has_zero_byte(uint32_t x) { return (x - 0x01010101u) & ~x & 0x80808080u; }

// Whether the TMA can map the call's mask: rows in 16-byte pieces (mask_rows_in_16_byte_pieces), one row per query
// row, and every stride below 2^40 bytes and not negative (the TMA's limits).
inline bool mask_tile_map_fits(const FwdParams& p) {
  auto tma_stride = [](int64_t bytes) { return bytes >= 0 && bytes < (int64_t(1) << 40); };
  return mask_rows_in_16_byte_pieces(p) && p.mask_row_stride > 0 && tma_stride(p.mask_row_stride) &&
         tma_stride(p.mask_head_stride) && tma_stride(p.mask_batch_stride);
}

// Encodes the map of the call's mask (mask_tile_map_fits holds) for [block_m, block_n] tiles.
inline cudaError_t encode_mask_tile_map(CUtensorMap& map, const FwdParams& p, int block_m, int block_n) {
  const int64_t mask_heads = p.mask_head_stride == 0 ? 1 : p.heads / p.mask_hdiv;
  const int64_t mask_batch = p.mask_batch_stride == 0 ? 1 : p.batch;
  // A size-1 dim's stride is never stepped; any legal value serves.
  const int64_t rows_bytes = p.mask_row_stride * p.q_len;
  const cuuint64_t dims[4] = {cuuint64_t(p.kv_len), cuuint64_t(p.q_len), cuuint64_t(mask_heads),
                              cuuint64_t(mask_batch)};
  const cuuint64_t strides[3] = {cuuint64_t(p.mask_row_stride),
                                 cuuint64_t(p.mask_head_stride == 0 ? rows_bytes : p.mask_head_stride),
                                 cuuint64_t(p.mask_batch_stride == 0 ? rows_bytes * mask_heads : p.mask_batch_stride)};
  const cuuint32_t box[4] = {cuuint32_t(block_n), cuuint32_t(block_m), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<uint8_t*>(p.mask), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE,
      block_n == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace dmattn::sm90
