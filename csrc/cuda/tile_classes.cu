#include "cuda/tile_classes.h"

#include <cstdint>

namespace dmattn {
namespace {

constexpr int kThreads = 256;

// One CTA per tile. Every thread scans a strided share of the tile 16 bytes at a time where the row allows,
// then the CTA votes: all True -> full, all False -> empty, else partial.
__global__ void __launch_bounds__(kThreads) classify_mask_tiles_kernel(MaskTileArgs args) {
  const int64_t m_tiles = args.m_tiles(), n_tiles = args.n_tiles();
  const int64_t tile = blockIdx.x;
  const int64_t nt = tile % n_tiles;
  const int64_t mt = (tile / n_tiles) % m_tiles;
  const int64_t bh = tile / (n_tiles * m_tiles);  // b * heads + h
  const int64_t row0 = mt * args.block_m, col0 = nt * args.block_n;
  const int rows = static_cast<int>(args.rows - row0 < args.block_m ? args.rows - row0 : args.block_m);
  const int cols = static_cast<int>(args.cols - col0 < args.block_n ? args.cols - col0 : args.block_n);
  const bool* base = args.mask + (bh * args.rows + row0) * args.cols + col0;

  bool any_true = false, any_false = false;
  if ((args.cols & 15) == 0 && (cols & 15) == 0 && (reinterpret_cast<uintptr_t>(args.mask) & 15) == 0) {
    // 16 bytes at a time: bool bytes are 0 or 1, so a word has a zero byte iff some key is False.
    const int chunks_per_row = cols / 16;
    for (int e = threadIdx.x; e < rows * chunks_per_row; e += blockDim.x) {
      const int r = e / chunks_per_row, c = e - r * chunks_per_row;
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(base + static_cast<int64_t>(r) * args.cols) + c);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        any_true |= words[i] != 0u;
        any_false |= ((words[i] - 0x01010101u) & ~words[i] & 0x80808080u) != 0u;
      }
    }
  } else {
    for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
      const bool v = base[static_cast<int64_t>(e / cols) * args.cols + e % cols];
      any_true |= v;
      any_false |= !v;
    }
  }
  const int some_true = __syncthreads_or(any_true);
  const int some_false = __syncthreads_or(any_false);
  if (threadIdx.x == 0) {
    args.classes[tile] = !some_true ? kTileEmpty : (some_false ? kTilePartial : kTileFull);
  }
}

}  // namespace

cudaError_t launch_classify_mask_tiles(const MaskTileArgs& args, cudaStream_t stream) {
  const int64_t tiles = args.batch * args.heads * args.m_tiles() * args.n_tiles();
  if (tiles == 0) return cudaSuccess;
  classify_mask_tiles_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace dmattn
