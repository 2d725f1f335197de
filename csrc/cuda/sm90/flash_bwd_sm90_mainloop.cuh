// Hopper (sm_90a) backward mainloop of the key-tile path: plain and bottom-right causal attention, row bounds
// (segment ids, a window, sequence lengths: row_bounds.h), a bias constant along query rows (the paper's per-key
// bias [B, Hkv, 1, Lk] and its broadcasts) or one with query rows (q's 16-bit dtype, staged tile by tile in shared
// memory) with its dbias, that one also beside a bool mask, GQA, Lq != Lk, odd lengths. It builds on CUTLASS's
// Hopper FMHA backward collective, included from the nvidia-cutlass wheel's examples/88_hopper_fmha (never copied
// here): its shared-memory layouts, pipelines and tiled MMAs, and its kernel (a producer warpgroup whose warps load by TMA and reduce dQ, two consumer warpgroups of 64
// keys each, register reallocation, and the dK / dV epilogue by TMA store). What this file adds is the schedule of
// the work and the consumer's compute step, because both are ours: a CTA of 128 keys of one kv head walks the query
// tiles that see them and, inside each, the query heads of its GQA group (so dK and dV of the whole group sum in
// registers), recomputes P from the forward's natural-log lse exactly as the sm80 kernels do, and zeroes the pairs
// that are not kept by select (P = 0 there may meet a NaN of dP). dQ of each (query tile, head) is reduced into the
// fp32 accumulator [B, Lq, H, D] by a TMA reduce-add. docs/cuda_backward.md describes the pipeline.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

#include "collective/fmha_collective_bwd_tma_warpspecialized.hpp"
#include "collective/fmha_common.hpp"
#include "collective/fmha_fusion.hpp"
#include "cuda/bias_element.cuh"
#include "cuda/flash_bwd.h"
#include "cuda/sm90/key_rule.h"
#include "row_bounds.h"
#include "cuda/fast_exp2.cuh"
#include "cuda/half_float.cuh"
#include "kernel_facts.h"
#include "log_constants.h"

namespace dmattn::sm90 {

using namespace cute;

// The work of a CTA of kBlockN keys starting at key n0 (batch element b): trips t = 0 .. count - 1 over (query tile
// m, query head of the group gi) with m = m_begin + t / group, gi = t % group. Bottom-right causal (row i sees key j
// iff j <= i + Lk - Lq): tiles before the first row that sees key n0 are skipped; every CTA has at least one trip
// when Lq > 0 (the last row sees every key). Row bounds: the rows that may keep a key of [n0, n0 + kBlockN) are
// those from the first whose hi passes n0 to the last whose lo is below the tile's end (two bisections: lo and hi
// never decrease); a CTA whose keys no row keeps makes one trip, masked whole, so that its dK and dV are zeros.
template <KeyRule kRule, int kBlockM, int kBlockN>
struct BwdTrips {
  int m_begin = 0, count = 0, group = 1;

  CUTLASS_HOST_DEVICE BwdTrips(int n0, int lq, int lk, int group_, RowBounds const& bounds, int b) : group(group_) {
    const int m_tiles = (lq + kBlockM - 1) / kBlockM;
    int m_end = m_tiles;
    if constexpr (kRule == KeyRule::kCausal) {
      const int first_row = n0 - (lk - lq);
      m_begin = first_row <= 0 ? 0 : min(first_row / kBlockM, m_tiles);
    } else if constexpr (kRule == KeyRule::kBounded) {
      const int row_begin = int(bounds.first_row_above(b, n0, 0, lq));
      const int row_end = int(bounds.first_row_from(b, min(n0 + kBlockN, lk), row_begin, lq));
      if (row_end > row_begin) {
        m_begin = row_begin / kBlockM, m_end = (row_end + kBlockM - 1) / kBlockM;
      } else {
        m_begin = min(row_begin / kBlockM, m_tiles - 1), m_end = m_begin + 1;
      }
    }
    count = (m_end - m_begin) * group;
  }
  CUTLASS_HOST_DEVICE int m(int t) const { return m_begin + t / group; }
  CUTLASS_HOST_DEVICE int head(int kv_head, int t) const { return kv_head * group + t % group; }
};

// The bias an instantiation reads: none; one constant along query rows (row stride 0, the paper's per-key bias: a
// value per key, dbias as column sums of dS); or one with query rows in q's 16-bit dtype (dbias per element, the sum
// of dS over the query heads that share a bias head: flash_bwd_sm90_serves admits the shapes whose sums one CTA
// holds whole).
enum class BwdBias { kNone, kKeys, kRows };

// What the consumer step and the dQ reducer need beyond the TMA descriptors.
struct BwdConsumer {
  const float* lse = nullptr;    // [B, H, Lq], natural log, from the forward
  const float* delta = nullptr;  // [B, H, Lq], rowsum(dout * out) - dlse
  float scale = 1.f;
  int heads = 1, group = 1;
  // The bias (BwdBias), nullptr: none. Bias head of query head h: h / bias_hdiv.
  const void* bias = nullptr;
  DType bias_dtype = DType::kF32;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0, bias_col_stride = 0;
  int bias_hdiv = 1;
  // Its gradient, the column sums of dS (DbiasMode of flash_bwd.h): stored in the bias dtype when one CTA holds all
  // of a column's terms (kDbiasDirect: the bias head is then the same for all query heads of the CTA's kv head),
  // else added in fp32 to dbias_accum (kDbiasAccum).
  void* dbias = nullptr;
  float* dbias_accum = nullptr;
  int dbias_mode = kDbiasNone;
  // Set by the non-finite scan (flash_bwd_dispatch.cu) when q, dout or k holds an inf or NaN: the kernel then does
  // nothing and the sm80 main kernel, which handles those, runs instead.
  const uint32_t* nonfinite = nullptr;
  RowBounds bounds;  // read with KeyRule::kBounded only
  // The bool mask (the masked instantiation only): [Bm, Hm, Lq, Lk] bytes, keys at unit stride, strides in bytes
  // (0 on broadcast dims); mask head of query head h: h / mask_hdiv. Its tile classes at kBwdBlockM x kBwdBlockN
  // (one class a warpgroup's tile of a trip), nullptr: every tile partial.
  const uint8_t* mask = nullptr;
  int64_t mask_batch_stride = 0, mask_head_stride = 0, mask_row_stride = 0;
  int mask_hdiv = 1;
  const uint8_t* classes = nullptr;
  int64_t cls_batch_stride = 0, cls_head_stride = 0, cls_m_stride = 0, cls_n_stride = 0;
};

// The kept word of one thread's pairs of a warpgroup's 64 x 64 tile (bit 2 j + i: key i, row j of the thread's
// accumulator layout) from the mask bytes its warp loaded: lane l holds rows 2 l and 2 l + 1 of the tile, the warp's
// 16 keys each. The accumulator gives lane l keys 16 warp + l / 4 + 8 i and rows 8 c + 2 (l % 4) + e (j = 2 c + e),
// so each lane first packs its 32 bytes into one word (row e at bits 16 e .. 16 e + 15: a byte is kept when it is
// not zero) and then takes its four bits of every row pair from lane l % 4 + 4 c. Both steps gather flags by one
// multiplication whose partial products never overlap.
__device__ __forceinline__ uint32_t mask_kept_bits(uint4 const (&rows)[2], int lane) {
  const uint32_t words[8] = {rows[0].x, rows[0].y, rows[0].z, rows[0].w, rows[1].x, rows[1].y, rows[1].z, rows[1].w};
  uint32_t packed = 0u;
  CUTLASS_PRAGMA_UNROLL
  for (int w = 0; w < 8; ++w) {
    const uint32_t x = words[w];
    const uint32_t nonzero = (((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x) & 0x80808080u;  // bit 7 of a byte: byte != 0
    packed |= ((nonzero * 0x00204081u) >> 28) << (4 * w);  // the four flags at bits 28 .. 31, in byte order
  }
  const int g = lane / 4, quad = lane % 4;
  uint32_t bits = 0u;
  CUTLASS_PRAGMA_UNROLL
  for (int c = 0; c < 8; ++c) {
    const uint32_t y = (__shfl_sync(0xffffffffu, packed, quad + 4 * c) >> g) & 0x01010101u;  // (e, i) at 16 e + 8 i
    bits |= ((y * 0x01020408u) >> 24) << (4 * c);  // (e, i) at bit 2 e + i of the nibble
  }
  return bits;
}

// kBias: which bias is read (and its dbias summed). A template parameter, since its registers would otherwise cost
// the calls without one (with lse and delta held in registers, ptxas sm_90a, D = 128, non-causal / causal: 0 / 36
// bytes of spills without a bias, 84 / 92 with a per-key one, 128 / 152 for both with the bias as a run-time branch;
// with them staged in shared memory, none spills). kMasked: a bool mask drops pairs (BwdConsumer::mask), read tile by
// tile straight from global memory into registers (no shared memory is left beside a bias with query rows).
template <class Element, class TileShape_, KeyRule kRule, BwdBias kBias, bool kMasked = false>
struct BwdMainloop
    : cutlass::fmha::collective::FmhaBwdMainloopTmaWarpSpecialized<
          Element, float, TileShape_,
          cutlass::fmha::collective::FusionBwdAdapter<cutlass::fmha::collective::DefaultFusion>> {
  using Base = cutlass::fmha::collective::FmhaBwdMainloopTmaWarpSpecialized<
      Element, float, TileShape_, cutlass::fmha::collective::FusionBwdAdapter<cutlass::fmha::collective::DefaultFusion>>;
  using typename Base::CollectiveMmaNM;
  using typename Base::LoadK;
  using typename Base::LoadV;
  using typename Base::MainloopPipeline;
  using typename Base::MainloopPipelineQ;
  using typename Base::PipelineState;
  using typename Base::PipelineStateQ;
  using typename Base::SmemLayoutDO;
  using typename Base::SmemLayoutDOp;
  using typename Base::SmemLayoutDQ;
  using typename Base::SmemLayoutDS;
  using typename Base::SmemLayoutK;
  using typename Base::SmemLayoutKp;
  using typename Base::SmemLayoutQ;
  using typename Base::SmemLayoutQp;
  using typename Base::SmemLayoutV;
  using typename Base::TiledMmaMD;
  using typename Base::TiledMmaND;
  using typename Base::TiledMmaND_SS;
  using typename Base::TiledMmaNM;
  using typename Base::TileShape;
  using typename Base::TileShapeMD;
  using typename Base::TileShapeND;
  using typename Base::TileShapeNM;
  using typename Base::TMA_DO;
  using typename Base::TMA_DQ;
  using typename Base::TMA_K;
  using typename Base::TMA_Q;
  using typename Base::TMA_V;
  using Base::NumMmaWarpGroups;

  // A bias with query rows computes dQ in two products of D / 2 columns at D >= 128 (its accumulator beside dK and
  // dV is the register peak of that instantiation).
  static constexpr bool kSplitDq = kBias == BwdBias::kRows && get<2>(TileShape_{}) >= 128;
  using TileShapeMDHalf = std::conditional_t<
      kSplitDq, decltype(make_shape(get<0>(TileShapeMD{}), get<1>(TileShapeMD{}) / _2{}, get<2>(TileShapeMD{}))),
      TileShapeMD>;
  using TiledMmaMDHalf = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cute::tuple<_1, int, cute::tuple<int, int>>,
      16 / sizeof(Element), Element, cute::tuple<_1, int, cute::tuple<int, int>>, 16 / sizeof(Element), float,
      TileShapeMDHalf, Shape<_1, _1, _1>, cutlass::gemm::collective::StageCount<4>,
      cutlass::gemm::KernelTmaWarpSpecialized>::CollectiveOp::TiledMma;

  static constexpr int kBlockM = get<0>(TileShape{});  // query rows per trip
  static constexpr int kBlockN = get<1>(TileShape{});  // keys per CTA
  static constexpr int kWgKeys = get<0>(TileShapeNM{});  // keys per consumer warpgroup
  static constexpr bool kCausal = kRule == KeyRule::kCausal;
  static constexpr bool kBounded = kRule == KeyRule::kBounded;
  using Trips = BwdTrips<kRule, kBlockM, kBlockN>;

  // A pipeline stage holds one Q or one dO tile: lse and delta are staged by the consumers themselves (TMA would need
  // 16-byte row strides, which [B, H, Lq] lacks at odd Lq), so the base's per-stage row-statistics bytes are not
  // expected.
  static constexpr int kInnerLoadBytes = size(SmemLayoutQ{}(_, _, _0{})) * sizeof(Element);

  // Each consumer warpgroup's lse and delta of a trip's query rows, [parity of the trip][lse, delta][row]: copied a
  // trip ahead (cp.async, one element a thread), so that a thread reads its 2 x kCols row statistics from shared
  // memory where it uses them instead of holding them in registers across the products.
  static_assert(2 * kBlockM == cutlass::NumThreadsPerWarpGroup, "a warpgroup copies a trip's statistics at once");
  // The base's shared memory without its per-stage row statistics (lse and delta are staged as below). A bias with
  // query rows (kRowBias) also needs its tiles and the fp32 partial sums of its dbias beside the stages at D = 128:
  // its dQ hand-off keeps one shared-memory buffer instead of two (the reducer releases it once its TMA reduce-add
  // has read it, and the second warpgroup waits for that before it writes the next trip's dQ: a trip apart).
  static constexpr bool kRowBias = kBias == BwdBias::kRows;
  static constexpr int kDqBuffers = kRowBias ? 1 : 2;
  static_assert(size<2>(SmemLayoutDQ{}) == 2, "the reducer pipeline's two stages");
  struct StatsStorage {
    union {
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>> smem_k;
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutKp>> smem_kp;
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>> smem_v;
    };
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutDS>> smem_ds;
    union {
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>> smem_q;
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutDO>> smem_do;
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutQp>> smem_qp;
      cute::array_aligned<Element, cute::cosize_v<SmemLayoutDOp>> smem_dop;
    };
    cute::array_aligned<float, cute::cosize_v<SmemLayoutDQ> / 2 * kDqBuffers> smem_dq;
    alignas(16) float row_stats[NumMmaWarpGroups][2][2][kBlockM];
  };
  // A bias with query rows: each consumer warpgroup's [kBlockM rows, kWgKeys keys] tile of a trip, 128-byte rows
  // whose 16-byte pieces are swizzled (piece ^ row % 8) so that the eight rows an ldmatrix reads at once fall in
  // different banks. One buffer a warpgroup (two would not fit beside the base's stages at D = 128): the next tile
  // is copied in once every thread has read this one.
  static constexpr int kRowBiasPieces = kWgKeys * 2 / 16;  // 16-byte pieces per tile row
  static_assert(kRowBiasPieces == 8, "the swizzle spans 128-byte rows");
  // dbias partial sums: [warpgroup][the thread's pair][thread], each thread reading and writing only its own column.
  static constexpr int kPairsPerThread = kBlockM * kWgKeys / cutlass::NumThreadsPerWarpGroup;
  struct RowBiasStorage : StatsStorage {
    alignas(128) uint16_t bias_tile[NumMmaWarpGroups][kBlockM * kWgKeys];
    alignas(16) float dbias_partial[NumMmaWarpGroups][kPairsPerThread][cutlass::NumThreadsPerWarpGroup];
  };
  using SharedStorage = std::conditional_t<kRowBias, RowBiasStorage, StatsStorage>;
  CUTLASS_DEVICE static uint16_t* row_bias_tile_of(SharedStorage& storage, int wg) {
    if constexpr (kRowBias) return storage.bias_tile[wg];
    else return nullptr;
  }
  CUTLASS_DEVICE static float* dbias_partial_of(SharedStorage& storage, int wg, int thread_idx) {
    if constexpr (kRowBias) return &storage.dbias_partial[wg][0][thread_idx];
    else return nullptr;
  }
  // The dQ buffer of a reducer pipeline stage.
  CUTLASS_DEVICE static int dq_buffer(int stage) { return kRowBias ? 0 : stage; }

  // Canonical layouts (csrc/cuda/flash_bwd.h): strides as (batch, head, row, 1) in elements.
  using Strides = cute::tuple<int, int, int, _1>;
  struct Arguments {
    const Element* q;
    Strides q_strides;
    const Element* k;
    Strides k_strides;
    const Element* v;
    Strides v_strides;
    const Element* dout;
    Strides dout_strides;
    float* dq_accum;
    Strides dq_accum_strides;
    BwdConsumer consumer;
  };
  struct Params {
    TMA_Q tma_load_q;
    TMA_K tma_load_k;
    TMA_V tma_load_v;
    TMA_DO tma_load_do;
    TMA_DQ tma_red_dq;
    BwdConsumer consumer;
  };

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem, Arguments const&) {
    return get<4>(problem) == get<2>(TileShape{});
  }

  // problem = (B, Hkv, Lq, Lk, D). The base builds its TMA descriptors in pairs from one (rows, rows, D, (B, heads))
  // problem; Q / dO have H heads and K / V Hkv, so each pair is built from one tensor and one half is kept.
  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem, Arguments const& args, void*) {
    const int batch = get<0>(problem), kv_heads = get<1>(problem), lq = get<2>(problem), lk = get<3>(problem);
    const int d = get<4>(problem), heads = args.consumer.heads;
    auto mma_stride = [](Strides const& s) { return make_stride(get<2>(s), get<3>(s), make_stride(get<0>(s), get<1>(s))); };
    auto tmas = [&](const Element* x, Strides const& s, int rows, int nheads) {
      return CollectiveMmaNM::to_underlying_arguments(
          make_shape(rows, rows, d, make_shape(batch, nheads)),
          typename CollectiveMmaNM::Arguments{x, mma_stride(s), x, mma_stride(s)}, nullptr);
    };
    auto dq = args.dq_accum_strides;
    return Params{
        tmas(args.q, args.q_strides, lq, heads).tma_load_b,
        tmas(args.k, args.k_strides, lk, kv_heads).tma_load_a,
        tmas(args.v, args.v_strides, lk, kv_heads).tma_load_a,
        tmas(args.dout, args.dout_strides, lq, heads).tma_load_b,
        make_tma_copy(SM90_TMA_REDUCE_ADD{},
                      make_tensor(args.dq_accum, make_shape(lq, d, batch, heads),
                                  make_stride(get<2>(dq), _1{}, get<0>(dq), get<1>(dq))),
                      SmemLayoutDQ{}(_, _, _0{})),
        args.consumer};
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    cute::prefetch_tma_descriptor(params.tma_load_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_v.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_do.get_tma_descriptor());
  }

  template <class BlkCoord, class ProblemShape>
  CUTLASS_DEVICE static Trips trips_of(BlkCoord const& blk_coord, Params const& params, ProblemShape const& problem) {
    return Trips(int(get<1>(blk_coord)) * kBlockN, get<2>(problem), get<3>(problem), params.consumer.group,
                 params.consumer.bounds, int(get<2, 0>(blk_coord)));
  }

  // Q and dO tiles of every trip, in a (rows, D, query tile, (batch, head)) view for the TMA.
  template <class Tma, class ProblemShape>
  CUTLASS_DEVICE static auto row_tiles(Tma const& tma, Params const& params, ProblemShape const& problem) {
    Tensor m_full = tma.get_tma_tensor(
        make_shape(get<2>(problem), get<4>(problem), make_shape(get<0>(problem), params.consumer.heads)));
    return local_tile(m_full, TileShapeNM{}, make_coord(_, _, _), Step<Underscore, _1, _1>{})(_, _, _, _0{}, _);
  }

  // The producer warp: K and V of the two warpgroups' key halves into the outer pipeline (K0 V0 K1 V1), and Q, dO of
  // every trip into the inner one (one stage each), interleaved as the first trip consumes them.
  template <bool kLoadOuter, class BlkCoord, class ProblemShape, class LoadWarpBarrier>
  CUTLASS_DEVICE void load_kv_maybe_q(int, BlkCoord const& blk_coord, Params const& params,
                                      ProblemShape const& problem, MainloopPipeline& pipeline_inner,
                                      PipelineState& smem_pipe_write_inner, MainloopPipelineQ& pipeline_outer,
                                      PipelineStateQ& smem_pipe_write_outer, SharedStorage& storage,
                                      LoadWarpBarrier&, bool) {
    static_assert(kLoadOuter, "this warp loads K / V and Q / dO");
    const int lane_predicate = cute::elect_one_sync();
    const int b = get<2, 0>(blk_coord), kv_head = get<2, 1>(blk_coord);
    const Trips trips = trips_of(blk_coord, params, problem);

    int outer_count = NumMmaWarpGroups;
    auto outer_iter = cute::make_coord_iterator(outer_count);
    LoadK load_k{params.tma_load_k, pipeline_outer, storage.smem_k};
    auto state_k = load_k.init_state(_0{}, problem, TileShapeNM{}, blk_coord, outer_count);
    LoadV load_v{params.tma_load_v, pipeline_outer, storage.smem_v};
    auto state_v = load_v.init_state(_0{}, problem, TileShapeNM{}, blk_coord, outer_count);
    outer_count *= 2;  // K and V

    auto tma_q = params.tma_load_q.get_slice(_0{});
    Tensor tQgQ = tma_q.partition_S(row_tiles(params.tma_load_q, params, problem));
    Tensor tQsQ = tma_q.partition_D(make_tensor(make_smem_ptr(storage.smem_q.data()), SmemLayoutQ{}));
    auto tma_do = params.tma_load_do.get_slice(_0{});
    Tensor tDOgDO = tma_do.partition_S(row_tiles(params.tma_load_do, params, problem));
    Tensor tDOsDO = tma_do.partition_D(make_tensor(make_smem_ptr(storage.smem_do.data()), SmemLayoutDO{}));

    auto load_rows = [&](auto const& tma, auto const& tg, auto const& ts, int t) {
      if (lane_predicate) {
        pipeline_inner.producer_acquire(smem_pipe_write_inner);
        auto* barrier = pipeline_inner.producer_get_barrier(smem_pipe_write_inner);
        copy(tma.with(*barrier, 0), tg(_, _, _, trips.m(t), make_coord(b, trips.head(kv_head, t))),
             ts(_, _, _, smem_pipe_write_inner.index()));
        ++smem_pipe_write_inner;
      }
    };

    load_k.template step<false>(outer_iter, state_k, smem_pipe_write_outer, lane_predicate, outer_count);
    load_rows(params.tma_load_q, tQgQ, tQsQ, 0);
    load_v.template step<true>(outer_iter, state_v, smem_pipe_write_outer, lane_predicate, outer_count);
    load_k.template step<false>(outer_iter, state_k, smem_pipe_write_outer, lane_predicate, outer_count);
    load_rows(params.tma_load_do, tDOgDO, tDOsDO, 0);
    load_v.template step<true>(outer_iter, state_v, smem_pipe_write_outer, lane_predicate, outer_count);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 1; t < trips.count; ++t) {
      load_rows(params.tma_load_q, tQgQ, tQsQ, t);
      load_rows(params.tma_load_do, tDOgDO, tDOsDO, t);
    }
  }

  // Only built with a separate Q-loading warp, which this mainloop does not use.
  template <class BlkCoord, class ProblemShape, class LoadWarpBarrier>
  CUTLASS_DEVICE void load_maybe_q(BlkCoord const&, Params const&, ProblemShape const&, MainloopPipelineQ&,
                                   PipelineStateQ&, SharedStorage&, LoadWarpBarrier&, bool) {}

  // The reducer warp: each trip's dQ tile (written to shared memory by the second warpgroup) is added to the fp32
  // accumulator by a TMA reduce-add; a stage is released once the store that read it has completed.
  template <class BlkCoord, class ProblemShape, class PipelineReducer, class PipelineStateReducer>
  CUTLASS_DEVICE void reduce(BlkCoord const& blk_coord, Params const& params, ProblemShape const& problem,
                             PipelineReducer& pipeline_reducer, PipelineStateReducer& smem_pipe_read_reducer,
                             SharedStorage& storage) {
    const int lane_predicate = cute::elect_one_sync();
    const int b = get<2, 0>(blk_coord), kv_head = get<2, 1>(blk_coord);
    const Trips trips = trips_of(blk_coord, params, problem);
    Tensor mDQ = params.tma_red_dq.get_tma_tensor(
        make_shape(get<2>(problem), get<4>(problem), get<0>(problem), params.consumer.heads));
    Tensor gDQ = local_tile(mDQ, TileShapeMD{}, make_coord(_, _, _), Step<_1, _1, Underscore>{})(_, _, _, _0{}, _, _);
    Tensor sDQ = make_tensor(make_smem_ptr(storage.smem_dq.data()), SmemLayoutDQ{});
    auto tma = params.tma_red_dq.get_slice(_0{});
    Tensor tDQsDQ = tma.partition_S(sDQ);
    Tensor tDQgDQ = tma.partition_D(gDQ);

    if constexpr (kRowBias) {  // one buffer: released once this trip's reduce-add has read it
      for (int t = 0; t < trips.count; ++t) {
        pipeline_reducer.consumer_wait(smem_pipe_read_reducer);
        if (lane_predicate) {
          copy(params.tma_red_dq, tDQsDQ(_, _, _, 0), tDQgDQ(_, _, _, trips.m(t), b, trips.head(kv_head, t)));
          tma_store_arrive();
          tma_store_wait<0>();
        }
        __syncwarp();
        pipeline_reducer.consumer_release(smem_pipe_read_reducer);
        ++smem_pipe_read_reducer;
      }
    } else {
      auto smem_pipe_release = smem_pipe_read_reducer;
      for (int t = 0; t < trips.count; ++t) {
        pipeline_reducer.consumer_wait(smem_pipe_read_reducer);
        if (lane_predicate) tma_store_wait<1>();
        if (t > 0) {
          pipeline_reducer.consumer_release(smem_pipe_release);
          ++smem_pipe_release;
        }
        if (lane_predicate) {
          copy(params.tma_red_dq, tDQsDQ(_, _, _, smem_pipe_read_reducer.index()),
               tDQgDQ(_, _, _, trips.m(t), b, trips.head(kv_head, t)));
          tma_store_arrive();
        }
        ++smem_pipe_read_reducer;
      }
      if (lane_predicate) tma_store_wait<0>();
      pipeline_reducer.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
    }
  }

  // One consumer warpgroup: 64 keys of the CTA, every trip. Per trip: S = K Q^T and dP = V dO^T (keys x rows),
  // P = exp(scale * S - lse) and dS = P (dP - delta) on the kept pairs (exact zeros elsewhere), dV += P dO and
  // dK += dS Q (dS scaled by `scale`, so dK and dQ come out scaled), and dQ = dS K over both halves of the CTA's keys
  // by the second warpgroup, handed to the reducer. The math-warpgroup order barrier alternates the two
  // warpgroups' softmax phases and makes the first warpgroup's dS visible before the second reads it for dQ.
  template <class BlkCoord, class ProblemShape, class PipelineReducer, class PipelineStateReducer,
            class MathWgOrderBarrier>
  CUTLASS_DEVICE auto compute(BlkCoord const& blk_coord, BlkCoord const& wg_coord, Params const& params,
                              ProblemShape const& problem, MainloopPipeline& pipeline_inner,
                              PipelineState& smem_pipe_read_inner, MainloopPipelineQ& pipeline_outer,
                              PipelineStateQ& smem_pipe_read_outer, PipelineReducer& pipeline_reducer,
                              PipelineStateReducer& smem_pipe_write_reducer, SharedStorage& storage,
                              MathWgOrderBarrier& math_wg_order_barrier) {
    using cutlass::fmha::collective::gemm_zero_acc;
    using cutlass::fmha::collective::layout_acc_mn;
    using cutlass::fmha::collective::make_acc_into_op;
    BwdConsumer const& lg = params.consumer;
    const int lq = get<2>(problem), lk = get<3>(problem);
    const int b = get<2, 0>(blk_coord), kv_head = get<2, 1>(blk_coord);
    const Trips trips = trips_of(blk_coord, params, problem);
    const int thread_idx = int(threadIdx.x) % cutlass::NumThreadsPerWarpGroup;
    // The kernel numbers the warpgroups' 64-key tiles across the problem: NumMmaWarpGroups * (CTA tile) + wg.
    const int wg_tile = int(get<1>(wg_coord));
    const int wg = __shfl_sync(0xffffffffu, wg_tile % NumMmaWarpGroups, 0);
    const int key0 = wg_tile * kWgKeys;

    TiledMmaND mma_nd;
    Tensor acc_dv = partition_fragment_C(mma_nd, take<0, 2>(TileShapeND{}));
    Tensor acc_dk = partition_fragment_C(mma_nd, take<0, 2>(TileShapeND{}));
    clear(acc_dv);
    clear(acc_dk);

    PipelineState smem_pipe_release_inner = smem_pipe_read_inner;
    pipeline_outer.consumer_wait(smem_pipe_read_outer);
    PipelineStateQ smem_pipe_read_k = smem_pipe_read_outer;
    ++smem_pipe_read_outer;
    pipeline_outer.consumer_wait(smem_pipe_read_outer);
    PipelineStateQ smem_pipe_read_v = smem_pipe_read_outer;
    auto smem_pipe_read_k_other = smem_pipe_read_k;  // the other warpgroup's K (its stages are 2 further on)
    smem_pipe_read_k_other.advance(2);

    TiledMmaNM mma_nm;
    auto thr_nm = mma_nm.get_thread_slice(thread_idx);
    Tensor tSrK = thr_nm.make_fragment_A(thr_nm.partition_A(make_tensor(make_smem_ptr(storage.smem_k.data()), SmemLayoutK{})));
    Tensor tSrQ = thr_nm.make_fragment_B(thr_nm.partition_B(make_tensor(make_smem_ptr(storage.smem_q.data()), SmemLayoutQ{})));
    Tensor tDPrV = thr_nm.make_fragment_A(thr_nm.partition_A(make_tensor(make_smem_ptr(storage.smem_v.data()), SmemLayoutV{})));
    Tensor tDPrDO = thr_nm.make_fragment_B(thr_nm.partition_B(make_tensor(make_smem_ptr(storage.smem_do.data()), SmemLayoutDO{})));

    auto thr_nd = mma_nd.get_thread_slice(thread_idx);
    Tensor tDVrDO = thr_nd.make_fragment_B(thr_nd.partition_B(make_tensor(make_smem_ptr(storage.smem_dop.data()), SmemLayoutDOp{})));
    Tensor tDKrQ = thr_nd.make_fragment_B(thr_nd.partition_B(make_tensor(make_smem_ptr(storage.smem_qp.data()), SmemLayoutQp{})));

    TiledMmaMD mma_md;
    auto thr_md = mma_md.get_thread_slice(thread_idx);
    Tensor sDS = make_tensor(make_smem_ptr(storage.smem_ds.data()), SmemLayoutDS{});
    Tensor tDQrDS = thr_md.make_fragment_A(thr_md.partition_A(sDS));
    Tensor tDQrK = thr_md.make_fragment_B(thr_md.partition_B(make_tensor(make_smem_ptr(storage.smem_kp.data()), SmemLayoutKp{})));
    Tensor tDQsDQ = thr_md.partition_C(make_tensor(make_smem_ptr(storage.smem_dq.data()), SmemLayoutDQ{}));

    // The dS tile of each warpgroup is rows x keys (the A operand of dQ = dS K); it is written, and read by
    // dK += dS^T Q, through its keys x rows view, the layout of the logits.
    Tensor sDSt = sDS.compose(make_layout(make_shape(size<1>(sDS), size<0>(sDS), size<2>(sDS)),
                                          make_stride(size<0>(sDS), _1{}, size<1>(sDS) * size<0>(sDS))));
    Tensor tDPsDS = thr_nm.partition_C(sDSt);
    auto thr_nd_ss = TiledMmaND_SS{}.get_thread_slice(thread_idx);
    Tensor tDKrDS = thr_nd_ss.make_fragment_A(thr_nd_ss.partition_A(sDSt));

    // (key, row) of each logit of this thread, in the tile (key in the warpgroup's half, row in the query tile).
    Tensor cS = thr_nm.partition_C(make_identity_tensor(take<0, 2>(TileShapeNM{})));
    Tensor cS_mn = make_tensor(cS.data(), layout_acc_mn(mma_nm, cS.layout()));
    constexpr int kKeys = decltype(size<0>(cS_mn))::value;  // keys per thread
    constexpr int kCols = decltype(size<1>(cS_mn))::value;  // query rows per thread
    static_assert(kKeys * kCols <= 32 && kCols < 32, "kept bits fit one word");
    // Bit of pair (key i, row j) in a kept word: a row's keys side by side, the order of mask_kept_bits.
    auto kept_bit = [](int i, int j) { return j * kKeys + i; };
    const int causal_off = lk - lq;

    // The bias of this thread's keys (one value per key: the bias is constant along rows), and its gradient's
    // partial column sums, added over trips while the bias head stays the same and flushed when it changes.
    constexpr bool has_bias = kBias == BwdBias::kKeys;
    const bool has_dbias = has_bias && lg.dbias_mode != kDbiasNone;
    auto bias_base = [&](int t) {
      return int64_t(b) * lg.bias_batch_stride + int64_t(trips.head(kv_head, t) / lg.bias_hdiv) * lg.bias_head_stride;
    };
    float col_sum[kKeys];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kKeys; ++i) col_sum[i] = 0.f;
    const auto quad = cutlass::fmha::collective::reduction_target_n(mma_nm);
    auto flush_dbias = [&](int64_t base) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kKeys; ++i) {
        float v = col_sum[i];
        for_each(make_seq<decltype(rank(quad))::value>{}, [&](auto r) {
          CUTLASS_PRAGMA_UNROLL
          for (int step = 1; step < shape<r>(quad); step *= 2)
            v += __shfl_xor_sync(0xffffffffu, v, stride<r>(quad) * step);
        });
        col_sum[i] = 0.f;
        const int key = key0 + int(get<0>(cS_mn(i, 0)));
        if (get<1>(cS_mn(0, 0)) == 0 && key < lk) {  // one thread of those holding the key
          const int64_t off = base + int64_t(key) * lg.bias_col_stride;
          if (lg.dbias_mode == kDbiasDirect) store_bias(lg.dbias, off, lg.bias_dtype, v);
          else atomicAdd(lg.dbias_accum + off, v);
        }
      }
    };

    // A bias with query rows. Trips share a tile while their query tile and bias head stay the same (the query heads
    // of a GQA group that share a bias head follow each other); dbias of a pair sums dS over those trips in the
    // thread's own column of dbias_partial and is stored in the bias dtype at the last of them (every pair of the
    // tile has all its terms then: flash_bwd_sm90_serves). Rows past Lq and keys past Lk copy in-range bytes and are
    // never stored.
    // A value made opaque to ptxas where it is used, so that ptxas recomputes what derives from it there (tile
    // offsets, source lanes) instead of holding it across the trip loop.
    auto opaque = [](int x) {
      asm volatile("" : "+r"(x));
      return x;
    };
    auto row_bias_tile = [&](int t) { return trips.m(t) * lg.heads + trips.head(kv_head, t) / lg.bias_hdiv; };
    uint16_t* const bias_tile = row_bias_tile_of(storage, wg);
    // Element 0 of 16-byte piece `piece` of tile row `row` (the swizzle of the type's comment).
    auto bias_tile_piece = [&](int row, int piece) {
      return &bias_tile[row * kWgKeys + (piece ^ (row % kRowBiasPieces)) * 8];
    };
    auto load_row_bias = [&](int t) {  // cp.async, 16 bytes a piece, eight threads a row
      const int64_t base = bias_base(t);
      const int row0 = trips.m(t) * kBlockM;
      const int tid = opaque(thread_idx);
      constexpr int kPerThread = kBlockM * kRowBiasPieces / cutlass::NumThreadsPerWarpGroup;
      CUTLASS_PRAGMA_UNROLL
      for (int it = 0; it < kPerThread; ++it) {
        const int piece = tid + it * cutlass::NumThreadsPerWarpGroup;
        const int r = piece / kRowBiasPieces, c = piece % kRowBiasPieces;
        const int row = min(row0 + r, lq - 1);
        int key = key0 + 8 * c;
        if (key >= lk) key = 0;  // a piece past Lk (one that starts below it stays inside its row: 16-byte strides)
        const uint16_t* src = static_cast<const uint16_t*>(lg.bias) + base + int64_t(row) * lg.bias_row_stride + key;
        const uint32_t dst = cute::cast_smem_ptr_to_uint(
            bias_tile_piece(r, c));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
      }
      cute::cp_async_fence();
    };
    // This thread's bias values, by ldmatrix.trans: matrix (i, jj) holds keys 16 warp + 8 i + (0 .. 7) of query rows
    // 8 jj + (0 .. 7), which lands, transposed, in the accumulator's layout (key lane / 4, rows 2 (lane % 4) + 0 / 1):
    // s_mn(i, j) is element j % 2 of matrix (i, j / 2), the m-th of four x4 loads' 16 registers, m = 2 (j / 2) + i.
    static_assert(!kRowBias || (kKeys == 2 && kCols == 16), "the 64 x 64 accumulator layout of wgmma");
    uint32_t bias_words[kRowBias ? 4 : 1][4];
    auto read_row_bias = [&]() __attribute__((always_inline)) {
      const int tid = opaque(thread_idx);
      const int lane = tid % cutlass::NumThreadsPerWarp, warp = tid / cutlass::NumThreadsPerWarp;
      CUTLASS_PRAGMA_UNROLL
      for (int x = 0; x < 4; ++x) {
        const int m = 4 * x + lane / 8;
        const int row = 8 * (m / 2) + lane % 8, piece = 2 * warp + m % 2;
        const uint32_t addr = cute::cast_smem_ptr_to_uint(
            bias_tile_piece(row, piece));
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(bias_words[x][0]), "=r"(bias_words[x][1]), "=r"(bias_words[x][2]), "=r"(bias_words[x][3])
                     : "r"(addr));
      }
    };
    float* const dbias_partial = dbias_partial_of(storage, wg, thread_idx);
    static_assert(!kRowBias || kKeys * kCols == kPairsPerThread, "a thread's pairs of a warpgroup's tile");
    const float bias_inv_scale = 1.f / lg.scale;

    // Trip t's lse (threads 0 .. kBlockM - 1) and delta (the others) into row_stats[wg][t & 1], one element a thread;
    // rows past Lq copy the last row's (they are dropped wherever they are used).
    auto stage_stats = [&](int t) {
      const int r = thread_idx % kBlockM, which = thread_idx / kBlockM;
      const int row = min(trips.m(t) * kBlockM + r, lq - 1);
      const float* src = (which == 0 ? lg.lse : lg.delta) + (int64_t(b) * lg.heads + trips.head(kv_head, t)) * lq + row;
      const uint32_t dst = cute::cast_smem_ptr_to_uint(&storage.row_stats[wg][t & 1][which][r]);
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
      cute::cp_async_fence();
    };
    // The mask's class of trip t's tile of this warpgroup (tile_classes.h; partial without classes): the classes
    // are the backward's own, at this kernel's 64 x 64 warpgroup tile.
    static_assert(!kMasked || (kBlockM == kBwdBlockM && kWgKeys == kBwdBlockN), "a warpgroup tile is one class");
    static_assert(!kMasked || (kKeys == 2 && kCols == 16), "mask_kept_bits: the 64 x 64 accumulator layout of wgmma");
    // The batch element and thread index are opaque where the mask's offsets and source lanes are computed (held
    // across the trip loop, they spilled the P step).
    auto mask_class_of = [&](int t) {
      if (lg.classes == nullptr) return int(kTilePartial);
      return int(lg.classes[int64_t(opaque(b)) * lg.cls_batch_stride +
                            int64_t(trips.head(kv_head, t) / lg.mask_hdiv) * lg.cls_head_stride +
                            int64_t(trips.m(t)) * lg.cls_m_stride + int64_t(wg_tile) * lg.cls_n_stride]);
    };
    int next_mask_class = kTileFull;
    if (trips.count > 0) {
      stage_stats(0);
      if constexpr (kRowBias) load_row_bias(0);
      if constexpr (kMasked) next_mask_class = mask_class_of(0);
    }

    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 0; t < trips.count; ++t) {
      const int row0 = trips.m(t) * kBlockM;
      const int h = trips.head(kv_head, t);
      pipeline_inner.consumer_wait(smem_pipe_read_inner);
      const int q_stage = smem_pipe_read_inner.index();
      ++smem_pipe_read_inner;
      const int do_stage = smem_pipe_read_inner.index();
      PipelineState smem_pipe_read_do = smem_pipe_read_inner;
      ++smem_pipe_read_inner;

      Tensor acc_s = partition_fragment_C(mma_nm, take<0, 2>(TileShapeNM{}));
      Tensor s_mn = make_tensor(acc_s.data(), layout_acc_mn(mma_nm, acc_s.layout()));
      if constexpr (kRowBias) {
        // S starts from bias / scale: the bias costs no registers beside the logits. The trip's tile (and its
        // statistics) have landed once every thread of the warpgroup passed the barrier.
        cute::cp_async_wait<0>();
        cutlass::arch::NamedBarrier::arrive_and_wait(cutlass::NumThreadsPerWarpGroup, wg);
        read_row_bias();
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kKeys; ++i) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kCols; ++j) {
            const int m = 2 * (j / 2) + i;
            const uint32_t word = bias_words[m / 4][m % 4];
            s_mn(i, j) = bias_inv_scale * half_bits_to_f32<cute::is_same_v<Element, cutlass::bfloat16_t>>(
                                              j % 2 == 0 ? word : word >> 16);
          }
        }
      }
      warpgroup_fence_operand(acc_s);
      warpgroup_arrive();
      if constexpr (kRowBias) {
        mma_nm.accumulate_ = GMMA::ScaleOut::One;
        cutlass::fmha::collective::gemm_reset_zero_acc(mma_nm, tSrK(_, _, _, smem_pipe_read_k.index()),
                                                       tSrQ(_, _, _, q_stage), acc_s);
      } else {
        gemm_zero_acc(mma_nm, tSrK(_, _, _, smem_pipe_read_k.index()), tSrQ(_, _, _, q_stage), acc_s);
      }
      warpgroup_commit_batch();

      // The mask of this warpgroup's tile: its class (read a trip ahead) and, for a partial tile, two rows of the
      // warp's 16 keys a lane (mask_kept_bits), loaded while the products run.
      int mask_class = kTileFull;
      uint4 mask_rows[2];
      if constexpr (kMasked) {
        mask_class = next_mask_class;
        if (t + 1 < trips.count) next_mask_class = mask_class_of(t + 1);
        if (mask_class == kTilePartial) {
          const int tid = opaque(thread_idx);
          const int lane = tid % cutlass::NumThreadsPerWarp, warp = tid / cutlass::NumThreadsPerWarp;
          // A chunk past Lk (Lk is a multiple of 16: flash_bwd_sm90_serves) reads one in range; its pairs drop.
          const int key = key0 + 16 * warp < lk ? key0 + 16 * warp : 0;
          const uint8_t* base =
              lg.mask + opaque(b) * lg.mask_batch_stride + int64_t(h / lg.mask_hdiv) * lg.mask_head_stride + key;
          CUTLASS_PRAGMA_UNROLL
          for (int e = 0; e < 2; ++e) {  // rows past Lq read the last row (dropped)
            const int row = min(row0 + 2 * lane + e, lq - 1);
            mask_rows[e] = __ldg(reinterpret_cast<const uint4*>(base + int64_t(row) * lg.mask_row_stride));
          }
        }
      }

      float key_bias[kKeys];
      if constexpr (has_bias) {
        const int64_t base = bias_base(t);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kKeys; ++i) {  // keys past Lk read an in-range element; they are dropped below
          const int key = min(key0 + int(get<0>(cS_mn(i, 0))), lk - 1);
          key_bias[i] = load_bias(lg.bias, base + int64_t(key) * lg.bias_col_stride, lg.bias_dtype);
        }
      }

      pipeline_inner.consumer_wait(smem_pipe_read_do);
      Tensor acc_dp = partition_fragment_C(mma_nm, take<0, 2>(TileShapeNM{}));
      warpgroup_fence_operand(acc_dp);
      warpgroup_arrive();
      gemm_zero_acc(mma_nm, tDPrV(_, _, _, smem_pipe_read_v.index()), tDPrDO(_, _, _, do_stage), acc_dp);
      warpgroup_commit_batch();

      // Pairs are tested one by one only where some may be dropped: the sequence ends, the causal diagonal, or (row
      // bounds) keys outside the range of some row of the tile.
      bool check = row0 + kBlockM > lq || key0 + kWgKeys > lk;
      if constexpr (kCausal) check = check || key0 + kWgKeys - 1 > row0 + causal_off;
      if constexpr (kBounded)
        check = check || !lg.bounds.keeps_all(b, row0, min(row0 + kBlockM, lq), key0, key0 + kWgKeys);
      uint32_t kept = 0xffffffffu;

      warpgroup_wait<1>();  // this trip's S
      warpgroup_fence_operand(acc_s);
      // This trip's row statistics: every thread's copies have landed once all passed the barrier, which they reach
      // after the last read of the other parity (the previous trip's dS): the next trip's copies may then go there.
      cute::cp_async_wait<0>();
      cutlass::arch::NamedBarrier::arrive_and_wait(cutlass::NumThreadsPerWarpGroup, wg);
      const float* row_lse = storage.row_stats[wg][t & 1][0];
      const float* row_delta = storage.row_stats[wg][t & 1][1];
      if (t + 1 < trips.count) stage_stats(t + 1);
      // The next trip's bias tile: every thread of the warpgroup has read this one (at the trip's start).
      if constexpr (kRowBias)
        if (t + 1 < trips.count && row_bias_tile(t + 1) != row_bias_tile(t)) load_row_bias(t + 1);
      uint32_t mask_kept = 0xffffffffu;  // before the wait, beside the other warpgroup's softmax
      if constexpr (kMasked) {
        if (mask_class == kTileEmpty) mask_kept = 0u;
        else if (mask_class == kTilePartial)
          mask_kept = mask_kept_bits(mask_rows, opaque(thread_idx) % cutlass::NumThreadsPerWarp);
      }
      math_wg_order_barrier.wait();
      if (check && kBounded) {
        // Row by row: each of this thread's rows reads its bounds once per trip.
        kept = 0u;
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kCols; ++j) {
          const int row = row0 + int(get<1>(cS_mn(0, j)));
          if (row >= lq) continue;  // rows past Lq keep nothing
          const RowRange range = lg.bounds.range(b, row);
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < kKeys; ++i)
            kept |= uint32_t(range.keeps(key0 + int(get<0>(cS_mn(i, j))))) << kept_bit(i, j);
        }
      } else if (check) {
        kept = 0u;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kKeys; ++i) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kCols; ++j) {
            const int key = key0 + int(get<0>(cS_mn(i, j))), row = row0 + int(get<1>(cS_mn(i, j)));
            bool keep = row < lq && key < lk;
            if constexpr (kCausal) keep = keep && key <= row + causal_off;
            kept |= uint32_t(keep) << kept_bit(i, j);
          }
        }
      }
      if constexpr (kMasked) kept &= mask_kept;
      if constexpr (has_bias) {  // a -inf bias drops its key in every row
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kKeys; ++i) {
          uint32_t key_pairs = 0u;
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kCols; ++j) key_pairs |= 1u << kept_bit(i, j);
          if (key_bias[i] == -INFINITY) kept &= ~key_pairs;
        }
      }
      // The per-element work bounds the issue of these steps, so a thread whose pairs are all kept (every trip off
      // the diagonal and the sequence ends, unless a key has a -inf bias) runs them without the per-pair selects.
      constexpr uint32_t kAllKept = kKeys * kCols == 32 ? 0xffffffffu : (1u << (kKeys * kCols)) - 1u;
      const bool all_kept = (kept & kAllKept) == kAllKept;
      auto keeps = [&](auto every, int i, int j) {
        return decltype(every)::value || ((kept >> kept_bit(i, j)) & 1u) != 0u;
      };
      // P = exp(s - lse) with s = scale * q.k + bias, in natural units as the forward's lse; the scale joins the
      // bias, or without one the lse, in one fused multiply-add.
      // A -inf element of a bias with query rows drops its pair: P and dS are exact zeros there by select.
      uint32_t bias_drops = 0u;
      auto p_step = [&](auto every) __attribute__((always_inline)) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kKeys; ++i) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kCols; ++j) {
            float x;
            bool keep = keeps(every, i, j);
            const float lse = row_lse[int(get<1>(cS_mn(0, j)))];
            if constexpr (has_bias) {
              x = fmaf(s_mn(i, j), lg.scale, key_bias[i]) - lse;
            } else if constexpr (kRowBias) {
              // S holds q.k + bias / scale, -inf exactly where the bias is (q and k are finite here); by select,
              // since a row whose every bias is -inf has lse -inf.
              const bool drop = s_mn(i, j) == -INFINITY;
              bias_drops |= uint32_t(drop) << kept_bit(i, j);
              keep = keep && !drop;
              x = fmaf(s_mn(i, j), lg.scale, -lse);
            } else {
              x = fmaf(s_mn(i, j), lg.scale, -lse);
            }
            s_mn(i, j) = keep ? exp2_ftz(x * kLog2e) : 0.f;
          }
        }
      };
      if (all_kept) p_step(cute::true_type{});
      else p_step(cute::false_type{});
      math_wg_order_barrier.arrive();
      bool ds_all_kept = all_kept;
      if constexpr (kRowBias) {
        kept &= ~bias_drops;
        ds_all_kept = (kept & kAllKept) == kAllKept;
      }

      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dp);
      // dS = P (dP - delta), by select where the pair is dropped (its P = 0 may meet a NaN of dP or delta); dbias
      // sums it over rows; scaled for the products, so that dK and dQ come out scaled.
      Tensor ds = make_fragment_like<Element>(acc_dp);
      Tensor ds_mn = make_tensor(ds.data(), layout_acc_mn(mma_nm, ds.layout()));
      Tensor dp_mn = make_tensor(acc_dp.data(), layout_acc_mn(mma_nm, acc_dp.layout()));
      const bool run_first = kRowBias && (t == 0 || row_bias_tile(t - 1) != row_bias_tile(t));
      const bool run_last = kRowBias && (t + 1 == trips.count || row_bias_tile(t + 1) != row_bias_tile(t));
      Element* const dbias_tile = kRowBias ? static_cast<Element*>(lg.dbias) + bias_base(t) : nullptr;
      auto ds_step = [&](auto every) __attribute__((always_inline)) {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < kKeys; ++i) {
          CUTLASS_PRAGMA_UNROLL
          for (int j = 0; j < kCols; ++j) {
            const float d =
                keeps(every, i, j) ? s_mn(i, j) * (dp_mn(i, j) - row_delta[int(get<1>(cS_mn(0, j)))]) : 0.f;
            if (has_dbias) col_sum[i] += d;
            if constexpr (kRowBias) {
              float* partial = dbias_partial + (i * kCols + j) * cutlass::NumThreadsPerWarpGroup;
              const float total = run_first ? d : *partial + d;
              if (!run_last) {
                *partial = total;
              } else {
                const int key = key0 + int(get<0>(cS_mn(i, j))), row = row0 + int(get<1>(cS_mn(i, j)));
                if (row < lq && key < lk)
                  dbias_tile[int64_t(row) * lg.bias_row_stride + key] = static_cast<Element>(total);
              }
            }
            ds_mn(i, j) = static_cast<Element>(d * lg.scale);
          }
        }
      };
      if (ds_all_kept) ds_step(cute::true_type{});
      else ds_step(cute::false_type{});
      if (has_dbias && (t + 1 == trips.count || bias_base(t + 1) != bias_base(t))) flush_dbias(bias_base(t));

      // dV += P dO (P from registers).
      Tensor op_p = make_acc_into_op<Element>(acc_s, typename TiledMmaND::LayoutA_TV{});
      warpgroup_fence_operand(acc_dv);
      warpgroup_fence_operand(op_p);
      warpgroup_arrive();
      cute::gemm(mma_nd, op_p, tDVrDO(_, _, _, do_stage), acc_dv);
      warpgroup_commit_batch();

      // dS to shared memory: this warpgroup's half of the CTA's dS tile.
      if (wg == 0) math_wg_order_barrier.wait();
      auto as_pairs = [](auto t) { return recast<uint_bit_t<sizeof_bits_v<Element> * 2>>(t); };
      auto tDPsDS_v = as_pairs(tDPsDS);
      auto ds_v = as_pairs(ds);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(ds_v); ++i) tDPsDS_v(_, _, _, wg)(i) = ds_v(i);
      cutlass::arch::fence_view_async_shared();
      if (wg == 0) math_wg_order_barrier.arrive();

      bool dq_done = false;
      if constexpr (kSplitDq) {
        if (wg == 1) {
          // dQ = dS K in two halves of D, the first beside dK += dS Q, each handed to the reducer's one buffer: K^T
          // and the dQ buffer divided along D.
          TiledMmaMDHalf mma_mdh;
          auto thr_mdh = mma_mdh.get_thread_slice(thread_idx);
          Tensor tDQrDSh = thr_mdh.make_fragment_A(thr_mdh.partition_A(sDS));
          constexpr int kHalfD = decltype(size<1>(TileShapeMDHalf{}))::value;
          Tensor sKpd = flat_divide(make_tensor(make_smem_ptr(storage.smem_kp.data()), SmemLayoutKp{}),
                                    make_tile(Int<kHalfD>{}));  // (D / 2, 2, keys, stages)
          Tensor sDQd = flat_divide(make_tensor(make_smem_ptr(storage.smem_dq.data()), SmemLayoutDQ{}),
                                    make_tile(Int<kBlockM>{}, Int<kHalfD>{}));  // (rows, D / 2, 1, 2, buffers)
          Tensor tDQrK0 = thr_mdh.make_fragment_B(thr_mdh.partition_B(sKpd(_, 0, _, _)));
          Tensor tDQrK1 = thr_mdh.make_fragment_B(thr_mdh.partition_B(sKpd(_, 1, _, _)));
          Tensor tDQsDQ0 = thr_mdh.partition_C(sDQd(_, _, 0, 0, _));
          Tensor tDQsDQ1 = thr_mdh.partition_C(sDQd(_, _, 0, 1, _));
          math_wg_order_barrier.wait();
          pipeline_reducer.producer_acquire(smem_pipe_write_reducer);
          auto previous_released = smem_pipe_write_reducer;  // the previous trip's reduce-add has read the buffer
          ++previous_released;
          pipeline_reducer.producer_acquire(previous_released);
          using Vec = uint_bit_t<sizeof_bits_v<float> * 2>;
          Tensor acc_dq = partition_fragment_C(mma_mdh, take<0, 2>(TileShapeMDHalf{}));
          auto dq_half = [&](auto const& tDQrK) {
            warpgroup_fence_operand(acc_dq);
            warpgroup_arrive();
            gemm_zero_acc(mma_mdh, tDQrDSh(_, _, _, 0), tDQrK(_, _, _, smem_pipe_read_k_other.index()), acc_dq);
            cute::gemm(mma_mdh, tDQrDSh(_, _, _, 1), tDQrK(_, _, _, smem_pipe_read_k.index()), acc_dq);
            warpgroup_commit_batch();
          };
          auto store_half = [&](auto const& tDQsDQh) {
            warpgroup_fence_operand(acc_dq);
            auto dst = recast<Vec>(tDQsDQh(_, _, _, 0));
            auto src = recast<Vec>(acc_dq);
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < size(src); ++i) dst(i) = src(i);
          };
          dq_half(tDQrK0);
          warpgroup_fence_operand(acc_dk);
          warpgroup_arrive();
          cute::gemm(TiledMmaND_SS{}, tDKrDS(_, _, _, wg), tDKrQ(_, _, _, q_stage), acc_dk);
          warpgroup_commit_batch();
          warpgroup_wait<1>();
          store_half(tDQsDQ0);
          dq_half(tDQrK1);
          warpgroup_wait<0>();
          store_half(tDQsDQ1);
          math_wg_order_barrier.arrive();
          cutlass::arch::fence_view_async_shared();
          pipeline_reducer.producer_commit(smem_pipe_write_reducer);
          ++smem_pipe_write_reducer;
          dq_done = true;
        }
      }
      if (!dq_done && wg == 1) {
        // dQ = dS K over both halves, once the first warpgroup's dS is in shared memory; then dK += dS Q.
        math_wg_order_barrier.wait();
        Tensor acc_dq = partition_fragment_C(mma_md, take<0, 2>(TileShapeMD{}));
        warpgroup_fence_operand(acc_dq);
        warpgroup_arrive();
        gemm_zero_acc(mma_md, tDQrDS(_, _, _, 0), tDQrK(_, _, _, smem_pipe_read_k_other.index()), acc_dq);
        cute::gemm(mma_md, tDQrDS(_, _, _, 1), tDQrK(_, _, _, smem_pipe_read_k.index()), acc_dq);
        warpgroup_commit_batch();
        warpgroup_fence_operand(acc_dk);
        warpgroup_arrive();
        cute::gemm(TiledMmaND_SS{}, tDKrDS(_, _, _, wg), tDKrQ(_, _, _, q_stage), acc_dk);
        warpgroup_commit_batch();
        warpgroup_wait<1>();
        warpgroup_fence_operand(acc_dq);
        math_wg_order_barrier.arrive();

        pipeline_reducer.producer_acquire(smem_pipe_write_reducer);
        if constexpr (kRowBias) {  // one buffer: the previous trip's reduce-add has read it (its stage was released)
          auto previous_released = smem_pipe_write_reducer;
          ++previous_released;
          pipeline_reducer.producer_acquire(previous_released);
        }
        using Vec = uint_bit_t<sizeof_bits_v<float> * 2>;
        auto dst = recast<Vec>(tDQsDQ(_, _, _, dq_buffer(smem_pipe_write_reducer.index())));
        auto src = recast<Vec>(acc_dq);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(src); ++i) dst(i) = src(i);
        cutlass::arch::fence_view_async_shared();
        pipeline_reducer.producer_commit(smem_pipe_write_reducer);
        ++smem_pipe_write_reducer;
      } else if (!dq_done) {
        warpgroup_fence_operand(acc_dk);
        warpgroup_arrive();
        cute::gemm(TiledMmaND_SS{}, tDKrDS(_, _, _, wg), tDKrQ(_, _, _, q_stage), acc_dk);
        warpgroup_commit_batch();
        // Keeps the reducer pipeline's arrival count (both warpgroups) whole.
        pipeline_reducer.producer_acquire(smem_pipe_write_reducer);
        pipeline_reducer.producer_commit(smem_pipe_write_reducer);
        ++smem_pipe_write_reducer;
      }
      // dV and dK of this trip have read its Q and dO: release their stages. (Releasing them one trip later instead,
      // so that dK overlaps the next trip's S, keeps more registers live and spilled 140-176 bytes: ptxas, D = 128.)
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dv);
      warpgroup_fence_operand(acc_dk);
      pipeline_inner.consumer_release(smem_pipe_release_inner);
      ++smem_pipe_release_inner;
      pipeline_inner.consumer_release(smem_pipe_release_inner);
      ++smem_pipe_release_inner;
    }

    pipeline_outer.consumer_release(smem_pipe_read_k);
    pipeline_outer.consumer_release(smem_pipe_read_outer);
    pipeline_reducer.producer_tail(smem_pipe_write_reducer);
    ++smem_pipe_read_outer;
    return make_tuple(acc_dk, acc_dv);
  }
};

}  // namespace dmattn::sm90
