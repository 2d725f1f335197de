// The TMA map through which the Hopper forward's general and masked instantiations load a bias with query rows
// ([B, H, Lq, Lk] and its broadcasts; bf16 or f16) tile by tile (flash_fwd_sm90_mainloop.cuh: reduce_tiles,
// add_bias_tile), instead of the consumers reading it element by element from global memory.
//
// The map spans the bias as [Bb, Hb, Lq, Lk] 2-byte elements (keys innermost); a broadcast batch or head dim (stride
// 0) is a dim of size 1 read at coordinate 0. A box is 64 keys of BlockM rows: 128-byte rows, which the TMA swizzles
// by address (128-byte swizzle: the 16-byte piece index XORed with the row's low three bits) so that the eight rows
// a warp's quads read at once fall in different banks. A key tile of BlockN keys is BlockN / 64 boxes, one after
// the other. Keys past Lk and rows past Lq land as 0 (those logits are masked or never stored).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/cuda_host_adapter.hpp"
#include "cuda/flash_fwd.h"
#include "cuda/sm90/mask_tile_map.h"

namespace dmattn::sm90 {

// Keys per box: 128 bytes of 2-byte elements, the 128-byte swizzle's span.
constexpr int kBiasBoxKeys = 64;
// The swizzle of a box's 128-byte rows, undone by mask_tile_piece as for a mask tile of 128-byte rows.
constexpr uint32_t kBiasTileSwizzle = mask_tile_swizzle(2 * kBiasBoxKeys);

// Whether the TMA can map the call's bias: rows in 16-byte pieces (bias_rows_in_16_byte_pieces), one row per query
// row, and every stride below 2^40 bytes and not negative (the TMA's limits). An fp32 bias, a bias constant along
// keys ([B, H, Lq, 1]) and unaligned rows stay with the per-element reads.
inline bool bias_tile_map_fits(const FwdParams& p) {
  auto tma_stride = [](int64_t elems) { return elems >= 0 && 2 * elems < (int64_t(1) << 40); };
  return bias_rows_in_16_byte_pieces(p) && p.bias_row_stride > 0 && tma_stride(p.bias_row_stride) &&
         tma_stride(p.bias_head_stride) && tma_stride(p.bias_batch_stride);
}

// Encodes the map of the call's bias (bias_tile_map_fits holds) for boxes of kBiasBoxKeys keys and block_m rows.
inline cudaError_t encode_bias_tile_map(CUtensorMap& map, const FwdParams& p, int block_m) {
  const int64_t bias_heads = p.bias_head_stride == 0 ? 1 : p.heads / p.bias_hdiv;
  const int64_t bias_batch = p.bias_batch_stride == 0 ? 1 : p.batch;
  // A size-1 dim's stride is never stepped; any legal value serves.
  const int64_t rows_bytes = 2 * p.bias_row_stride * p.q_len;
  const cuuint64_t dims[4] = {cuuint64_t(p.kv_len), cuuint64_t(p.q_len), cuuint64_t(bias_heads),
                              cuuint64_t(bias_batch)};
  const cuuint64_t strides[3] = {
      cuuint64_t(2 * p.bias_row_stride),
      cuuint64_t(p.bias_head_stride == 0 ? rows_bytes : 2 * p.bias_head_stride),
      cuuint64_t(p.bias_batch_stride == 0 ? rows_bytes * bias_heads : 2 * p.bias_batch_stride)};
  const cuuint32_t box[4] = {cuuint32_t(kBiasBoxKeys), cuuint32_t(block_m), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
      &map, p.bias_dtype == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(p.bias), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace dmattn::sm90
