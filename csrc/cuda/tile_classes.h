// Mask tile classification (the skip map shared by the forward and backward CUDA kernels).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "kernel_facts.h"

namespace dmattn {

struct MaskTileArgs {
  const bool* mask;                          // [batch, heads, rows, cols], each dim 1 or full
  int64_t batch, heads, rows, cols;
  int block_m, block_n;                      // tile size in query rows x keys
  uint8_t* classes;                          // [batch, heads, m_tiles, n_tiles]
  __host__ __device__ int64_t m_tiles() const { return (rows + block_m - 1) / block_m; }
  __host__ __device__ int64_t n_tiles() const { return (cols + block_n - 1) / block_n; }
};

// Writes one TileClass per (batch, head, query tile, key tile) of the mask's own (broadcast) shape: a broadcast
// mask dim stays broadcast in the map, so a per-key mask [B, H, 1, Lk] yields one row of classes.
cudaError_t launch_classify_mask_tiles(const MaskTileArgs& args, cudaStream_t stream);

}  // namespace dmattn
