// Kernel assembly and launch of the Hopper forward (csrc/cuda/sm90/flash_fwd_sm90_mainloop.cuh): tile shapes per
// head dim, the tile scheduler, and one launch per query head of a GQA group, so that every tensor is addressed by
// plain strides (the CUTLASS collectives take one (batch, head) coordinate for Q and K alike).
#pragma once

#include <atomic>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/device_kernel.h>
#include <cutlass/half.h>
#include <cutlass/kernel_hardware_info.h>

#include "collective/fmha_epilogue.hpp"
#include "kernel/fmha_kernel_tma_warpspecialized.hpp"
#include "kernel/fmha_options.hpp"
#include "cuda/flash_fwd.h"
#include "cuda/sm90/flash_fwd_sm90.h"
#include "cuda/smem_limit.cuh"
#include "cuda/sm90/flash_fwd_sm90_mainloop.cuh"

namespace dmattn::sm90 {

// (BlockM, BlockN, D) and K/V pipeline stages per head dim. D = 256 takes 64-key tiles and 4 stages so that Q (two
// 64-row warpgroup tiles) and the ring fit the 227 KB of shared memory.
template <int kHeadDim>
struct FwdTile;
template <>
struct FwdTile<64> {
  using Shape = cute::Shape<_128, _128, _64>;
  static constexpr int kStages = 5;
};
template <>
struct FwdTile<128> {
  using Shape = cute::Shape<_128, _128, _128>;
  static constexpr int kStages = 5;
};
template <>
struct FwdTile<256> {
  using Shape = cute::Shape<_128, _64, _256>;
  static constexpr int kStages = 4;
};

// One CTA per (query tile, batch, kv head), query tiles in reverse: under causality the last tiles see the most keys,
// so they start first and the short ones fill the grid's tail.
struct ReverseQueryTiles {
  struct Params {
    dim3 grid;
  };
  bool valid_ = true;

  CUTLASS_DEVICE explicit ReverseQueryTiles(Params const&) {}

  template <class ProblemShape, class ClusterShape, class TileShape>
  static Params to_underlying_arguments(ProblemShape const& problem, cutlass::KernelHardwareInfo, ClusterShape const&,
                                        TileShape const&) {
    const int m_tiles = (get<2>(problem) + get<0>(TileShape{}) - 1) / get<0>(TileShape{});
    return Params{dim3(m_tiles, get<0>(problem), get<1>(problem))};
  }
  static dim3 get_grid_shape(Params const& params) { return params.grid; }

  CUTLASS_DEVICE bool is_valid() const { return valid_; }
  CUTLASS_DEVICE auto get_block_coord() const {
    return make_coord(int(gridDim.x - 1 - blockIdx.x), _0{}, make_coord(int(blockIdx.y), int(blockIdx.z)));
  }
  CUTLASS_DEVICE ReverseQueryTiles& operator++() {
    valid_ = false;
    return *this;
  }
};

template <int kHeadDim, bool kIsBF16, KeyRule kRule, bool kGeneralLogits>
struct FwdKernel {
  using Element = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  using Tile = FwdTile<kHeadDim>;
  using Mainloop = FwdMainloop<Element, typename Tile::Shape, kRule, kGeneralLogits,
                               cutlass::fmha::kernel::Option<cutlass::fmha::kernel::Tag::kStagesKV,
                                                             cute::Int<Tile::kStages>>>;
  using Epilogue = cutlass::fmha::collective::FmhaFwdEpilogue<Element, float, typename Mainloop::TileShapePV>;
  using Kernel = cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<Mainloop, Epilogue, ReverseQueryTiles>;
  using Stride = cute::tuple<int, _1, cute::tuple<int, int>>;
  // The kernel overlays the epilogue's output tiles on the mainloop's storage; our staged bias lies past the base's.
  static_assert(sizeof(typename Epilogue::TensorStorage) * Mainloop::NumMmaWarpGroups <=
                sizeof(typename Mainloop::Base::SharedStorage));

  static cudaError_t run(const FwdParams& p, cudaStream_t stream) {
    constexpr int kSmem = Kernel::SharedStorageSize;
    static std::atomic<uint64_t> smem_configured{0};
    if (const cudaError_t err = raise_smem_limit_once(cutlass::device_kernel<Kernel>, kSmem, smem_configured);
        err != cudaSuccess)
      return err;
    const int g = p.group;
    const auto problem = cute::make_tuple(p.batch, p.kv_heads, p.q_len, p.kv_len, p.head_dim);
    for (int gi = 0; gi < g; ++gi) {
      const Element* q = static_cast<const Element*>(p.q) + gi * p.q_head_stride;
      Element* o = static_cast<Element*>(p.out) + gi * p.o_head_stride;
      float* lse = p.lse + int64_t(gi) * p.q_len;
      Consumer lg;
      lg.qk_scale = p.softcap > 0.f ? p.scale / p.softcap : p.scale;
      lg.softcap = p.softcap;
      lg.bias = p.bias;
      lg.bias_dtype = p.bias_dtype;
      lg.bias_batch_stride = p.bias_batch_stride, lg.bias_head_stride = p.bias_head_stride;
      lg.bias_row_stride = p.bias_row_stride, lg.bias_col_stride = p.bias_col_stride;
      lg.bias_hdiv = p.bias_hdiv;
      lg.group = g, lg.group_index = gi;
      lg.bounds = p.bounds;
      typename Kernel::Arguments args{
          problem,
          {{q, Stride{int(p.q_row_stride), _1{}, {int(p.q_batch_stride), int(p.q_head_stride * g)}},
            static_cast<const Element*>(p.k), Stride{int(p.k_row_stride), _1{}, {int(p.k_batch_stride), int(p.k_head_stride)}},
            static_cast<const Element*>(p.v), Stride{int(p.v_row_stride), _1{}, {int(p.v_batch_stride), int(p.v_head_stride)}}},
           lg},
          {o, Stride{int(p.o_row_stride), _1{}, {int(p.o_batch_stride), int(p.o_head_stride * g)}}, lse,
           cute::tuple<_1, cute::tuple<int, int>>{_1{}, {int(int64_t(p.heads) * p.q_len), int(int64_t(g) * p.q_len)}}},
          cutlass::KernelHardwareInfo{}};
      const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
      cutlass::device_kernel<Kernel><<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), kSmem, stream>>>(
          params);
      if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
};

}  // namespace dmattn::sm90

namespace dmattn {

template <int kHeadDim, bool kIsBF16, bool kGeneralLogits>
cudaError_t run_flash_fwd_sm90_logits(const FwdParams& p, cudaStream_t stream) {
  using sm90::KeyRule;
  if (p.bounds.present()) return sm90::FwdKernel<kHeadDim, kIsBF16, KeyRule::kBounded, kGeneralLogits>::run(p, stream);
  return p.is_causal ? sm90::FwdKernel<kHeadDim, kIsBF16, KeyRule::kCausal, kGeneralLogits>::run(p, stream)
                     : sm90::FwdKernel<kHeadDim, kIsBF16, KeyRule::kAll, kGeneralLogits>::run(p, stream);
}

// Softcap or a bias read per element: the general instantiation; no bias or a staged per-key bias: the lean one.
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  const bool general = p.softcap > 0.f || (p.bias != nullptr && !sm90::key_bias_staged(p.bias, p.bias_row_stride));
  return general ? run_flash_fwd_sm90_logits<kHeadDim, kIsBF16, true>(p, stream)
                 : run_flash_fwd_sm90_logits<kHeadDim, kIsBF16, false>(p, stream);
}

}  // namespace dmattn

#define DMATTN_INSTANTIATE_FWD_SM90(D)                                                                    \
  template cudaError_t dmattn::run_flash_fwd_sm90<D, true>(const dmattn::FwdParams&, cudaStream_t);  \
  template cudaError_t dmattn::run_flash_fwd_sm90<D, false>(const dmattn::FwdParams&, cudaStream_t);
