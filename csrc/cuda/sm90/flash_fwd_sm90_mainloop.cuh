// Hopper (sm_90a) forward mainloop for the calls without a mask: plain, causal (bottom-right), any broadcast bias,
// softcap, GQA, Lq != Lk, and row bounds (segment ids, a window, sequence lengths: row_bounds.h). It builds on
// CUTLASS's Hopper FMHA collectives, included from the nvidia-cutlass wheel's examples/88_hopper_fmha (never copied
// here): their TMA loads of Q once and of K / V tiles into a shared memory ring of up to 5 stages (one producer
// warp), their warp-specialised kernel (two consumer warpgroups of 64 query rows each, with register reallocation)
// and their epilogue (O through shared memory and a TMA store, the LSE per row). What this file adds is the
// consumer's compute step, because the logits are ours: scale and softcap as the other kernels do, the bias (any
// broadcast: strides; a bias constant along query rows, the paper's per-key bias, staged per key tile in shared
// memory by the kernel's otherwise idle reducer warp; a bf16 / f16 bias with query rows loaded by that warp's TMA
// tile by tile; any other read per element), bottom-right causal,
// rows with no key (out 0, lse -inf) and the natural-log LSE the backward reads; with row bounds also the K / V
// load, which starts at the CTA's first visible key tile instead of tile 0. docs/cuda_kernels.md describes the
// pipeline.
#pragma once

#include <climits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cutlass.h>

#include "collective/fmha_collective_tma_warpspecialized.hpp"
#include "collective/fmha_common.hpp"
#include "cuda/bias_element.cuh"
#include "cuda/sm90/key_rule.h"
#include "row_bounds.h"
#include "cuda/fast_exp2.cuh"
#include "cuda/half_float.cuh"
#include "cuda/sm90/bias_tile_map.h"
#include "cuda/sm90/mask_tile_map.h"
#include "log_constants.h"

namespace dmattn::sm90 {

using namespace cute;

// Named barriers of a producer / consumer handshake through shared memory (`id` counts from CUTLASS's first user
// barrier, as NamedBarrier's ids do): the producer's threads arrive after their stores, the consumer's wait before
// their loads. Unlike NamedBarrier's, these are compiler memory barriers too, so no shared-memory access moves
// across them.
CUTLASS_DEVICE void named_barrier_arrive(int threads, int id) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id + int(cutlass::arch::ReservedNamedBarriers::FirstUserBarrier)),
               "r"(threads)
               : "memory");
}
CUTLASS_DEVICE void named_barrier_sync(int threads, int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id + int(cutlass::arch::ReservedNamedBarriers::FirstUserBarrier)),
               "r"(threads)
               : "memory");
}

// Which key tiles a CTA of BlockM query rows visits, in order 0 .. trips - 1: all keys, or with bottom-right causality
// (row i sees key j iff j <= i + Lk - Lq) those up to its last row's limit. The trips from the unmasked count on need
// the per-element test (the causal diagonal, the partial last key tile); earlier ones hold keys every row of the CTA
// sees. Always at
// least one trip, so that the pipelines run even for a CTA whose rows see no key (all of it masked). The CUTLASS
// producer reads get_trip_count through a default-constructed object, so everything comes from the tile coordinate
// and the problem shape (B, H, Lq, Lk, D).
template <KeyRule kRule>
struct KeyTiles {
  static constexpr bool kCausal = kRule == KeyRule::kCausal;
  template <class BlkCoord, class TileShape, class ProblemShape>
  CUTLASS_DEVICE int get_trip_count(BlkCoord const& blk, TileShape const&, ProblemShape const& problem) const {
    constexpr int kBlockM = get<0>(TileShape{}), kBlockN = get<1>(TileShape{});
    const int lq = get<2>(problem), lk = get<3>(problem);
    int limit = lk;
    if constexpr (kCausal) limit = min(lk, (int(get<0>(blk)) + 1) * kBlockM + lk - lq);
    return limit > kBlockN ? (limit + kBlockN - 1) / kBlockN : 1;
  }

  template <class BlkCoord, class TileShape, class ProblemShape>
  CUTLASS_DEVICE int get_unmasked_trip_count(BlkCoord const& blk, TileShape const& tile,
                                             ProblemShape const& problem) const {
    static_assert(kRule != KeyRule::kBounded, "bounded CTAs test each tile (BoundedSpan)");
    constexpr int kBlockM = get<0>(TileShape{}), kBlockN = get<1>(TileShape{});
    const int lq = get<2>(problem), lk = get<3>(problem);
    int full = lk / kBlockN;
    if constexpr (kCausal) {
      const int seen_by_all = int(get<0>(blk)) * kBlockM + lk - lq + 1;  // keys [0, seen_by_all) in every row
      full = min(full, seen_by_all > 0 ? seen_by_all / kBlockN : 0);
    }
    return min(full, get_trip_count(blk, tile, problem));
  }
};

// The key tiles [first, first + trips) a CTA of kBlockM query rows starting at row0 visits under row bounds: the keys
// its rows may keep lie in [lo(first row), hi(last row)) since both are non-decreasing. A CTA whose rows keep no key
// still makes one trip (over a tile the per-element test masks whole), so that the pipelines run.
struct BoundedSpan {
  int first = 0, trips = 1;

  template <int kBlockM, int kBlockN>
  CUTLASS_DEVICE static BoundedSpan of(RowBounds const& bounds, int b, int row0, int lq, int lk) {
    const int lo = bounds.lo(b, row0), hi = bounds.hi(b, min(row0 + kBlockM, lq) - 1);
    const int tiles = (lk + kBlockN - 1) / kBlockN;
    if (hi <= lo) return BoundedSpan{min(lo / kBlockN, tiles - 1), 1};
    const int first = lo / kBlockN;
    return BoundedSpan{first, (hi + kBlockN - 1) / kBlockN - first};
  }
};

// What the consumer step needs beyond the collectives' TMA parameters: the logit rule (scale, softcap, bias). A CTA's
// head coordinate is its query head.
struct Consumer {
  float qk_scale = 1.f;  // scale; with softcap: scale / softcap (the tanh argument)
  float softcap = 0.f;   // 0: off
  const void* bias = nullptr;
  DType bias_dtype = DType::kF32;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;
  int bias_hdiv = 1;
  // A bool mask (the tile units of a key-list call: flash_fwd_sm90_serves_tile_units), read by the masked
  // instantiation only, through its TMA map (mask_tile_map.h); mask head of query head h is h / mask_hdiv, a stride
  // of 0 broadcasts. nullptr: none.
  const uint8_t* mask = nullptr;
  int64_t mask_batch_stride = 0, mask_head_stride = 0;
  int mask_hdiv = 1;
  CUtensorMap mask_tiles;
  // A bias with query rows that the TMA can map (bias_tile_map.h): the general and masked instantiations load it
  // tile by tile through `bias_tiles` into shared memory; otherwise (bias_tiled false) the consumers read it per
  // element.
  CUtensorMap bias_tiles;
  bool bias_tiled = false;
  int group = 1;  // query heads per kv head (gqa_problem)
  RowBounds bounds;  // read with KeyRule::kBounded only
};

// A bias constant along query rows (row stride 0: the paper's per-key bias, any broadcast of it) is staged per key
// tile by the bias warp; any other bias is read per element by the consumers. The launcher picks the instantiation
// by the same rule.
CUTLASS_HOST_DEVICE bool key_bias_staged(const void* bias, int64_t bias_row_stride) {
  return bias != nullptr && bias_row_stride == 0;
}

// The collectives' loads see the heads as (member, kv head) (gqa_problem): query head h is member h % G of kv head
// h / G, so that one launch covers every query head. Q strides (row, 1, (batch, (head, G heads))); K and V (row, 1,
// (batch, (0, head))): the static 0 makes the member no coordinate of their TMA (CuTe drops the mode).
using StrideQ = cute::tuple<int, _1, cute::tuple<int, cute::tuple<int, int>>>;
using StrideKV = cute::tuple<int, _1, cute::tuple<int, cute::tuple<_0, int>>>;

// The kernel's problem (batch, query heads, Lq, Lk, D) as the collectives' loads see it: heads as (G, kv heads).
template <class ProblemShape>
CUTLASS_HOST_DEVICE auto gqa_problem(ProblemShape const& problem, int group) {
  return make_shape(get<0>(problem), make_shape(group, get<1>(problem) / group), get<2>(problem), get<3>(problem),
                    get<4>(problem));
}

// Which logit paths an instantiation holds. kGeneral: a softcap or a bias read per element (one with query rows);
// kLean: neither (no bias, or a staged per-key bias), so that the consumers hold no registers for them (ptxas,
// sm_90a: no spills at D = 64 and 128, against 60-132 bytes at D = 128 and 128-136 at D = 256 with them); kMasked:
// kGeneral's and a bool mask whose tiles the TMA loads (the tile units of a key-list call: mask_tile_map.h), apart
// since its byte tests add about 200 bytes of spills at D = 128.
enum class Logits { kLean, kGeneral, kMasked };

// The CUTLASS mainloop with our consumer step. Producer side (TMA loads of Q, K, V), shared storage, pipelines and
// tiled MMAs are the base's; its Params travel inside ours.
template <class Element, class TileShape_, KeyRule kRule, Logits kLogits, class... Options>
struct FwdMainloop
    : cutlass::fmha::collective::FmhaMainloopTmaWarpSpecialized<Element, float, float, TileShape_, StrideQ, StrideKV,
                                                                StrideKV, KeyTiles<kRule>, Options...> {
  using Base = cutlass::fmha::collective::FmhaMainloopTmaWarpSpecialized<Element, float, float, TileShape_, StrideQ,
                                                                         StrideKV, StrideKV, KeyTiles<kRule>,
                                                                         Options...>;
  static constexpr bool kCausal = kRule == KeyRule::kCausal;
  static constexpr bool kBounded = kRule == KeyRule::kBounded;
  static constexpr bool kGeneralLogits = kLogits != Logits::kLean;
  static constexpr bool kMasked = kLogits == Logits::kMasked;
  static_assert(!(kMasked && kBounded), "a masked call holds no row bounds (flash_fwd_sm90_serves_tile_units)");
  using typename Base::MainloopPipeline;
  using typename Base::MainloopPipelineQ;
  using typename Base::PipelineState;
  using typename Base::PipelineStateQ;
  using typename Base::SmemLayoutK;
  using typename Base::SmemLayoutQ;
  using typename Base::SmemLayoutV;
  using typename Base::TiledMmaPV;
  using typename Base::TiledMmaQK;
  using typename Base::TileShape;
  using typename Base::TileShapePV;
  using typename Base::TileShapeQK;

  static constexpr int kBlockM = get<0>(TileShape{});
  static constexpr int kBlockN = get<1>(TileShape{});
  static constexpr int kWarpGroupThreads = cutlass::NumThreadsPerWarpGroup;

  // The per-key bias ring (section "Hopper forward" of docs/cuda_kernels.md): the bias warp stages key tile t into
  // slot t % kBiasSlots; per slot, one "filled" barrier per consumer warpgroup (the bias warp arrives, the
  // warpgroup waits) and one "free" barrier (every consumer thread arrives, the bias warp waits). CUTLASS leaves 8
  // named barriers to its users.
  static constexpr int kBiasSlots = 2;
  static constexpr int kBiasFilledThreads = cutlass::NumThreadsPerWarp + kWarpGroupThreads;
  static constexpr int kBiasFreeThreads = cutlass::NumThreadsPerWarp + Base::NumMmaWarpGroups * kWarpGroupThreads;
  static constexpr int kBiasPerLane = kBlockN / cutlass::NumThreadsPerWarp;
  static_assert(kBlockN % cutlass::NumThreadsPerWarp == 0, "the bias warp stages whole key tiles");
  static_assert(kBiasSlots * (Base::NumMmaWarpGroups + 1) <= 8, "named barriers left to users");
  CUTLASS_DEVICE static int bias_filled_barrier(int slot, int wg) {
    return slot * (Base::NumMmaWarpGroups + 1) + wg;
  }
  CUTLASS_DEVICE static int bias_free_barrier(int slot) {
    return slot * (Base::NumMmaWarpGroups + 1) + Base::NumMmaWarpGroups;
  }

  // Tiles by TMA (general and masked instantiations): key tile t's [BlockM, BlockN] bias elements (a bias with query
  // rows, bias_tile_map.h: BlockN / 64 boxes of 64 keys) and, masked, its mask bytes (mask_tile_map.h) land in slot
  // t % kBiasSlots (the bias ring's slot, under its barriers), and `landed` completes when they are there.
  static constexpr uint32_t kMaskTileSwizzle = mask_tile_swizzle(kBlockN);
  static_assert(!kMasked || kBlockN == 64 || kBlockN == 128, "mask tiles of 64 or 128 bytes a row (mask_tile_map.h)");
  static_assert(kBlockN % kBiasBoxKeys == 0, "bias tiles of whole boxes (bias_tile_map.h)");
  static constexpr int kBiasBoxBytes = kBlockM * kBiasBoxKeys * 2;
  struct StagedKeyBias {
    alignas(16) float values[kBiasSlots][kBlockN];
    int drops[kBiasSlots];
  };
  struct BiasTiles {
    alignas(1024) uint16_t elems[kBiasSlots][kBlockM * kBlockN];
  };
  // A call stages a per-key bias or loads bias tiles, never both (bias_tile_map_fits wants query rows), so the two
  // share their bytes: at D = 128 the general instantiation then keeps 4 K / V stages and the masked one 3.
  union KeyBiasOrTiles {
    StagedKeyBias key;
    BiasTiles tiles;
  };
  struct KeyBiasOnly {
    StagedKeyBias key;
  };
  struct MaskTiles {
    alignas(1024) uint8_t bytes[kBiasSlots][kBlockM][kBlockN];
  };
  struct NoMaskTiles {};

  // The base's Q and K / V tiles, then the bias warp's ring: kBiasSlots key tiles of a per-key bias (times log2 e)
  // and whether each holds a -inf, or of bias tiles; mask tiles; the TMA's barriers. They lie past the base's
  // storage, so the epilogue's output tiles, which the kernel overlays on the mainloop's storage, never reach them.
  struct SharedStorage : Base::SharedStorage {
    std::conditional_t<kGeneralLogits, KeyBiasOrTiles, KeyBiasOnly> bias;
    std::conditional_t<kMasked, MaskTiles, NoMaskTiles> mask;
    alignas(8) uint64_t landed[kBiasSlots];
  };

  struct Arguments {
    typename Base::Arguments base;
    Consumer consumer;
  };
  struct Params {
    typename Base::Params base;
    Consumer consumer;
  };

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem, Arguments const& args) {
    return Base::can_implement(problem, args.base);
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem, Arguments const& args, void* workspace) {
    return Params{Base::to_underlying_arguments(gqa_problem(problem, args.consumer.group), args.base, workspace),
                  args.consumer};
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    Base::prefetch_tma_descriptors(params.base);
  }

  template <bool kLoadQ, class BlkCoord, class ProblemShape, class LoadWarpBarrier>
  CUTLASS_DEVICE void load_kv_maybe_q(int block_rank_in_cluster, BlkCoord const& blk_coord, Params const& params,
                                      ProblemShape const& problem, MainloopPipeline& pipeline,
                                      PipelineState& smem_pipe_write, MainloopPipelineQ& pipeline_q,
                                      PipelineStateQ& smem_pipe_write_q, SharedStorage& storage,
                                      LoadWarpBarrier& load_warp_barrier, bool do_barrier) {
    if constexpr (!kBounded) {
      Base::template load_kv_maybe_q<kLoadQ>(block_rank_in_cluster, blk_coord, params.base,
                                             gqa_problem(problem, params.consumer.group), pipeline, smem_pipe_write,
                                             pipeline_q, smem_pipe_write_q, storage, load_warp_barrier, do_barrier);
    } else {
      load_bounded_kv_and_q(block_rank_in_cluster, blk_coord, params, problem, pipeline, smem_pipe_write, pipeline_q,
                            smem_pipe_write_q, storage);
      static_assert(kLoadQ, "the bounded load also loads Q (our kernels keep the one-warp K / V / Q load)");
    }
  }

  // The producer of a bounded CTA: the base's TMA loads in the base's order (Q of the first warpgroup, K of the first
  // tile, the other warpgroups' Q, V of the first tile, then K and V tile by tile), over the CTA's span of key tiles
  // instead of tiles 0 .. trips - 1. The collectives' loads address a tile by the iterator's value.
  template <class BlkCoord, class ProblemShape>
  CUTLASS_DEVICE void load_bounded_kv_and_q(int block_rank_in_cluster, BlkCoord const& blk_coord,
                                            Params const& params, ProblemShape const& problem,
                                            MainloopPipeline& pipeline, PipelineState& smem_pipe_write,
                                            MainloopPipelineQ& pipeline_q, PipelineStateQ& smem_pipe_write_q,
                                            SharedStorage& storage) {
    static_assert(size(typename Base::ClusterShape{}) == 1, "no TMA multicast");
    const BoundedSpan span = BoundedSpan::of<kBlockM, kBlockN>(
        params.consumer.bounds, int(get<0>(get<2>(blk_coord))), int(get<0>(blk_coord)) * kBlockM,
        get<2>(problem), get<3>(problem));
    const int lane_predicate = cute::elect_one_sync();
    auto q_tiles = cute::make_coord_iterator(Int<Base::NumMmaWarpGroups>{});
    int q_count = Base::NumMmaWarpGroups;
    auto kv_tiles = cute::make_coord_iterator(span.first, span.first + span.trips);
    int kv_count = 2 * span.trips;  // K and V loads count down one counter; the V load advances the iterator
    const auto loads = gqa_problem(problem, params.consumer.group);
    typename Base::LoadQ load_q{params.base.tma_load_q, pipeline_q, storage.smem_q};
    auto q_state = load_q.init_state(_0{}, loads, TileShapeQK{}, blk_coord, Base::NumMmaWarpGroups);
    typename Base::LoadK load_k{params.base.tma_load_k, pipeline, storage.smem_k};
    auto k_state = load_k.init_state(block_rank_in_cluster, loads, TileShapeQK{}, blk_coord, span.trips);
    typename Base::LoadV load_v{params.base.tma_load_v, pipeline, storage.smem_v};
    auto v_state = load_v.init_state(block_rank_in_cluster, loads, TileShapePV{}, blk_coord, span.trips);
    load_q.step(q_tiles, q_state, smem_pipe_write_q, lane_predicate, q_count);
    load_k.template step<false>(kv_tiles, k_state, smem_pipe_write, lane_predicate, kv_count);
    while (q_count > 0) load_q.step(q_tiles, q_state, smem_pipe_write_q, lane_predicate, q_count);
    load_v.template step<true>(kv_tiles, v_state, smem_pipe_write, lane_predicate, kv_count);
    CUTLASS_PRAGMA_NO_UNROLL
    while (kv_count > 0) {
      load_k.template step<false>(kv_tiles, k_state, smem_pipe_write, lane_predicate, kv_count);
      load_v.template step<true>(kv_tiles, v_state, smem_pipe_write, lane_predicate, kv_count);
    }
  }

  template <class BlkCoord, class ProblemShape, class LoadWarpBarrier>
  CUTLASS_DEVICE void load_maybe_q(BlkCoord const& blk_coord, Params const& params, ProblemShape const& problem,
                                   MainloopPipelineQ& pipeline_q, PipelineStateQ& smem_pipe_write_q,
                                   SharedStorage& storage, LoadWarpBarrier& load_warp_barrier, bool do_barrier) {
    Base::load_maybe_q(blk_coord, params.base, gqa_problem(problem, params.consumer.group), pipeline_q,
                       smem_pipe_write_q, storage, load_warp_barrier, do_barrier);
  }

  CUTLASS_DEVICE static bool stages_key_bias(Consumer const& lg) {
    return key_bias_staged(lg.bias, lg.bias_row_stride);
  }
  // The masked instantiation is launched only with a mask (run_flash_fwd_sm90), so its mask needs no test.
  CUTLASS_DEVICE static bool stages_mask(Consumer const&) { return kMasked; }
  CUTLASS_DEVICE static bool stages_bias_tiles(Consumer const& lg) { return kGeneralLogits && lg.bias_tiled; }
  // Whether the bias warp stages anything, so that the consumers take part in its handshake.
  CUTLASS_DEVICE static bool stages(Consumer const& lg) {
    return stages_key_bias(lg) || stages_mask(lg) || stages_bias_tiles(lg);
  }

  // The bias's batch and head offset for the CTA's (batch, query head).
  CUTLASS_DEVICE static int64_t bias_offset(Consumer const& lg, int b, int h) {
    return lg.bias == nullptr ? 0
                              : int64_t(b) * lg.bias_batch_stride +
                                    int64_t(h / lg.bias_hdiv) * lg.bias_head_stride;
  }

  // The key tiles [first, first + trips) the CTA visits: from 0 without bounds, its BoundedSpan with them.
  template <class BlkCoord, class ProblemShape>
  CUTLASS_DEVICE static cute::tuple<int, int> key_span(BlkCoord const& blk_coord, Params const& params,
                                                       ProblemShape const& problem) {
    if constexpr (kBounded) {
      const BoundedSpan span = BoundedSpan::of<kBlockM, kBlockN>(
          params.consumer.bounds, int(get<0>(get<2>(blk_coord))), int(get<0>(blk_coord)) * kBlockM,
          get<2>(problem), get<3>(problem));
      return make_tuple(span.first, span.trips);
    } else {
      return make_tuple(0, KeyTiles<kRule>{}.get_trip_count(blk_coord, TileShape{}, problem));
    }
  }

  // The bias warp: the kernel's reducer warp, which the forward has no other use for. It stages a per-key bias for
  // the consumers, one key tile per trip (times log2 e, and whether the tile holds a -inf), into the ring's slots.
  // A tile's loads are issued before the wait for its slot, so their latency hides behind the consumers' trips;
  // the consumers only wait at a filled barrier and read shared memory. With tiles to load (a mask, a bias with
  // query rows) it runs reduce_tiles instead.
  template <class BlkCoord, class ProblemShape, class PipelineReducer, class PipelineStateReducer>
  CUTLASS_DEVICE void reduce(BlkCoord const& blk_coord, Params const& params, ProblemShape const& problem,
                             PipelineReducer&, PipelineStateReducer&, SharedStorage& storage) {
    Consumer const& lg = params.consumer;
    if constexpr (kGeneralLogits) {
      if (stages_mask(lg) || stages_bias_tiles(lg)) return reduce_tiles(blk_coord, params, problem, storage);
    }
    if (!stages_key_bias(lg)) return;
    const int lk = get<3>(problem);
    const int b = get<0>(get<2>(blk_coord)), h = get<1>(get<2>(blk_coord));
    const int64_t base = bias_offset(lg, b, h);
    const auto span = key_span(blk_coord, params, problem);
    const int first = get<0>(span), trips = get<1>(span);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int trip = 0; trip < trips; ++trip) {
      const int slot = trip % kBiasSlots;
      float v[kBiasPerLane];
      const bool drops = load_key_bias(lg, base, (first + trip) * kBlockN, lk, v);
      if (trip >= kBiasSlots) named_barrier_sync(kBiasFreeThreads, bias_free_barrier(slot));
      store_key_bias(storage, slot, v, drops);
      CUTLASS_PRAGMA_UNROLL
      for (int wg = 0; wg < Base::NumMmaWarpGroups; ++wg)
        named_barrier_arrive(kBiasFilledThreads, bias_filled_barrier(slot, wg));
    }
    // The consumers' arrivals of the last trips, so that every free barrier completes before the next work tile.
    CUTLASS_PRAGMA_NO_UNROLL
    for (int trip = max(trips, kBiasSlots) - kBiasSlots; trip < trips; ++trip)
      named_barrier_sync(kBiasFreeThreads, bias_free_barrier(trip % kBiasSlots));
  }

  // A lane's values of the per-key bias of key tile [key0, key0 + BlockN) (times log2 e), and whether the tile holds
  // a -inf (the same on every lane).
  CUTLASS_DEVICE static bool load_key_bias(Consumer const& lg, int64_t base, int key0, int lk,
                                           float (&v)[kBiasPerLane]) {
    const int lane = int(threadIdx.x) % cutlass::NumThreadsPerWarp;
    bool drops = false;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kBiasPerLane; ++j) {
      // Keys past Lk read the last key's value; the consumers mask those keys whatever their bias.
      const int key = min(key0 + j * cutlass::NumThreadsPerWarp + lane, lk - 1);
      v[j] = load_bias(lg.bias, base + int64_t(key) * lg.bias_col_stride, lg.bias_dtype) * kLog2e;
      drops |= v[j] == -INFINITY;
    }
    return __any_sync(0xffffffffu, drops);
  }

  CUTLASS_DEVICE static void store_key_bias(SharedStorage& storage, int slot, float const (&v)[kBiasPerLane],
                                            bool drops) {
    const int lane = int(threadIdx.x) % cutlass::NumThreadsPerWarp;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < kBiasPerLane; ++j) storage.bias.key.values[slot][j * cutlass::NumThreadsPerWarp + lane] = v[j];
    if (lane == 0) storage.bias.key.drops[slot] = drops;
  }

  // The bias warp with tiles to load (a mask, a bias with query rows): besides a per-key bias, it has the TMA load
  // the mask's [BlockM, BlockN] bytes and the bias's elements of each key tile into the tile's ring slot, one tile
  // ahead: tile t + 1's loads are issued once the consumers are done with tile t - 1 (the slot's previous tile), and
  // tile t is handed over when its bytes have landed. The loads cost the warp a few instructions a tile; rows past
  // Lq and keys past Lk land as 0.
  template <class BlkCoord, class ProblemShape>
  CUTLASS_DEVICE void reduce_tiles(BlkCoord const& blk_coord, Params const& params, ProblemShape const& problem,
                                   SharedStorage& storage) {
    static_assert(kBiasSlots == 2, "a slot is reloaded once the tile before it is done");
    Consumer const& lg = params.consumer;
    const bool key_bias = stages_key_bias(lg);
    const int lk = get<3>(problem);
    const int b = get<0>(get<2>(blk_coord)), h = get<1>(get<2>(blk_coord));
    const int64_t base = bias_offset(lg, b, h);
    const auto span = key_span(blk_coord, params, problem);
    const int first = get<0>(span), trips = get<1>(span);
    const bool leader = int(threadIdx.x) % cutlass::NumThreadsPerWarp == 0;
    const int row0 = int(get<0>(blk_coord)) * kBlockM;
    const bool masked = stages_mask(lg), bias_tiled = stages_bias_tiles(lg);
    const int mask_head = lg.mask_head_stride == 0 ? 0 : h / lg.mask_hdiv;
    const int mask_batch = lg.mask_batch_stride == 0 ? 0 : b;
    const int bias_head = lg.bias_head_stride == 0 ? 0 : h / lg.bias_hdiv;
    const int bias_batch = lg.bias_batch_stride == 0 ? 0 : b;
    const uint32_t tile_bytes = (masked ? kBlockM * kBlockN : 0) + (bias_tiled ? kBlockM * kBlockN * 2 : 0);
    using Landed = cutlass::arch::ClusterTransactionBarrier;
    if (leader) {
      CUTLASS_PRAGMA_UNROLL
      for (int s = 0; s < kBiasSlots; ++s) Landed::init(&storage.landed[s], 1);
      cutlass::arch::fence_barrier_init();
    }
    __syncwarp();
    auto load = [&](int trip) {
      if (!leader) return;
      const int slot = trip % kBiasSlots;
      const int key0 = (first + trip) * kBlockN;
      Landed::arrive_and_expect_tx(&storage.landed[slot], tile_bytes);
      if constexpr (kMasked) {  // the masked instantiation runs only with a mask
        cute::SM90_TMA_LOAD_4D::copy(&lg.mask_tiles, &storage.landed[slot],
                                     uint64_t(cute::TMA::CacheHintSm90::EVICT_FIRST), &storage.mask.bytes[slot][0][0],
                                     key0, row0, mask_head, mask_batch);
      }
      if (bias_tiled) {
        CUTLASS_PRAGMA_UNROLL
        for (int box = 0; box < kBlockN / kBiasBoxKeys; ++box)
          cute::SM90_TMA_LOAD_4D::copy(&lg.bias_tiles, &storage.landed[slot],
                                       uint64_t(cute::TMA::CacheHintSm90::EVICT_FIRST),
                                       &storage.bias.tiles.elems[slot][box * kBlockM * kBiasBoxKeys],
                                       key0 + box * kBiasBoxKeys, row0, bias_head, bias_batch);
      }
    };
    if (trips > 0) load(0);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int trip = 0; trip < trips; ++trip) {
      const int slot = trip % kBiasSlots;
      float v[kBiasPerLane];
      bool drops = false;
      if (key_bias) drops = load_key_bias(lg, base, (first + trip) * kBlockN, lk, v);
      if (trip >= 1) named_barrier_sync(kBiasFreeThreads, bias_free_barrier((trip - 1) % kBiasSlots));
      if (trip + 1 < trips) load(trip + 1);
      if (key_bias) store_key_bias(storage, slot, v, drops);
      Landed::wait(&storage.landed[slot], (trip / kBiasSlots) % 2);
      CUTLASS_PRAGMA_UNROLL
      for (int wg = 0; wg < Base::NumMmaWarpGroups; ++wg)
        named_barrier_arrive(kBiasFilledThreads, bias_filled_barrier(slot, wg));
    }
    // The consumers' arrival of the last trip, so that every free barrier completes before the next work tile.
    if (trips > 0) named_barrier_sync(kBiasFreeThreads, bias_free_barrier((trips - 1) % kBiasSlots));
  }

  // -inf where the mask drops the pair (whatever q.k is, as a bias of -inf), from the tile's bytes as the TMA left
  // them (mask_tile_map.h: 16-byte pieces of a row swizzled by its address). A warp whose 16 rows keep every key of
  // the tile returns after one pass over them; otherwise each lane reads the two words of each 16-byte piece of its
  // rows that hold its bytes (a warp's eight rows lie in different banks) and each element tests its byte.
  template <class Acc, class TileCoords>
  CUTLASS_DEVICE static void apply_mask(Acc& acc, const uint8_t* tile, TileCoords const& cT, int wg_row0) {
    using cutlass::fmha::collective::layout_acc_mn;
    constexpr int kWarpRows = 16;  // a warp's rows of the wgmma accumulator
    const int lane = int(threadIdx.x) % cutlass::NumThreadsPerWarp;
    const int warp_row0 = wg_row0 + kWarpRows * (int(threadIdx.x) / cutlass::NumThreadsPerWarp % 4);
    {
      constexpr int kPiecesPerLane = kWarpRows * kBlockN / 16 / cutlass::NumThreadsPerWarp;
      const uint4* pieces = reinterpret_cast<const uint4*>(tile + warp_row0 * kBlockN);
      uint32_t zero_bytes = 0;
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kPiecesPerLane; ++k) {
        const uint4 w = pieces[k * cutlass::NumThreadsPerWarp + lane];
        zero_bytes |= has_zero_byte(w.x) | has_zero_byte(w.y) | has_zero_byte(w.z) | has_zero_byte(w.w);
      }
      if (__all_sync(0xffffffffu, zero_bytes == 0)) return;
    }
    Tensor s_mn = make_tensor(acc.data(), layout_acc_mn(TiledMmaQK{}, acc.layout()));
    Tensor t_mn = make_tensor(cT.data(), layout_acc_mn(TiledMmaQK{}, cT.layout()));
    static_assert(decltype(size<1>(s_mn))::value == kBlockN / 4, "a quad lane's columns: pairs 8 apart");
    const int c0 = int(get<1>(t_mn(0, 0)));  // 2 * (lane % 4)
    // The lane's two bytes of each 8 keys: word c0 / 4 of the piece's first and second half, at byte c0 % 4.
    const int word = c0 / 4;
    const int shift = 8 * (c0 % 4);
    const uint32_t tile_address = uint32_t(__cvta_generic_to_shared(tile));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size<0>(s_mn); ++i) {
      const int r = wg_row0 + int(get<0>(t_mn(i, 0)));
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kBlockN / 16; ++k) {
        const uint32_t* piece = reinterpret_cast<const uint32_t*>(
            tile + mask_tile_piece(tile_address, uint32_t(r * kBlockN + 16 * k), kMaskTileSwizzle));
        const uint32_t lo = piece[word] >> shift, hi = piece[2 + word] >> shift;
        // Columns 16 k + c0 + {0, 1} and 16 k + 8 + c0 + {0, 1}: j = 4 k .. 4 k + 3.
        if (!(lo & 0xffu)) s_mn(i, 4 * k) = -INFINITY;
        if (!(lo & 0xff00u)) s_mn(i, 4 * k + 1) = -INFINITY;
        if (!(hi & 0xffu)) s_mn(i, 4 * k + 2) = -INFINITY;
        if (!(hi & 0xff00u)) s_mn(i, 4 * k + 3) = -INFINITY;
      }
    }
  }

  // The bias of a tile from shared memory (bias_tile_map.h): a quad lane's two keys of each group of 8 (columns
  // 8 g + c0 + {0, 1}, accumulator columns j = 2 g, 2 g + 1) are one 32-bit word of the group's 16-byte piece, which
  // the TMA swizzled within its 128-byte row; a warp's eight rows read eight different pieces, so no bank conflicts.
  template <bool kBF16, class Acc, class TileCoords>
  CUTLASS_DEVICE static void add_bias_tile(Acc& acc, const uint16_t* tile, TileCoords const& cT, int wg_row0) {
    using cutlass::fmha::collective::layout_acc_mn;
    Tensor s_mn = make_tensor(acc.data(), layout_acc_mn(TiledMmaQK{}, acc.layout()));
    Tensor t_mn = make_tensor(cT.data(), layout_acc_mn(TiledMmaQK{}, cT.layout()));
    static_assert(decltype(size<1>(s_mn))::value == kBlockN / 4, "a quad lane's columns: pairs 8 apart");
    const int c0 = int(get<1>(t_mn(0, 0)));  // 2 * (lane % 4)
    const uint32_t tile_address = uint32_t(__cvta_generic_to_shared(tile));
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(tile);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size<0>(s_mn); ++i) {
      const int r = wg_row0 + int(get<0>(t_mn(i, 0)));
      CUTLASS_PRAGMA_UNROLL
      for (int g = 0; g < kBlockN / 8; ++g) {
        const int box = g / (kBiasBoxKeys / 8), piece = g % (kBiasBoxKeys / 8);
        const uint32_t offset = uint32_t(box * kBiasBoxBytes + r * kBiasBoxKeys * 2 + 16 * piece);
        const uint32_t word = *reinterpret_cast<const uint32_t*>(
            bytes + mask_tile_piece(tile_address, offset, kBiasTileSwizzle) + 2 * c0);
        const float lo = half_bits_to_f32<kBF16>(word), hi = half_bits_to_f32<kBF16>(word >> 16);
        s_mn(i, 2 * g) = add_bias_log2(s_mn(i, 2 * g), lo);
        s_mn(i, 2 * g + 1) = add_bias_log2(s_mn(i, 2 * g + 1), hi);
      }
    }
  }

  // Logits of one QK^T tile in place, in base-2 units (natural logits times log2 e, so that the softmax weight is
  // one exp2 of a difference; log2 e joins the scale, the softcap or the staged bias, and costs no instruction per
  // element except for a bias read per element): scale or softcap, bias,
  // and -inf where the bias is -inf (whatever q.k is: a masked key), where the key is past Lk, (causal) after the
  // row's limit or (bounded) outside the row's bounds of batch element b. `cS` gives each accumulator element's
  // (row, key) in the CTA's problem, `cT` its (row, key) in the tile. `staged`: this tile's per-key bias in shared
  // memory when the bias is constant along rows; else `bias_tile`: the tile's bias elements as the TMA left them in
  // shared memory (bias_tile_map.h; `wg_row0` the warpgroup's first row in the tile); else null and a bias is read per
  // element from global memory at `bias_base` (the batch and head offset) plus row and key strides.
  template <class Acc, class Coords, class TileCoords, class ProblemShape>
  CUTLASS_DEVICE static void to_logits(Acc& acc, Coords const& cS, TileCoords const& cT, const float* staged,
                                       bool staged_drops, const uint16_t* bias_tile, int wg_row0,
                                       int64_t bias_base, Consumer const& lg,
                                       ProblemShape const& problem, bool check_bounds, int b) {
    using cutlass::fmha::collective::layout_acc_mn;
    const int lq = get<2>(problem), lk = get<3>(problem);
    const bool capped = kGeneralLogits && lg.softcap > 0.f;
    if (capped) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc); ++i) acc(i) = (lg.softcap * kLog2e) * tanhf(acc(i) * lg.qk_scale);
    }
    if (staged != nullptr) {
      // The per-element loop is the softmax's issue cost, so what is per key is decided per key: a bias of -inf
      // drops its key there (add_bias's rule, which keeps a +inf or NaN logit out of such a pair), and the scale and
      // the bias join in one fused multiply-add per element.
      const float scale = capped ? 1.f : lg.qk_scale * kLog2e;  // the staged bias is in base-2 units already
      Tensor s_mn = make_tensor(acc.data(), layout_acc_mn(TiledMmaQK{}, acc.layout()));
      Tensor t_mn = make_tensor(cT.data(), layout_acc_mn(TiledMmaQK{}, cT.layout()));
      auto add_staged = [&](auto drops) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(s_mn); ++j) {
          const float bk = staged[int(get<1>(t_mn(0, j)))];
          const bool dropped = decltype(drops)::value && bk == -INFINITY;
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size<0>(s_mn); ++i) {
            const float x = fmaf(s_mn(i, j), scale, bk);
            s_mn(i, j) = dropped ? -INFINITY : x;
          }
        }
      };
      // Only a tile whose staged bias holds a -inf pays the select (fma(x, scale, -inf) is -inf already unless q.k
      // is +inf or NaN, which a dropped key must not pass on).
      if (staged_drops) add_staged(cute::true_type{});
      else add_staged(cute::false_type{});
    } else if (!capped) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc); ++i) acc(i) *= lg.qk_scale * kLog2e;
    }
    if (kGeneralLogits && bias_tile != nullptr) {
      if (lg.bias_dtype == DType::kBF16) add_bias_tile<true>(acc, bias_tile, cT, wg_row0);
      else add_bias_tile<false>(acc, bias_tile, cT, wg_row0);
    } else if (kGeneralLogits && staged == nullptr && lg.bias != nullptr) {
      // One dtype dispatch per tile. Rows past Lq (the partial last query tile) and keys past Lk read an in-range
      // element; the result is never stored (rows) or masked below (keys).
      auto add_tile = [&](auto dtype) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(acc); ++i) {
          const auto pos = cS(i);
          const int64_t off = bias_base + int64_t(min(int(get<0>(pos)), lq - 1)) * lg.bias_row_stride +
                              int64_t(min(int(get<1>(pos)), lk - 1)) * lg.bias_col_stride;
          const float bias = load_bias<decltype(dtype)::value>(lg.bias, off);
          acc(i) = add_bias_log2(acc(i), bias);
        }
      };
      if (lg.bias_dtype == DType::kBF16) add_tile(std::integral_constant<DType, DType::kBF16>{});
      else if (lg.bias_dtype == DType::kF16) add_tile(std::integral_constant<DType, DType::kF16>{});
      else add_tile(std::integral_constant<DType, DType::kF32>{});
    }
    if (check_bounds && kBounded) {
      // Row by row: each thread's accumulator holds a few rows, whose bounds it reads once per tile. Rows past Lq
      // read the last row's (never stored).
      Tensor s_mn = make_tensor(acc.data(), layout_acc_mn(TiledMmaQK{}, acc.layout()));
      Tensor c_mn = make_tensor(cS.data(), layout_acc_mn(TiledMmaQK{}, cS.layout()));
      const int32_t* key_segments = lg.bounds.segments(b);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size<0>(s_mn); ++i) {
        const int32_t* row = lg.bounds.row(b, min(int(get<0>(c_mn(i, 0))), lq - 1));
        const int lo = row[0], hi = row[1], segment = row[2];
        const bool compare = key_segments != nullptr && row[3] != 0;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(s_mn); ++j) {
          const int c = int(get<1>(c_mn(i, j)));
          const bool kept = lo <= c && c < hi && (!compare || key_segments[c] == segment);
          if (!kept) s_mn(i, j) = -INFINITY;
        }
      }
    } else if (check_bounds) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(acc); ++i) {
        const auto pos = cS(i);
        const int r = int(get<0>(pos)), c = int(get<1>(pos));
        bool dropped = c >= lk;
        if constexpr (kCausal) dropped = dropped || c > r + lk - lq;
        if (dropped) acc(i) = -INFINITY;
      }
    }
  }

  template <class BlkCoord, class ProblemShape, class PipelineReducer, class PipelineStateReducer,
            class MathWgOrderBarrier>
  CUTLASS_DEVICE auto compute(BlkCoord const& blk_coord, BlkCoord const& wg_coord, Params const& params,
                              ProblemShape const& problem, MainloopPipeline& pipeline, PipelineState& smem_pipe_read,
                              MainloopPipelineQ& pipeline_q, PipelineStateQ& smem_pipe_read_q, PipelineReducer&,
                              PipelineStateReducer&, SharedStorage& storage,
                              MathWgOrderBarrier& math_wg_order_barrier) {
    using cutlass::fmha::collective::gemm_zero_acc;
    using cutlass::fmha::collective::layout_acc_mn;
    using cutlass::fmha::collective::make_acc_into_op;
    using cutlass::fmha::collective::reduction_target_n;
    const int thread_idx = int(threadIdx.x);

    TiledMmaQK mma_qk;
    auto thr_qk = mma_qk.get_thread_slice(thread_idx);
    Tensor sQ = make_tensor(make_smem_ptr(storage.smem_q.data()), SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(storage.smem_k.data()), SmemLayoutK{});
    Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));
    Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));

    TiledMmaPV mma_pv;
    auto thr_pv = mma_pv.get_thread_slice(thread_idx);
    Tensor sV = make_tensor(make_smem_ptr(storage.smem_v.data()), SmemLayoutV{});
    Tensor tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(sV));

    const int b = get<0>(get<2>(blk_coord)), h = get<1>(get<2>(blk_coord));
    const int lq = get<2>(problem), lk = get<3>(problem);
    // The kernel numbers the warpgroups' 64-row tiles across the problem: tile NumMmaWarpGroups * (CTA tile) + wg.
    const int wg_tile = int(get<0>(wg_coord)), wg = wg_tile % Base::NumMmaWarpGroups;
    constexpr int kWgRows = get<0>(TileShapeQK{});

    // The key tiles [first, first + trips) and which of them need the per-element test: without bounds those from
    // trip `unmasked` on; with bounds those not inside every row's range of this warpgroup (keys [kept_from,
    // kept_to) are kept by all its rows unless ids are compared: RowBounds::keeps_all's rule read once per
    // warpgroup; calling keeps_all per trip raised the bounded kernel's spills from 8 to 24 bytes, and RowBounds::range
    // per row in to_logits on top of it to 84: ptxas, sm_90a, D = 128).
    const auto span = key_span(blk_coord, params, problem);
    const int first = get<0>(span), trips = get<1>(span);
    int unmasked = 0, kept_from = 0, kept_to = 0;
    if constexpr (kBounded) {
      const int r0 = wg_tile * kWgRows;
      if (r0 < lq) {
        RowBounds const& rb = params.consumer.bounds;
        const bool compare = rb.segments(b) != nullptr && rb.row(b, r0)[3] != 0;
        kept_from = rb.lo(b, min(r0 + kWgRows, lq) - 1);
        kept_to = compare ? kept_from : rb.hi(b, r0);
      } else {
        kept_to = INT_MAX;  // rows past Lq (a decoding step's few rows): never stored, so never tested
      }
    } else {
      unmasked = KeyTiles<kRule>{}.get_unmasked_trip_count(blk_coord, TileShape{}, problem);
    }
    auto needs_test = [&](int trip) {
      if constexpr (kBounded) {
        const int n0 = (first + trip) * kBlockN;
        return !(kept_from <= n0 && n0 + kBlockN <= kept_to);  // a tile past Lk is never inside: hi <= Lk
      } else {
        return trip >= unmasked;
      }
    };

    // A warpgroup whose 64 rows all lie past Lq (the second one of a decoding step's few packed rows, the last query
    // tile's tail) has nothing to store: it skips both products and the softmax, and only keeps its place in the
    // ring (waiting for each stage before releasing it, so that its arrivals count towards that stage's phase) and
    // in the warpgroups' turns, and the bias warp's handshake, so that the other warpgroup's trips are not held up by
    // work nobody reads.
    if (wg_tile * kWgRows >= lq) {
      const bool staged = stages(params.consumer);
      CUTLASS_PRAGMA_NO_UNROLL
      for (int trip = 0; trip < trips; ++trip) {
        if (staged) {
          named_barrier_sync(kBiasFilledThreads, bias_filled_barrier(trip % kBiasSlots, wg));
          named_barrier_arrive(kBiasFreeThreads, bias_free_barrier(trip % kBiasSlots));
        }
        pipeline.consumer_wait(smem_pipe_read);  // K
        math_wg_order_barrier.wait();             // its turn at the products' issue
        math_wg_order_barrier.arrive();
        pipeline.consumer_release(smem_pipe_read);
        ++smem_pipe_read;
        pipeline.consumer_wait(smem_pipe_read);  // V
        pipeline.consumer_release(smem_pipe_read);
        ++smem_pipe_read;
      }
      Tensor acc_pv = partition_fragment_C(mma_pv, take<0, 2>(TileShapePV{}));
      clear(acc_pv);
      constexpr int kRows = decltype(size<0>(layout_acc_mn(mma_pv, acc_pv.layout())))::value;
      Tensor lse = make_tensor<float>(Int<kRows>{});
      fill(lse, -INFINITY);
      return make_tuple(acc_pv, lse);
    }

    // (row, key) of each accumulator element within the tile, and in the problem: this warpgroup's 64 rows,
    // advanced by BlockN keys per trip.
    Tensor cT = thr_qk.partition_C(make_identity_tensor(take<0, 2>(TileShapeQK{})));
    Tensor cS = thr_qk.partition_C(make_identity_tensor(take<0, 2>(TileShapeQK{})));
    cS.data() = cS.data() + E<0>{} * (wg_tile * kWgRows) + E<1>{} * (first * kBlockN);

    // A per-key bias comes staged by the bias warp (reduce); any other bias is read per element at its batch and
    // head offset.
    Consumer const& lg = params.consumer;
    const int64_t bias_base = bias_offset(lg, b, h);
    const bool key_bias = stages_key_bias(lg);
    const bool masked = stages_mask(lg);
    const bool bias_tiled = stages_bias_tiles(lg);
    const bool handshake = key_bias || masked || bias_tiled;

    Tensor acc_pv = partition_fragment_C(mma_pv, take<0, 2>(TileShapePV{}));
    Tensor acc_pv_mn = make_tensor(acc_pv.data(), layout_acc_mn(mma_pv, acc_pv.layout()));
    constexpr int kRows = decltype(size<0>(acc_pv_mn))::value;
    Tensor row_max = make_tensor<float>(Int<kRows>{});  // running max of each row's logits
    Tensor row_sum = make_tensor<float>(Int<kRows>{});  // this thread's part of sum exp2(logit - row_max)
    fill(row_max, -INFINITY);
    fill(row_sum, 0.f);
    clear(acc_pv);
    const auto quad = reduction_target_n(mma_qk);
    constexpr int kQuadRank = decltype(rank(quad))::value;

    pipeline_q.consumer_wait(smem_pipe_read_q);
    const int q_stage = smem_pipe_read_q.index();

    // Each trip overlaps its softmax with the previous trip's P V on the tensor cores (FlashAttention-3's
    // intra-warpgroup pipelining): it issues QK^T of its key tile and P V of the previous one, waits for the QK^T
    // only, computes the logits and weights while the P V runs, then waits for it, rescales the output if the
    // reference moved, and keeps its weights in P for the next trip. Trip 0 has no P V to issue and the last tile's
    // P V follows the loop: both are peeled, since a P V issued under a branch inside the QK^T's pipeline stage
    // makes ptxas serialise every wgmma of the kernel (C7513). K of trip t is stage 2t of the ring, V stage 2t + 1;
    // K is released as soon as its QK^T is done. The warpgroups take turns at issuing their products, so that one's
    // softmax runs while the other's GEMMs (and its own P V) occupy the tensor cores; unordered, the two drift into
    // step and leave the tensor cores idle while both exponentiate.
    using TensorP = decltype(make_acc_into_op<Element>(partition_fragment_C(mma_qk, take<0, 2>(TileShapeQK{})),
                                                       typename TiledMmaPV::LayoutA_TV{}));
    TensorP p;
    auto issue_qk = [&](PipelineState const& pipe_k, auto& acc_qk) {
      pipeline.consumer_wait(pipe_k);
      math_wg_order_barrier.wait();
      warpgroup_fence_operand(acc_qk);
      warpgroup_arrive();
      gemm_zero_acc(mma_qk, tSrQ(_, _, _, q_stage), tSrK(_, _, _, pipe_k.index()), acc_qk);
      warpgroup_commit_batch();
      warpgroup_fence_operand(acc_qk);
    };
    auto issue_pv = [&](PipelineState const& pipe_v) {
      pipeline.consumer_wait(pipe_v);
      warpgroup_fence_operand(acc_pv);
      warpgroup_fence_operand(p);
      warpgroup_arrive();
      cute::gemm(mma_pv, p, tOrV(_, _, _, pipe_v.index()), acc_pv);
      warpgroup_commit_batch();
      warpgroup_fence_operand(acc_pv);
      warpgroup_fence_operand(p);
    };

    // Logits and weights of one key tile in place, the running max and sums, and cS moved on to the next tile;
    // returns whether the warp renewed its references, and then in `rescale` the factors that move the output
    // accumulator to them (applied by the caller once the previous trip's P V, which adds weights taken against the
    // old ones, is done).
    //
    // Online softmax over base-2 logits, weight exp2(s - ref). A row's reference is its running max, renewed only
    // when a tile's max passes it by more than kRescaleSlackLog2 (fast_exp2.cuh; then every row of the warp renews,
    // so the rescale of the output accumulator is skipped or taken by the whole warp). A fresh reference makes the
    // largest weight exactly 1; a kept one bounds weights by 2^kRescaleSlackLog2; either way lse = ln 2 * (ref +
    // log2 sum). A row whose logits so far are all -inf keeps ref -inf and uses 0 in its place, so its weights are
    // exp2(-inf) = 0 and no inf - inf appears; a NaN logit is skipped by fmaxf and becomes a NaN weight, which
    // reaches the row's sum, output and lse. Always inlined: ptxas otherwise calls it from the masked instantiation,
    // the accumulator through local memory.
    auto softmax = [&](auto& acc_qk, int trip, float* rescale) __attribute__((always_inline)) {
      const int slot = trip % kBiasSlots;
      const float* staged = nullptr;
      bool staged_drops = false;
      if (handshake) named_barrier_sync(kBiasFilledThreads, bias_filled_barrier(slot, wg));
      if (key_bias) {
        staged = storage.bias.key.values[slot];
        staged_drops = storage.bias.key.drops[slot] != 0;
      }
      const uint16_t* bias_tile = nullptr;
      if constexpr (kGeneralLogits) {
        if (bias_tiled) bias_tile = storage.bias.tiles.elems[slot];
      }
      to_logits(acc_qk, cS, cT, staged, staged_drops, bias_tile, wg * kWgRows, bias_base, lg, problem,
                needs_test(trip), b);
      if constexpr (kMasked) {
        if (masked) apply_mask(acc_qk, &storage.mask.bytes[slot][0][0], cT, wg * kWgRows);
      }
      if (handshake) named_barrier_arrive(kBiasFreeThreads, bias_free_barrier(slot));
      cS.data() = cS.data() + E<1>{} * get<1>(TileShapeQK{});

      Tensor s_mn = make_tensor(acc_qk.data(), layout_acc_mn(mma_qk, acc_qk.layout()));
      float tile_max[kRows];
      bool renew = false;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        float m = row_max(i);
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(s_mn); ++j) m = fmaxf(m, s_mn(i, j));
        for_each(make_seq<kQuadRank>{}, [&](auto r) {
          CUTLASS_PRAGMA_UNROLL
          for (int step = 1; step < shape<r>(quad); step *= 2)
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, stride<r>(quad) * step));
        });
        tile_max[i] = m;
        renew |= m > row_max(i) + kRescaleSlackLog2;
      }
      const bool rescale_rows = __any_sync(0xffffffffu, renew);
      if (rescale_rows) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kRows; ++i) {
          const float ref = tile_max[i] == -INFINITY ? 0.f : tile_max[i];
          rescale[i] = exp2_ftz(row_max(i) - ref);  // 0 on the first kept key (row_max -inf)
          row_max(i) = tile_max[i];
          row_sum(i) *= rescale[i];
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kRows; ++i) {
        const float ref = row_max(i) == -INFINITY ? 0.f : row_max(i);
        float sum = 0.f;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < size<1>(s_mn); ++j) {
          s_mn(i, j) = exp2_ftz(s_mn(i, j) - ref);
          sum += s_mn(i, j);
        }
        row_sum(i) += sum;
      }
      return rescale_rows;
    };
    // P of the tile for the next P V, pinned here (with the output accumulator): moved past the next trip's QK^T
    // issue, the conversion would define a wgmma's input registers inside its pipeline stage.
    auto keep_p = [&](auto& acc_qk) {
      p = make_acc_into_op<Element>(acc_qk, typename TiledMmaPV::LayoutA_TV{});
      warpgroup_fence_operand(p);
      warpgroup_fence_operand(acc_pv);
    };

    PipelineState pipe_v;  // V of the previous trip
    {
      Tensor acc_qk = partition_fragment_C(mma_qk, take<0, 2>(TileShapeQK{}));
      const PipelineState pipe_k = smem_pipe_read;
      issue_qk(pipe_k, acc_qk);
      math_wg_order_barrier.arrive();
      ++smem_pipe_read;
      pipe_v = smem_pipe_read;
      ++smem_pipe_read;
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_qk);
      pipeline.consumer_release(pipe_k);
      float rescale[kRows];
      softmax(acc_qk, 0, rescale);  // the output accumulator is still zero: nothing to rescale
      keep_p(acc_qk);
    }
    CUTLASS_PRAGMA_NO_UNROLL
    for (int trip = 1; trip < trips; ++trip) {
      Tensor acc_qk = partition_fragment_C(mma_qk, take<0, 2>(TileShapeQK{}));
      const PipelineState pipe_k = smem_pipe_read;
      issue_qk(pipe_k, acc_qk);
      issue_pv(pipe_v);
      math_wg_order_barrier.arrive();
      ++smem_pipe_read;
      const PipelineState pipe_v_next = smem_pipe_read;
      ++smem_pipe_read;
      warpgroup_wait<1>();  // this trip's QK^T; the previous trip's P V may still run
      warpgroup_fence_operand(acc_qk);
      pipeline.consumer_release(pipe_k);
      float rescale[kRows];
      const bool rescale_rows = softmax(acc_qk, trip, rescale);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_pv);
      pipeline.consumer_release(pipe_v);
      if (rescale_rows) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kRows; ++i) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < size<1>(acc_pv_mn); ++j) acc_pv_mn(i, j) *= rescale[i];
        }
      }
      keep_p(acc_qk);
      pipe_v = pipe_v_next;
    }
    issue_pv(pipe_v);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_pv);
    pipeline.consumer_release(pipe_v);

    // Normalise; lse = row_max + log(sum), -inf for a row without a kept key (sum 0). A row whose output is
    // non-finite while its sum is finite and positive got an inf or NaN of V through P V, where the exact-zero
    // weights of dropped keys multiply their values too (0 * NaN): its lse is set to +inf, a value no row has
    // otherwise (an infinite max makes the sum NaN), and launch_flash_fwd_exact_rows recomputes it over its kept
    // keys only.
    Tensor lse = make_tensor<float>(Int<kRows>{});
    const auto quad_pv = reduction_target_n(mma_pv);
    auto quad_reduce = [&](auto x, auto op) {
      for_each(make_seq<decltype(rank(quad_pv))::value>{}, [&](auto r) {
        CUTLASS_PRAGMA_UNROLL
        for (int step = 1; step < shape<r>(quad_pv); step *= 2)
          x = op(x, __shfl_xor_sync(0xffffffffu, x, stride<r>(quad_pv) * step));
      });
      return x;
    };
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const float sum = quad_reduce(row_sum(i), [](float a, float c) { return a + c; });
      const bool empty = sum == 0.f;
      const float inv = empty ? 0.f : 1.f / sum;
      int bad = 0;
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < size<1>(acc_pv_mn); ++j) {
        acc_pv_mn(i, j) *= inv;
        bad |= !isfinite(acc_pv_mn(i, j));
      }
      bad = quad_reduce(bad, [](int a, int c) { return a | c; });
      lse(i) = empty ? -INFINITY : (bad && isfinite(sum)) ? INFINITY : kLn2 * (row_max(i) + log2f(sum));
    }
    return make_tuple(acc_pv, lse);
  }
};

}  // namespace dmattn::sm90
