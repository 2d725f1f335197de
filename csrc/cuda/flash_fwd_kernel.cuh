// Flash-attention forward for sm80+ (cp.async into swizzled shared memory, ldmatrix, mma.sync), with a
// broadcastable additive bias, a boolean mask whose empty tiles are skipped through the tile-class map,
// GQA, bottom-right causal, softcap and the natural-log LSE. Templated on head dim and dtype only; causal,
// bias, mask and softcap are run-time branches that are uniform across the CTA.
//
// One CTA computes a BlockM x D output tile for one (batch, query head): it walks the key tiles from the
// causal bound down to 0, skips tiles whose mask class is empty (no K/V/bias/mask loads), and loads no mask
// for full tiles. Skipping leaves the arithmetic of every computed tile unchanged, so results are bitwise
// identical with and without skipping.
#pragma once

#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "cuda/bias_element.cuh"
#include "cuda/flash_fwd.h"
#include "cuda/smem_tiles.cuh"
#include "cuda/tile_classes.h"
#include "cuda/fast_exp2.cuh"

namespace dmattn {
namespace fwd {

using namespace cute;

template <int kHeadDim_, bool kIsBF16, int kNWarps_ = (kHeadDim_ <= 64 ? 4 : 8)>
struct Traits {
  using Elem = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kFwdBlockM;
  static constexpr int kBlockN = kFwdBlockN;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMinBlocks = kNWarps == 4 ? 2 : 1;  // 4 warps: two CTAs per SM hide latency
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kBlockKSmem == 32 ? 2 : 3;

  using MmaOp = std::conditional_t<kIsBF16, SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // Warps tile the query rows; the 16-wide N permutation lets ldmatrix.x4 feed two n8 atoms at once.
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kBlockKSmem>>, Stride<Int<kBlockKSmem>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V seen as [D, BlockN] (row-major view of the same storage) for the P @ V product.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;
  using SmemCopyAtomO = Copy_Atom<DefaultCopy, Elem>;

  static constexpr int kGmemThreadsPerRow = kBlockKSmem / 8;  // 16-byte chunks per smem atom row
  using GmemLayoutAtom = Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
                                Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Elem>{},
                                                 GmemLayoutAtom{}, Layout<Shape<_1, _8>>{}));
  using GmemTiledCopyO = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, Elem>{},
                                                  GmemLayoutAtom{}, Layout<Shape<_1, _8>>{}));

  static constexpr int kSmemQKVBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Elem));
  // + double-buffered mask tile (bytes) and per-key bias vector (up to 4 bytes a key).
  static constexpr int kSmemBytes = kSmemQKVBytes + 2 * kBlockM * kBlockN + 2 * kBlockN * 4;
};

// ---------------------------------------------------------------------------------------------- helpers

// Accumulator layout of S viewed as the A operand of the P @ V product: two n8 blocks make one k16 block.
template <class L>
__device__ __forceinline__ auto acc_as_a_layout(L l) {
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// acc += A(registers) * B(smem).
template <class Acc, class RA, class RB, class SB, class Mma, class CB, class TB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& rA, RB& rB, SB const& sB, Mma const& mma,
                                        CB const& cpB, TB const& thrB) {
  auto rB_v = thrB.retile_D(rB);
  cute::copy(cpB, sB(_, _, 0), rB_v(_, _, 0));
  CUTE_UNROLL
  for (int kk = 0; kk < size<2>(rA); ++kk) {
    if (kk + 1 < size<2>(rA)) cute::copy(cpB, sB(_, _, kk + 1), rB_v(_, _, kk + 1));
    cute::gemm(mma, rA(_, _, kk), rB(_, _, kk), acc);
  }
}

__device__ __forceinline__ float quad_max(float x) {  // NaN if any lane's x is NaN
  x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return max_nan(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The running max and sum of each row before the first tile: no key seen yet.
template <int kRows>
__device__ __forceinline__ void start_softmax_rows(float (&row_max)[kRows], float (&row_sum)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }
}

// kRescaleSlackLog2 (fast_exp2.cuh) in the natural units of these scores.
constexpr float kRescaleSlack = kRescaleSlackLog2 * kLn2;

// One online-softmax step on a tile of natural-unit scores (dropped entries -inf): renews the references where a
// row's max outgrew its reference by more than kRescaleSlack, rescaling the running sums and the output accumulator
// then, and leaves exp(s - reference) in s. The renewal is decided per warp (every row of the warp renews when one
// must), so the warp skips or takes the accumulator's rescale as a whole. A renewed reference is the row's max, and
// its top weight exactly 1; a kept one is within kRescaleSlack below it, and a dominant key's weight is
// exp(max - ref), whose log normalize_rows adds back to ref within ~2e-6 (ex2.approx, logf and one rounding of the
// exact difference max - ref), so lse is that key's logit to the last bit wherever |logit| >= 32, however large,
// and within an ulp of it below. The max propagates NaN: a NaN
// logit of a kept key makes the row's max, sum and accumulator NaN for good (as does a +inf one, through inf - inf),
// while a dropped key's NaN was replaced by -inf before this step. It takes (rows, cols) views of the two
// accumulators, which serves the sm80 and the Hopper MMA layouts alike (the four lanes of a quad hold the same
// rows); online_softmax_step takes the sm80 accumulators themselves.
template <int kRows, class S, class O>
__device__ __forceinline__ void online_softmax_rows(S& s, O& o, float (&row_max)[kRows], float (&row_sum)[kRows]) {
  constexpr int kCols = decltype(size<1>(s))::value;
  float tile_max[kRows];
  bool renew = false;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float mx = row_max[r];
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) mx = max_nan(mx, s(r, c));
    tile_max[r] = quad_max(mx);
    renew |= !(tile_max[r] <= row_max[r] + kRescaleSlack);  // a NaN max renews, so it reaches sum and output
  }
  if (__any_sync(0xffffffffu, renew)) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float m_use = tile_max[r] == -INFINITY ? 0.f : tile_max[r];
      const float corr = exp2_ftz((row_max[r] - m_use) * kLog2e);
      row_max[r] = tile_max[r];
      row_sum[r] *= corr;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) o(r, c) *= corr;
    }
  }
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float m_use = row_max[r] == -INFINITY ? 0.f : row_max[r];
    float sum = 0.f;
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const float e = exp2_ftz((s(r, c) - m_use) * kLog2e);
      s(r, c) = e;
      sum += e;
    }
    row_sum[r] += sum;
  }
}

template <int kRows, class AccS, class AccO>
__device__ __forceinline__ void online_softmax_step(AccS& acc_s, AccO& acc_o, float (&row_max)[kRows],
                                                    float (&row_sum)[kRows]) {
  Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
  Tensor o = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  online_softmax_rows(s, o, row_max, row_sum);
}

// Normalises the output rows of a (rows, cols) view and writes their lse (lanes with tid % 4 == 0): a row is empty
// iff its max is still -inf (out 0, lse -inf); otherwise its sum is >= 1 (the max term) or NaN, and a NaN must reach
// out and lse (a test on the sum alone would turn it into -inf). lse = ref + log(sum) is exactly a dominant key's
// logit (online_softmax_rows), which keeps the backward's exp(s - lse) exact for huge logits. `cS`: (row, col) of
// each element in the CTA's tile.
template <int kRows, class O, class CS>
__device__ __forceinline__ void normalize_rows(O& o, float const (&row_max)[kRows], float const (&row_sum)[kRows],
                                               CS const& cS, float* lse_ptr, int row0, int q_len) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const bool empty = row_max[r] == -INFINITY;
    const float inv = empty ? 0.f : 1.f / sum;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o); ++c) o(r, c) *= inv;
    const int row = row0 + get<0>(cS(r, 0));
    if ((threadIdx.x & 3) == 0 && row < q_len) {
      lse_ptr[row] = empty ? -INFINITY : row_max[r] + logf(sum);  // row_max: the reference
    }
  }
}

// Epilogue: normalise and write lse (normalize_rows), stage O through shared memory (reusing sQ) and store it with
// row predicates.
template <class Kt, int kRows, class AccO, class CS, class SQ, class GO, class Mma>
__device__ __forceinline__ void store_output(AccO& acc_o, float const (&row_max)[kRows], float const (&row_sum)[kRows],
                                             CS const& cS, SQ& sQ, GO& gO, Mma const& mma, float* lse_ptr,
                                             int row0, int q_len) {
  using Elem = typename Kt::Elem;
  const int tid = threadIdx.x;
  Tensor o = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  normalize_rows(o, row_max, row_sum, cS, lse_ptr, row0, q_len);

  Tensor ro = make_tensor_like<Elem>(acc_o);
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); ++i) ro(i) = static_cast<Elem>(acc_o(i));

  __syncthreads();  // every warp is done with sQ
  auto cpO = make_tiled_copy_C(typename Kt::SmemCopyAtomO{}, mma);
  auto cpO_t = cpO.get_thread_slice(tid);
  cute::copy(cpO, cpO_t.retile_S(ro), cpO_t.partition_D(sQ));
  __syncthreads();

  typename Kt::GmemTiledCopyO gmem_copy_o;
  auto gothr = gmem_copy_o.get_thread_slice(tid);
  Tensor tOsO = gothr.partition_S(sQ);
  Tensor tOgO = gothr.partition_D(gO);
  Tensor tOcO = gothr.partition_D(make_identity_tensor(Shape<Int<Kt::kBlockM>, Int<Kt::kHeadDim>>{}));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (get<0>(tOcO(0, m, 0)) < q_len - row0) cute::copy(gmem_copy_o, tOsO(_, m, _), tOgO(_, m, _));
  }
}

// P (as the A operand of the P @ V product, in the input dtype) @ V.
template <class Elem, class AccS, class AccO, class RVt, class SVt, class Mma, class CpV, class CpVT>
__device__ __forceinline__ void accumulate_pv(AccS const& acc_s, AccO& acc_o, RVt& rVt, SVt const& tOsVt,
                                              Mma const& mma, CpV const& cpV, CpVT const& cpV_t) {
  Tensor pf = make_tensor_like<Elem>(acc_s);
  CUTE_UNROLL
  for (int i = 0; i < size(acc_s); ++i) pf(i) = static_cast<Elem>(acc_s(i));
  Tensor pa = make_tensor(pf.data(), acc_as_a_layout(pf.layout()));
  gemm_rs(acc_o, pa, rVt, tOsVt, mma, cpV, cpV_t);
}

// Non-finite V (docs/cuda_kernels.md, "Non-finite values"). The P V product multiplies every row's P by every key's
// V, so a dropped pair's P = 0 times a NaN or inf in V would reach a row that drops that key. A tile (or chunk)
// whose V holds an inf or NaN therefore zeroes those elements before the product and adds them back afterwards
// (correct_nonfinite_v) only to the rows that keep their key.

// Bit j of w[r]: this thread's row r keeps tile column j (its logit is not -inf; NaN counts as kept). From the
// logits, before the softmax step; the quad ORs its columns together, so every lane of it has the whole word.
// `s`: the logits as (rows, cols), `cS` the (row, col) of each element in the tile.
template <int kRows, class S, class CS>
__device__ __forceinline__ void kept_words_rows(S const& s, CS const& cS, uint64_t (&w)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    uint64_t x = 0;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) x |= uint64_t(s(r, c) != -INFINITY) << get<1>(cS(0, c));
    x |= __shfl_xor_sync(0xffffffffu, x, 1);
    w[r] = x | __shfl_xor_sync(0xffffffffu, x, 2);
  }
}

template <int kRows, class AccS, class CS>
__device__ __forceinline__ void kept_words(AccS const& acc_s, CS const& cS, uint64_t (&w)[kRows]) {
  kept_words_rows(make_tensor(acc_s.data(), rowcol_layout(acc_s.layout())), cS, w);
}

// acc_o(r, d) += V[j][d] for every inf / NaN element of V (read back from global memory: the shared tile has been
// cleaned) of a key j in `bad` that row r keeps. P's weight is left out: times a positive P the value stays what it
// is (inf, -inf, NaN), and an inf of a kept key whose fp32 P underflowed is still inf, as in the float64 oracle.
// `o`: the output accumulator as (rows, cols), `cO` the (row, col) of each element.
template <class Elem, int kRows, class O, class CO, class VRow>
__device__ __forceinline__ void correct_nonfinite_v_rows(O& o, CO const& cO, const uint64_t (&kept)[kRows], uint64_t bad,
                                                         VRow const& v_row) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    for (uint64_t w = kept[r] & bad; w != 0; w &= w - 1) {
      const Elem* v = v_row(__ffsll(static_cast<long long>(w)) - 1);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) {
        const float x = static_cast<float>(v[get<1>(cO(0, c))]);
        if (is_nonfinite(x)) o(r, c) += x;
      }
    }
  }
}

template <class Elem, int kRows, class AccO, class CO, class VRow>
__device__ __forceinline__ void correct_nonfinite_v(AccO& acc_o, CO const& cO, const uint64_t (&kept)[kRows],
                                                    uint64_t bad, VRow const& v_row) {
  Tensor o = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  correct_nonfinite_v_rows<Elem>(o, cO, kept, bad, v_row);
}

// ---------------------------------------------------------------------------------------------- kernel

template <class Kt>
__global__ void __launch_bounds__(Kt::kNThreads, Kt::kMinBlocks) flash_fwd_kernel(const __grid_constant__ FwdParams p) {
  using Elem = typename Kt::Elem;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kBlockN = Kt::kBlockN;
  constexpr int kD = Kt::kHeadDim;

  extern __shared__ __align__(128) char smem[];

  // Heavy (late, causal) query tiles first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int row0 = m_block * kBlockM;
  const int q_len = p.q_len, kv_len = p.kv_len;
  const bool is_causal = p.is_causal;
  const int causal_off = kv_len - q_len;

  // Key tiles [0, n_end): sequence end, then the bottom-right causal bound of this tile's last valid row.
  const int n_tiles = (p.kv_len + kBlockN - 1) / kBlockN;
  int n_end = n_tiles;
  if (p.is_causal) {
    const int last_key = min(row0 + kBlockM, p.q_len) - 1 + causal_off;  // largest visible key
    n_end = last_key < 0 ? 0 : min(n_tiles, last_key / kBlockN + 1);
  }

  // Row bounds: keys [lo(first row), hi(last row)) (row_bounds.h); each row's own bounds apply element-wise.
  const bool bounded = p.bounds.present();
  int n_begin = 0;
  if (bounded) {
    n_begin = p.bounds.lo(b, row0) / kBlockN;
    n_end = min(n_end, (p.bounds.hi(b, min(row0 + kBlockM, q_len) - 1) + kBlockN - 1) / kBlockN);
  }

  const bool has_mask = p.mask != nullptr;
  const bool has_bias = p.bias != nullptr;
  const uint8_t* cls_row = nullptr;
  if (has_mask && p.classes != nullptr && p.skip_empty_tiles) {
    cls_row = p.classes + b * p.cls_batch_stride + (h / p.mask_hdiv) * p.cls_head_stride + m_block * p.cls_m_stride;
  }
  auto tile_class = [&](int n) -> int {
    if (!has_mask) return kTileFull;
    if (cls_row == nullptr) return kTilePartial;
    return cls_row[n * p.cls_n_stride];
  };
  auto next_tile = [&](int n) -> int {  // largest non-empty tile index in [n_begin, n], or -1
    if (cls_row != nullptr) {
      while (n >= n_begin && cls_row[n * p.cls_n_stride] == kTileEmpty) --n;
    }
    return n >= n_begin ? n : -1;
  };

  // Global tensors.
  const HeadOperands<Elem> head = head_operands<Elem>(p, b, h);

  Tensor gQ = make_tensor(make_gmem_ptr(head.q + int64_t(row0) * p.q_row_stride),
                          Shape<Int<kBlockM>, Int<kD>>{}, make_stride(p.q_row_stride, _1{}));
  Tensor gO = make_tensor(make_gmem_ptr(head.out + int64_t(row0) * p.o_row_stride),
                          Shape<Int<kBlockM>, Int<kD>>{}, make_stride(p.o_row_stride, _1{}));
  Tensor mK = make_tensor(make_gmem_ptr(head.k), make_shape(p.kv_len, Int<kD>{}), make_stride(p.k_row_stride, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(head.v), make_shape(p.kv_len, Int<kD>{}), make_stride(p.v_row_stride, _1{}));
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kD>>{}, make_coord(_, 0));  // (BlockN, D, n)
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kD>>{}, make_coord(_, 0));

  // Shared tensors.
  Elem* smem_q = reinterpret_cast<Elem*>(smem);
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_q + kBlockM * kD), typename Kt::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_q + (kBlockM + kBlockN) * kD), typename Kt::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Kt::SmemLayoutVt{});

  typename Kt::GmemTiledCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tQgQ = gthr.partition_S(gQ);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tKgK = gthr.partition_S(gK);  // (CPY, CPY_N, CPY_K, n)
  Tensor tKsK = gthr.partition_D(sK);
  Tensor tVgV = gthr.partition_S(gV);
  Tensor tVsV = gthr.partition_D(sV);
  Tensor tQcQ = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor tKcK = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kD>>{}));

  typename Kt::TiledMma mma;
  auto tmma = mma.get_thread_slice(tid);
  Tensor rQ = tmma.partition_fragment_A(sQ);
  Tensor rK = tmma.partition_fragment_B(sK);
  Tensor rVt = tmma.partition_fragment_B(sVt);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);

  auto cpQ = make_tiled_copy_A(typename Kt::SmemCopyAtom{}, mma);
  auto cpQ_t = cpQ.get_thread_slice(tid);
  Tensor tSsQ = cpQ_t.partition_S(sQ);
  auto cpK = make_tiled_copy_B(typename Kt::SmemCopyAtom{}, mma);
  auto cpK_t = cpK.get_thread_slice(tid);
  Tensor tSsK = cpK_t.partition_S(sK);
  auto cpV = make_tiled_copy_B(typename Kt::SmemCopyAtomT{}, mma);
  auto cpV_t = cpV.get_thread_slice(tid);
  Tensor tOsVt = cpV_t.partition_S(sVt);

  // Coordinates of this thread's accumulator elements, as (rows, cols).
  Tensor tScS = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS))::value;  // 2 * MMA_M
  constexpr int kCols = decltype(size<1>(cS))::value;  // 2 * MMA_N

  float row_max[kRows], row_sum[kRows];
  start_softmax_rows(row_max, row_sum);

  // Bias / mask bases for this (batch, head).
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;
  const int64_t mask_base = has_mask ? b * p.mask_batch_stride + (h / p.mask_hdiv) * p.mask_head_stride : 0;
  const bool bias_per_key = has_bias && p.bias_row_stride == 0;
  const int bias_esize = p.bias_dtype == DType::kF32 ? 4 : 2;
  // 16-byte cp.async of mask rows / bias vectors where the addresses allow it (else plain loads into smem).
  const bool mask_vec = has_mask && p.mask_col_stride == 1 && (p.mask_row_stride % 16 == 0) &&
                        (mask_base % 16 == 0) && ((reinterpret_cast<uintptr_t>(p.mask) & 15) == 0);
  const bool bias_vec = bias_per_key && p.bias_col_stride == 1 && ((bias_base * bias_esize) % 16 == 0) &&
                        ((reinterpret_cast<uintptr_t>(p.bias) & 15) == 0);

  // Mask tile [BlockM, BlockN] bytes and per-key bias vector [BlockN] (raw dtype), double-buffered: the tile
  // after the current one is loaded together with its K tile while the current one is still being read.
  uint8_t* smem_mask = reinterpret_cast<uint8_t*>(smem + Kt::kSmemQKVBytes);
  uint8_t* smem_bias = smem_mask + 2 * kBlockM * kBlockN;

  auto load_mask_tile = [&](int nt, int buf) {
    uint8_t* dst = smem_mask + buf * kBlockM * kBlockN;
    const int c0 = nt * kBlockN;
    constexpr int kChunksPerRow = kBlockN / 16;
    CUTE_UNROLL
    for (int e = tid; e < kBlockM * kChunksPerRow; e += Kt::kNThreads) {
      const int r = e / kChunksPerRow, cc = (e % kChunksPerRow) * 16;
      const int row = row0 + r;
      if (row >= p.q_len) continue;  // rows past the end are masked analytically
      const uint8_t* src = p.mask + mask_base + int64_t(row) * p.mask_row_stride;
      if (mask_vec && c0 + cc + 16 <= p.kv_len) {
        cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(src + c0 + cc),
            *reinterpret_cast<cute::uint128_t*>(dst + r * kBlockN + cc));
      } else {
        for (int i = 0; i < 16; ++i) {
          const int col = c0 + cc + i;
          dst[r * kBlockN + cc + i] = col < p.kv_len ? src[int64_t(col) * p.mask_col_stride] : 0;
        }
      }
    }
  };
  auto load_bias_vec = [&](int nt, int buf) {
    uint8_t* dst = smem_bias + buf * kBlockN * 4;
    const int c0 = nt * kBlockN;
    const int per_chunk = 16 / bias_esize;
    const int chunks = kBlockN / per_chunk;
    const uint8_t* src = static_cast<const uint8_t*>(p.bias);
    for (int e = tid; e < chunks; e += Kt::kNThreads) {
      const int col = c0 + e * per_chunk;
      if (bias_vec && col + per_chunk <= p.kv_len) {
        cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(
            *reinterpret_cast<const cute::uint128_t*>(src + (bias_base + col) * bias_esize),
            *reinterpret_cast<cute::uint128_t*>(dst + e * 16));
      } else {
        for (int i = 0; i < 16; ++i) {
          const int c = col + i / bias_esize;
          dst[e * 16 + i] =
              c < p.kv_len ? src[(bias_base + int64_t(c) * p.bias_col_stride) * bias_esize + i % bias_esize] : 0;
        }
      }
    }
  };
  auto smem_bias_value = [&](int buf, int c) -> float {
    const uint8_t* src = smem_bias + buf * kBlockN * 4;
    if (p.bias_dtype == DType::kBF16)
      return __uint_as_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(src)[c]) << 16);
    if (p.bias_dtype == DType::kF16) return __half2float(reinterpret_cast<const __half*>(src)[c]);
    return reinterpret_cast<const float*>(src)[c];
  };

  const bool use_cap = p.softcap > 0.f;
  const float cap_in = use_cap ? p.scale / p.softcap : 0.f;

  // Keys of the current tile whose V holds an inf or NaN, double-buffered like the mask (see below).
  __shared__ unsigned long long bad_v_keys[2];
  if (tid == 0) bad_v_keys[0] = bad_v_keys[1] = 0ull;
  Tensor tOcO = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cO = make_tensor(tOcO.data(), rowcol_layout(tOcO.layout()));

  int n = next_tile(n_end - 1);
  int buf = 0;

  // Prologue: Q, then the first K tile with its mask tile and bias vector.
  copy_rows(gmem_copy, tQgQ, tQsQ, tQcQ, p.q_len - row0);
  if (n >= 0) {
    copy_rows(gmem_copy, tKgK(_, _, _, n), tKsK, tKcK, p.kv_len - n * kBlockN);
    if (tile_class(n) == kTilePartial) load_mask_tile(n, 0);
    if (bias_per_key) load_bias_vec(n, 0);
  }
  cute::cp_async_fence();

  while (n >= 0) {
    const int cls = tile_class(n);
    const int n_next = next_tile(n - 1);
    const int col0 = n * kBlockN;

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cute::cp_async_wait<0>();
    __syncthreads();  // K, mask and bias of tile n landed
    copy_rows(gmem_copy, tVgV(_, _, _, n), tVsV, tKcK, p.kv_len - col0);
    cute::cp_async_fence();

    // Element-wise masking is needed on partial mask tiles, across the causal diagonal and at sequence ends.
    const bool load_mask = cls == kTilePartial;
    const bool need_elem = load_mask || col0 + kBlockN > p.kv_len || row0 + kBlockM > p.q_len ||
                           (p.is_causal && col0 + kBlockN - 1 > row0 + causal_off) ||
                           (bounded && !p.bounds.keeps_all(b, row0, row0 + kBlockM, col0, col0 + kBlockN));

    gemm_ss(acc_s, rQ, rK, tSsQ, tSsK, mma, cpQ, cpQ_t, cpK, cpK_t);

    cute::cp_async_wait<0>();
    // V landed; every warp is done reading sK. The barrier also ORs each thread's scan of its own V pieces.
    const bool v_bad = __syncthreads_or(own_pieces_nonfinite<Elem>(tVsV));
    // This word's last reader was the previous tile, before this iteration's first barrier.
    if (tid == 0) bad_v_keys[buf ^ 1] = 0ull;
    if (n_next >= 0) {
      copy_rows(gmem_copy, tKgK(_, _, _, n_next), tKsK, tKcK, p.kv_len - n_next * kBlockN);
      if (tile_class(n_next) == kTilePartial) load_mask_tile(n_next, buf ^ 1);
      if (bias_per_key) load_bias_vec(n_next, buf ^ 1);
      cute::cp_async_fence();
    }

    // Scores s = cap(scale * qk) + bias in natural units (the backward recomputes them with the same operations),
    // dropped keys -inf. A -inf bias drops its key whatever q.k is (NaN or inf + -inf would not be -inf).
    const uint8_t* mtile = smem_mask + buf * kBlockM * kBlockN;
    // Each step is a separate pass behind a CTA-uniform branch, so the element loops stay branch-free.
    Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    if (use_cap) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) = p.softcap * tanhf(acc_s(i) * cap_in);
    } else {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= p.scale;
    }
    if (bias_per_key) {
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const float bk = smem_bias_value(buf, get<1>(cS(0, c)));
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) s(r, c) = add_bias(s(r, c), bk);
      }
    } else if (has_bias) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int row = row0 + get<0>(cS(r, 0));
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          const int col = col0 + get<1>(cS(0, c));
          if (row < q_len && col < kv_len) {
            const float bv = load_bias(p.bias, bias_base + int64_t(row) * p.bias_row_stride +
                                                   int64_t(col) * p.bias_col_stride, p.bias_dtype);
            s(r, c) = add_bias(s(r, c), bv);
          }
        }
      }
    }
    if (need_elem) {
      const int row_lim = q_len - row0, col_lim = kv_len - col0;
      const int diag = is_causal ? row0 + causal_off - col0 : (1 << 30);  // key cl visible iff cl <= rl + diag
      const int32_t* key_seg = bounded ? p.bounds.segments(b) : nullptr;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int rl = get<0>(cS(r, 0));
        const bool in_row = rl < row_lim;
        // This row's keys [lo, hi) as tile columns, and its segment (no bounds: every column).
        int lo = 0, hi = 1 << 30, seg = 0;
        bool compare = false;
        if (bounded && in_row) {
          const int32_t* br = p.bounds.row(b, row0 + rl);
          lo = br[0] - col0, hi = br[1] - col0, seg = br[2], compare = key_seg != nullptr && br[3] != 0;
        }
        CUTE_UNROLL
        for (int c = 0; c < kCols; c += 2) {
          const int cl = get<1>(cS(0, c));  // even; fragment column c + 1 is key cl + 1
          const uint32_t mpair = load_mask ? *reinterpret_cast<const uint16_t*>(mtile + rl * kBlockN + cl) : 0x0101u;
          bool k0 = in_row && cl < col_lim && cl <= rl + diag && (mpair & 0xffu) && cl >= lo && cl < hi;
          bool k1 = in_row && cl + 1 < col_lim && cl + 1 <= rl + diag && (mpair >> 8) && cl + 1 >= lo && cl + 1 < hi;
          if (compare) {
            k0 = k0 && __ldg(key_seg + col0 + cl) == seg;
            k1 = k1 && __ldg(key_seg + col0 + cl + 1) == seg;
          }
          s(r, c) = k0 ? s(r, c) : -INFINITY;
          s(r, c + 1) = k1 ? s(r, c + 1) : -INFINITY;
        }
      }
    }

    if (v_bad) {  // rare (CTA-uniform): V of this tile holds an inf or NaN
      uint64_t kept[kRows];
      kept_words(acc_s, cS, kept);
      CUTE_UNROLL
      for (int m = 0; m < size<1>(tVsV); ++m) {
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tVsV); ++k) {
          if (zero_nonfinite_piece<Elem>(&tVsV(0, m, k))) atomicOr(&bad_v_keys[buf], 1ull << get<0>(tKcK(0, m, k)));
        }
      }
      __syncthreads();  // V cleaned, the bad keys known
      online_softmax_step(acc_s, acc_o, row_max, row_sum);
      correct_nonfinite_v<Elem>(acc_o, cO, kept, bad_v_keys[buf],
                                [&](int j) { return head.v + int64_t(col0 + j) * p.v_row_stride; });
    } else {
      online_softmax_step(acc_s, acc_o, row_max, row_sum);
    }
    accumulate_pv<Elem>(acc_s, acc_o, rVt, tOsVt, mma, cpV, cpV_t);

    n = n_next;
    buf ^= 1;
  }
  cute::cp_async_wait<0>();

  float* lse_ptr = p.lse + (int64_t(b) * p.heads + h) * p.q_len;
  store_output<Kt>(acc_o, row_max, row_sum, cS, sQ, gO, mma, lse_ptr, row0, p.q_len);
}

}  // namespace fwd
}  // namespace dmattn
