// Kernel assembly and launch of the Hopper forward (csrc/cuda/sm90/flash_fwd_sm90_mainloop.cuh): tile shapes per
// head dim, the tile scheduler, and one launch over every query head (the collectives' loads see a GQA group's heads
// through a static 0 stride of K and V: gqa_problem).
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
#include "cuda/key_lists.h"
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

// One CTA per (query tile, batch, query head), query tiles in reverse: under causality the last tiles see the most
// keys, so they start first and the short ones fill the grid's tail. The G query heads of a kv head are the fastest
// grid coordinate, so that the CTAs reading the same K, V (and a bias or mask per kv head) run together and share
// them in L2. Serving the tile units of a key-list call (`tile_units` set: the live-key lists,
// csrc/cuda/key_lists.h), a CTA whose unit key_list_unit_on_tiles leaves to the Hopper key-list forward has no work.
struct ReverseQueryTiles {
  struct TileUnits {
    const int32_t* key_lists = nullptr;  // nullptr: every CTA works
    int64_t batch_stride = 0, head_stride = 0, m_stride = 0, keys_stride = 0;
    int mask_hdiv = 1;
    int q_len = 0, kv_len = 0;
    bool is_causal = false;
  };
  struct Params {
    dim3 grid;  // (query tiles * G, batch, kv heads)
    int group = 1;
    TileUnits tile_units;
  };
  bool valid_ = true;
  int group_ = 1;

  CUTLASS_DEVICE auto get_block_coord() const {
    const int x = int(gridDim.x - 1 - blockIdx.x);
    return make_coord(x / group_, _0{}, make_coord(int(blockIdx.y), int(blockIdx.z) * group_ + x % group_));
  }

  CUTLASS_DEVICE explicit ReverseQueryTiles(Params const& params) : group_(params.group) {
    TileUnits const& u = params.tile_units;
    if (u.key_lists != nullptr) {
      const auto blk = get_block_coord();
      const int m = get<0>(blk), b = get<0>(get<2>(blk)), h = get<1>(get<2>(blk));
      const int64_t unit = b * u.batch_stride + (h / u.mask_hdiv) * u.head_stride + m * u.m_stride;
      // The keys the unit's rows may see, as the key-list walk counts them (key_list_walk.cuh: last_key + 1).
      const int row_end = min((m + 1) * kKeyListBlockM, u.q_len);
      const int visible = u.is_causal ? row_end + u.kv_len - u.q_len : u.kv_len;
      valid_ = key_list_unit_on_tiles(__ldg(u.key_lists + unit * u.keys_stride), visible);
    }
  }

  template <class ProblemShape, class ClusterShape, class TileShape>
  static Params to_underlying_arguments(ProblemShape const& problem, cutlass::KernelHardwareInfo, ClusterShape const&,
                                        TileShape const&) {
    const int m_tiles = (get<2>(problem) + get<0>(TileShape{}) - 1) / get<0>(TileShape{});
    return Params{dim3(m_tiles, get<0>(problem), get<1>(problem)), 1, {}};
  }
  // The grid for G query heads per kv head (the launcher sets it: the scheduler's arguments see query heads only).
  static Params with_group(Params params, int group) {
    params.grid = dim3(params.grid.x * group, params.grid.y, params.grid.z / group);
    params.group = group;
    return params;
  }
  static dim3 get_grid_shape(Params const& params) { return params.grid; }

  CUTLASS_DEVICE bool is_valid() const { return valid_; }
  CUTLASS_DEVICE ReverseQueryTiles& operator++() {
    valid_ = false;
    return *this;
  }
};

template <int kHeadDim, bool kIsBF16, KeyRule kRule, Logits kLogits>
struct FwdKernel {
  using Element = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  using Tile = FwdTile<kHeadDim>;
  template <int kStageCount>
  using MainloopOf = FwdMainloop<Element, typename Tile::Shape, kRule, kLogits,
                                 cutlass::fmha::kernel::Option<cutlass::fmha::kernel::Tag::kStagesKV,
                                                               cute::Int<kStageCount>>>;
  // The ring of the general and masked instantiations (two slots of a bias tile, 2 bytes an element, and of a mask
  // tile, 1 byte) takes K / V stages where shared memory (227 KB a block) runs out: at D = 128 the general one keeps
  // 4 of 5, the masked one 3; at D = 256 4 and 3 of 4. Its bytes are those the mainloop's SharedStorage declares
  // beyond the base's, whatever the stage count (measured at the tile's).
  using RingProbe = MainloopOf<Tile::kStages>;
  static constexpr int kRingBytes =
      int(sizeof(typename RingProbe::SharedStorage) - sizeof(typename RingProbe::Base::SharedStorage));
  static constexpr int kBlockM = get<0>(typename Tile::Shape{}), kBlockN = get<1>(typename Tile::Shape{});
  static constexpr int kStageBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  // 2048: what the kernel declares beside the mainloop's storage (its pipelines' barriers), and alignment.
  static constexpr int kStagesFit = (kMaxSmemPerBlockSm90 - 2048 - kQBytes - kRingBytes) / kStageBytes;
  static constexpr int kStages = kStagesFit < Tile::kStages ? kStagesFit : Tile::kStages;
  using Mainloop = MainloopOf<kStages>;
  using Epilogue = cutlass::fmha::collective::FmhaFwdEpilogue<Element, float, typename Mainloop::TileShapePV>;
  using Kernel = cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<Mainloop, Epilogue, ReverseQueryTiles>;
  using Stride = cute::tuple<int, _1, cute::tuple<int, int>>;
  // A CTA's query tile is a key-list unit's (ReverseQueryTiles::TileUnits).
  static_assert(get<0>(typename Tile::Shape{}) == kKeyListBlockM);
  // The kernel overlays the epilogue's output tiles on the mainloop's storage; our staged bias lies past the base's.
  static_assert(sizeof(typename Epilogue::TensorStorage) * Mainloop::NumMmaWarpGroups <=
                sizeof(typename Mainloop::Base::SharedStorage));

  static cudaError_t run(const FwdParams& p, cudaStream_t stream) {
    constexpr int kSmem = Kernel::SharedStorageSize;
    static_assert(kSmem <= kMaxSmemPerBlockSm90, "shared memory per block on sm_90");
    static std::atomic<uint64_t> smem_configured{0};
    if (const cudaError_t err = raise_smem_limit_once(cutlass::device_kernel<Kernel>, kSmem, smem_configured);
        err != cudaSuccess)
      return err;
    const int g = p.group;
    CUtensorMap mask_tiles{}, bias_tiles{};
    if constexpr (kLogits == Logits::kMasked) {
      if (const cudaError_t err = encode_mask_tile_map(mask_tiles, p, kBlockM, kBlockN); err != cudaSuccess)
        return err;
    }
    bool bias_tiled = false;
    if constexpr (kLogits != Logits::kLean) {
      if (!key_bias_staged(p.bias, p.bias_row_stride) && bias_tile_map_fits(p)) {
        if (const cudaError_t err = encode_bias_tile_map(bias_tiles, p, kBlockM); err != cudaSuccess) return err;
        bias_tiled = true;
      }
    }
    const auto problem = cute::make_tuple(p.batch, p.heads, p.q_len, p.kv_len, p.head_dim);
    Consumer lg;
    lg.qk_scale = p.softcap > 0.f ? p.scale / p.softcap : p.scale;
    lg.softcap = p.softcap;
    lg.bias = p.bias;
    lg.bias_dtype = p.bias_dtype;
    lg.bias_batch_stride = p.bias_batch_stride, lg.bias_head_stride = p.bias_head_stride;
    lg.bias_row_stride = p.bias_row_stride, lg.bias_col_stride = p.bias_col_stride;
    lg.bias_hdiv = p.bias_hdiv;
    lg.mask = p.mask;
    lg.mask_batch_stride = p.mask_batch_stride, lg.mask_head_stride = p.mask_head_stride;
    lg.mask_hdiv = p.mask_hdiv;
    lg.mask_tiles = mask_tiles;
    lg.bias_tiles = bias_tiles;
    lg.bias_tiled = bias_tiled;
    lg.group = g;
    lg.bounds = p.bounds;
    typename Kernel::Arguments args{
        problem,
        {{static_cast<const Element*>(p.q),
          StrideQ{int(p.q_row_stride), _1{}, {int(p.q_batch_stride), {int(p.q_head_stride), int(p.q_head_stride * g)}}},
          static_cast<const Element*>(p.k),
          StrideKV{int(p.k_row_stride), _1{}, {int(p.k_batch_stride), {_0{}, int(p.k_head_stride)}}},
          static_cast<const Element*>(p.v),
          StrideKV{int(p.v_row_stride), _1{}, {int(p.v_batch_stride), {_0{}, int(p.v_head_stride)}}}},
         lg},
        {static_cast<Element*>(p.out), Stride{int(p.o_row_stride), _1{}, {int(p.o_batch_stride), int(p.o_head_stride)}},
         p.lse, cute::tuple<_1, cute::tuple<int, int>>{_1{}, {int(int64_t(p.heads) * p.q_len), int(p.q_len)}}},
        cutlass::KernelHardwareInfo{}};
    typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
    params.tile_scheduler = ReverseQueryTiles::with_group(params.tile_scheduler, g);
    if (p.key_lists != nullptr)
      params.tile_scheduler.tile_units = {p.key_lists, p.kl_batch_stride, p.kl_head_stride, p.kl_m_stride,
                                          p.kl_keys_stride, p.mask_hdiv, p.q_len, p.kv_len, p.is_causal};
    cutlass::device_kernel<Kernel><<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), kSmem, stream>>>(
        params);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    return cudaSuccess;
  }
};

}  // namespace dmattn::sm90

namespace dmattn {

template <int kHeadDim, bool kIsBF16, sm90::Logits kLogits>
cudaError_t run_flash_fwd_sm90_logits(const FwdParams& p, cudaStream_t stream) {
  using sm90::KeyRule;
  if constexpr (kLogits != sm90::Logits::kMasked) {
    if (p.bounds.present()) return sm90::FwdKernel<kHeadDim, kIsBF16, KeyRule::kBounded, kLogits>::run(p, stream);
  }
  return p.is_causal ? sm90::FwdKernel<kHeadDim, kIsBF16, KeyRule::kCausal, kLogits>::run(p, stream)
                     : sm90::FwdKernel<kHeadDim, kIsBF16, KeyRule::kAll, kLogits>::run(p, stream);
}

// A mask (the dense units of a key-list call, which hold no row bounds): the masked instantiation; softcap or a bias
// read per element: the general one; no bias or a staged per-key bias: the lean one.
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using sm90::Logits;
  if (p.mask != nullptr) return run_flash_fwd_sm90_logits<kHeadDim, kIsBF16, Logits::kMasked>(p, stream);
  const bool general = p.softcap > 0.f || (p.bias != nullptr && !sm90::key_bias_staged(p.bias, p.bias_row_stride));
  return general ? run_flash_fwd_sm90_logits<kHeadDim, kIsBF16, Logits::kGeneral>(p, stream)
                 : run_flash_fwd_sm90_logits<kHeadDim, kIsBF16, Logits::kLean>(p, stream);
}

}  // namespace dmattn

#define DMATTN_INSTANTIATE_FWD_SM90(D)                                                                    \
  template cudaError_t dmattn::run_flash_fwd_sm90<D, true>(const dmattn::FwdParams&, cudaStream_t);  \
  template cudaError_t dmattn::run_flash_fwd_sm90<D, false>(const dmattn::FwdParams&, cudaStream_t);
