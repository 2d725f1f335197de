// Kernel assembly and launch of the Hopper backward's main kernel (csrc/cuda/sm90/flash_bwd_sm90_mainloop.cuh): tile
// shape, CUTLASS's kernel, tile scheduler and dK / dV epilogue, and a kernel entry that does nothing when the
// non-finite scan found an inf or NaN (the sm80 main kernel then runs instead: flash_bwd_dispatch.cu).
#pragma once

#include <atomic>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/kernel_hardware_info.h>

#include "collective/fmha_epilogue_bwd.hpp"
#include "kernel/fmha_kernel_tma_warpspecialized.hpp"
#include "kernel/fmha_tile_scheduler.hpp"
#include "cuda/flash_bwd.h"
#include "cuda/sm90/flash_bwd_sm90.h"
#include "cuda/smem_limit.cuh"
#include "cuda/sm90/flash_bwd_sm90_mainloop.cuh"

namespace dmattn::sm90 {

// 64 query rows per trip, 128 keys per CTA (64 per consumer warpgroup): dK and dV of a warpgroup's keys stay in
// registers over the whole walk (2 x 64 x D fp32), which bounds D at 128.
template <int kHeadDim>
using BwdTileShape = cute::Shape<_64, _128, cute::Int<kHeadDim>>;

template <class Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
    flash_bwd_sm90_kernel(const __grid_constant__ typename Kernel::Params params) {
  if (*params.mainloop.consumer.nonfinite != 0u) return;  // CTA-uniform
  extern __shared__ char smem[];
  Kernel op;
  op(params, smem);
}

template <int kHeadDim, bool kIsBF16, KeyRule kRule, BwdBias kBias, bool kMasked = false>
struct BwdKernel {
  using Element = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  using Mainloop = BwdMainloop<Element, BwdTileShape<kHeadDim>, kRule, kBias, kMasked>;
  using Epilogue = cutlass::fmha::collective::FmhaBwdEpilogueKV<Element, float, typename Mainloop::TileShapePV>;
  // Grid (key tiles, B, Hkv); key tile 0 first, the one that most query tiles see under causality.
  using Scheduler = cutlass::fmha::kernel::TileSchedulerBwdAdapter<cutlass::fmha::kernel::IndividualTileScheduler>;
  using Kernel = cutlass::fmha::kernel::FmhaKernelTmaWarpSpecialized<Mainloop, Epilogue, Scheduler>;
  using Strides = typename Mainloop::Strides;

  static cudaError_t run(const BwdParams& p, cudaStream_t stream) {
    constexpr int kSmem = Kernel::SharedStorageSize;
    static_assert(kSmem <= kMaxSmemPerBlockSm90, "shared memory per block on sm_90");
    static std::atomic<uint64_t> smem_configured{0};
    if (const cudaError_t err = raise_smem_limit_once(flash_bwd_sm90_kernel<Kernel>, kSmem, smem_configured);
        err != cudaSuccess)
      return err;
    const int d = p.head_dim;
    // Canonical layouts (flash_bwd.h) as (batch, head, row, 1) element strides.
    const Strides q_strides{int(int64_t(p.q_len) * p.heads * d), d, p.heads * d, _1{}};
    const Strides k_strides{int(int64_t(p.kv_len) * p.kv_heads * d), d, p.kv_heads * d, _1{}};
    const auto problem = cute::make_tuple(p.batch, p.kv_heads, p.q_len, p.kv_len, d);
    BwdConsumer consumer;
    consumer.lse = p.lse;
    consumer.delta = p.delta;
    consumer.scale = p.scale;
    consumer.heads = p.heads;
    consumer.group = p.group;
    consumer.nonfinite = p.nonfinite;
    consumer.bias = p.bias;
    consumer.bias_dtype = p.bias_dtype;
    consumer.bias_batch_stride = p.bias_batch_stride, consumer.bias_head_stride = p.bias_head_stride;
    consumer.bias_row_stride = p.bias_row_stride, consumer.bias_col_stride = p.bias_col_stride;
    consumer.bias_hdiv = p.bias_hdiv;
    consumer.dbias = p.dbias;
    consumer.dbias_accum = p.dbias_accum;
    consumer.dbias_mode = p.dbias_mode;
    consumer.bounds = p.bounds;
    consumer.mask = p.mask;
    consumer.mask_batch_stride = p.mask_batch_stride, consumer.mask_head_stride = p.mask_head_stride;
    consumer.mask_row_stride = p.mask_row_stride;
    consumer.mask_hdiv = p.mask_hdiv;
    consumer.classes = p.classes;
    consumer.cls_batch_stride = p.cls_batch_stride, consumer.cls_head_stride = p.cls_head_stride;
    consumer.cls_m_stride = p.cls_m_stride, consumer.cls_n_stride = p.cls_n_stride;
    typename Kernel::Arguments args{
        problem,
        {static_cast<const Element*>(p.q), q_strides, static_cast<const Element*>(p.k), k_strides,
         static_cast<const Element*>(p.v), k_strides, static_cast<const Element*>(p.dout), q_strides, p.dq_accum,
         q_strides, consumer},
        {static_cast<Element*>(p.dk), k_strides, static_cast<Element*>(p.dv), k_strides},
        cutlass::KernelHardwareInfo{}};
    const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
    flash_bwd_sm90_kernel<Kernel>
        <<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), kSmem, stream>>>(params);
    return cudaGetLastError();
  }
};

}  // namespace dmattn::sm90

namespace dmattn {

template <int kHeadDim, bool kIsBF16, sm90::BwdBias kBias>
cudaError_t run_flash_bwd_sm90_rule(const BwdParams& p, cudaStream_t stream) {
  using sm90::KeyRule;
  if (p.bounds.present()) return sm90::BwdKernel<kHeadDim, kIsBF16, KeyRule::kBounded, kBias>::run(p, stream);
  return p.is_causal ? sm90::BwdKernel<kHeadDim, kIsBF16, KeyRule::kCausal, kBias>::run(p, stream)
                     : sm90::BwdKernel<kHeadDim, kIsBF16, KeyRule::kAll, kBias>::run(p, stream);
}

template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_sm90(const BwdParams& p, cudaStream_t stream) {
  using sm90::BwdBias;
  using sm90::KeyRule;
  if (p.mask != nullptr) {  // with a bias with query rows, without row bounds (flash_bwd_sm90_serves)
    return p.is_causal ? sm90::BwdKernel<kHeadDim, kIsBF16, KeyRule::kCausal, BwdBias::kRows, true>::run(p, stream)
                       : sm90::BwdKernel<kHeadDim, kIsBF16, KeyRule::kAll, BwdBias::kRows, true>::run(p, stream);
  }
  if (p.bias == nullptr) return run_flash_bwd_sm90_rule<kHeadDim, kIsBF16, BwdBias::kNone>(p, stream);
  return p.bias_row_stride == 0 ? run_flash_bwd_sm90_rule<kHeadDim, kIsBF16, BwdBias::kKeys>(p, stream)
                                : run_flash_bwd_sm90_rule<kHeadDim, kIsBF16, BwdBias::kRows>(p, stream);
}

}  // namespace dmattn

#define DMATTN_INSTANTIATE_BWD_SM90(D)                                                                    \
  template cudaError_t dmattn::run_flash_bwd_sm90<D, true>(const dmattn::BwdParams&, cudaStream_t);  \
  template cudaError_t dmattn::run_flash_bwd_sm90<D, false>(const dmattn::BwdParams&, cudaStream_t);
