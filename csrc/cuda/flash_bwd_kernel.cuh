// Flash-attention backward for sm80+ (cp.async into swizzled shared memory, ldmatrix, mma.sync through CuTe),
// with a broadcastable trainable bias (dbias reduced over its broadcast dims inside the kernel), a boolean
// mask whose empty tiles are skipped through the tile-class map, GQA, bottom-right causal and softcap.
// Templated on head dim and dtype only; causal, bias, mask, softcap and determinism are run-time branches that
// are uniform across the CTA.
//
// Main kernel: one CTA per (key tile, batch group, kv-head group). It holds K and V of its key tile, loops over
// the query tiles that see it (outer) and the query heads of its GQA group (inner), recomputes P from the
// forward's lse, and accumulates dK and dV of the whole group in registers (no [B, Lk, H, D] buffer, no
// atomics). dQ goes to an fp32 accumulator by atomics, or (deterministic) is left to a second kernel that is
// parallel over query tiles and sums its key tiles in a fixed order. dbias: the CTA owns whole columns of
// dbias (a batch- or head-broadcast bias puts every batch / kv head that shares them into one CTA), so the
// reduction over broadcast dims needs no atomics: dS accumulates in registers while its dbias tile stays the
// same and is flushed through shared memory, either stored (one flush per tile) or added to an fp32 buffer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "cuda/bias_element.cuh"
#include "cuda/flash_bwd.h"
#include "cuda/smem_limit.cuh"
#include "cuda/smem_tiles.cuh"
#include "cuda/tile_classes.h"
#include "cuda/fast_exp2.cuh"

namespace dmattn {
namespace bwd {

using namespace cute;

// The shared-memory tiles of the sm80 backwards (this one and the key-list backward, flash_bwd_key_list_kernel.cuh:
// [kBlockM, D] query-side, [kBlockN, D] key-side, [kBlockM, kBlockN] P / dS) and the copies that fill and read them.
// One definition, so that both lay out and move their operands alike; their traits derive from it.
template <class Elem, int kHeadDim, int kBlockM, int kBlockN, int kNThreads>
struct SmemTiles {
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kBlockKSmem == 32 ? 2 : 3;

  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kBlockKSmem>>, Stride<Int<kBlockKSmem>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));   // Q, dO
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // K, V
  // Transposed views of the same storage: Q^T / dO^T [D, M] (B of dK / dV), K^T [D, N] (B of dQ).
  using SmemLayoutQt =
      decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  // P and dS [M, N] (dS is A of dQ), and their transposes [N, M] (A of dV / dK).
  using SmemLayoutAtomP =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, Int<kBlockN>>, Stride<Int<kBlockN>, _1>>{}));
  using SmemLayoutP = decltype(tile_to_shape(SmemLayoutAtomP{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutPt =
      decltype(composition(SmemLayoutP{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));

  using S2RAtom = Copy_Atom<SM75_U32x4_LDSM_N, Elem>;
  using S2RAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Elem>;
  using R2SAtom = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Elem>;

  static constexpr int kGmemThreadsPerRow = kBlockKSmem / 8;  // 16-byte chunks per smem atom row
  using GmemLayoutAtom = Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
                                Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemTiledCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Elem>{},
                                                 GmemLayoutAtom{}, Layout<Shape<_1, _8>>{}));
};

// SmemTiles is given the 256 threads of kNWarps below: a base cannot read the members of the class it starts.
template <int kHeadDim_, bool kIsBF16>
struct Traits : SmemTiles<std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>, kHeadDim_, kBwdBlockM,
                          kBwdBlockN, 256> {
  using Elem = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBwdBlockM;
  static constexpr int kBlockN = kBwdBlockN;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kBlockM == 64 && kBlockN == 64, "the warp tiling below assumes 64 x 64 tiles");

  using MmaOp = std::conditional_t<kIsBF16, SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // 4 warps along M x 2 along N; the 32-wide N tile gives each warp two adjacent n8 atoms (ldmatrix.x4 for B).
  // One tiling serves all five products: S, dP (64 x 64), dV, dK (64 keys x D) and dQ (64 rows x D).
  using TiledMma = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<_4, _2, _1>>, Tile<_64, _32, _16>>;

  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kPElems = kBlockM * kBlockN;
  static constexpr int kDbStride = kBlockN + 4;  // fp32 dbias staging rows, padded against bank conflicts
  // Main kernel: Q and dO double-buffered (the next visited tile is prefetched while this one is computed).
  static constexpr int kSmemBytes =
      (4 * kQElems + 2 * kKVElems + 2 * kPElems) * int(sizeof(Elem)) + kBlockM * kDbStride * int(sizeof(float));
  // dq kernel: K and V double-buffered, + the kept bytes of a tile with non-finite K.
  static constexpr int kSmemBytesDq = (2 * kQElems + 4 * kKVElems + kPElems) * int(sizeof(Elem)) + kPElems;
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm90 && kSmemBytesDq <= kMaxSmemPerBlockSm90, "shared memory over the sm_90 limit");
};

// ---------------------------------------------------------------------------------------------- helpers

// Two adjacent elements (even column) of a row-major [.., D] tensor in the input dtype.
template <class Elem>
__device__ __forceinline__ void store_pair(Elem* dst, float a, float b) {
  Elem two[2] = {static_cast<Elem>(a), static_cast<Elem>(b)};
  *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(two);
}

// dQ of the query tile at m0 of (b, h), scaled, in the input dtype, written once: dq is the accumulator and cQ its
// coordinates, both as (rows, cols); q_len = Lq, q_row_stride = heads * D. Shared by the backwards that keep dQ in
// registers (the dq kernel below, the sm80 and Hopper key-list backwards). Rows with no kept key have P = 0
// everywhere: exact zeros.
template <class Elem, int kD, class DQ, class CQ>
__device__ __forceinline__ void store_dq(const BwdParams& p, DQ const& dq, CQ const& cQ, int q_len,
                                         int64_t q_row_stride, int b, int h, int m0) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(dq); ++r) {
    const int row = m0 + get<0>(cQ(r, 0));
    if (row < q_len) {
      Elem* dst = static_cast<Elem*>(p.dq) + (int64_t(b) * q_len + row) * q_row_stride + int64_t(h) * kD;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dq); c += 2) {
        const int d = get<1>(cQ(0, c));
        store_pair(dst + d, dq(r, c) * p.scale, dq(r, c + 1) * p.scale);
      }
    }
  }
}

// An fp32 accumulator tile in the element type, stored to its shared-memory tile (P, dS: operands of the products
// that follow).
template <class Elem, class Acc, class R2S, class R2SThr, class Dst>
__device__ __forceinline__ void store_as(Acc const& acc, R2S const& r2s, R2SThr const& r2s_t, Dst& dst) {
  Tensor e = make_tensor_like<Elem>(acc);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) e(i) = static_cast<Elem>(acc(i));
  cute::copy(r2s, r2s_t.retile_S(e), dst);
}

__device__ __forceinline__ int tile_class(const BwdParams& p, int b, int h, int m, int n) {
  if (p.mask == nullptr) return kTileFull;
  if (p.classes == nullptr) return kTilePartial;
  return p.classes[b * p.cls_batch_stride + (h / p.mask_hdiv) * p.cls_head_stride + m * p.cls_m_stride +
                   n * p.cls_n_stride];
}

// The logit of a raw score x = q.k as the forward computes it: softcap tanh(x scale / softcap) with a softcap
// (use_cap; cap_in = scale / softcap), else scale x. d receives the softcap's chain factor 1 - tanh^2 (1 without
// one), which dS takes on. Shared by both sm80 backwards, so that they recompute the forward's logits alike.
__device__ __forceinline__ float capped_logit(const BwdParams& p, float x, bool use_cap, float cap_in, float& d) {
  d = 1.f;
  if (use_cap) {
    const float t = tanhf(x * cap_in);
    x = p.softcap * t;
    d = 1.f - t * t;
  } else {
    x *= p.scale;
  }
  return x;
}

// Turns the raw score tile acc_s = q.k (rows m0.., keys n0..) into P = exp(s - lse) in place, with
// s = cap(scale * q.k) + bias computed exactly as the forward does (so s - lse is exact at the max, whatever the
// magnitude) and P = 0 for pairs that are not kept: sequence ends, causality, mask, a -inf bias or logit, rows with
// no kept key. Bit c of kept[r] says whether fragment element (r, c) is kept: the products that follow zero
// dropped pairs by select, since P = 0 there may meet a NaN dP or delta (0 * NaN). capd receives the softcap
// chain factor 1 - tanh^2 (1 without softcap).
template <class AccS, class CapD, class CS, int kRows>
__device__ __forceinline__ void scores_to_p(AccS& acc_s, CapD& capd, CS const& cS, const BwdParams& p, int b,
                                            int h, int m0, int n0, int cls, const float (&lse)[kRows],
                                            uint32_t (&kept)[kRows]) {
  Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
  Tensor cd = make_tensor(capd.data(), rowcol_layout(capd.layout()));
  const bool has_bias = p.bias != nullptr;
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;
  const bool load_mask = cls == kTilePartial;
  const int64_t mask_base = load_mask ? b * p.mask_batch_stride + (h / p.mask_hdiv) * p.mask_head_stride : 0;
  const bool use_cap = p.softcap > 0.f;
  const float cap_in = use_cap ? p.scale / p.softcap : 0.f;
  const int causal_off = p.kv_len - p.q_len;
  // Two adjacent keys of a mask row can be read as one 16-bit load.
  const bool mask_pairs = load_mask && p.mask_col_stride == 1 && (p.mask_row_stride % 2 == 0) &&
                          (mask_base % 2 == 0) && ((reinterpret_cast<uintptr_t>(p.mask) & 1) == 0);
  static_assert(decltype(size<1>(s))::value <= 32, "kept bits fit a word per row");
  const bool bounded = p.bounds.present();
  const int32_t* key_seg = bounded ? p.bounds.segments(b) : nullptr;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    const int row = m0 + get<0>(cS(r, 0));
    const int64_t mrow = mask_base + int64_t(row) * p.mask_row_stride;
    kept[r] = 0u;
    // This row's keys [lo, hi) and segment (row_bounds.h); no bounds: every key.
    int lo = 0, hi = INT_MAX, seg = 0;
    bool compare = false;
    if (bounded && row < p.q_len) {
      const int32_t* br = p.bounds.row(b, row);
      lo = br[0], hi = br[1], seg = br[2], compare = key_seg != nullptr && br[3] != 0;
    }
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); c += 2) {
      const int col0 = n0 + get<1>(cS(0, c));  // even; the pair's second key is col0 + 1
      uint32_t mk[2] = {1u, 1u};
      if (load_mask) {
        mk[0] = mk[1] = 0u;
        if (row < p.q_len) {
          if (mask_pairs && col0 + 1 < p.kv_len) {
            const uint32_t two = __ldg(reinterpret_cast<const unsigned short*>(p.mask + mrow + col0));
            mk[0] = two & 0xffu;
            mk[1] = two >> 8;
          } else {
            if (col0 < p.kv_len) mk[0] = __ldg(p.mask + mrow + int64_t(col0) * p.mask_col_stride);
            if (col0 + 1 < p.kv_len) mk[1] = __ldg(p.mask + mrow + int64_t(col0 + 1) * p.mask_col_stride);
          }
        }
      }
      CUTE_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int col = col0 + e;
        float d;
        float x = capped_logit(p, s(r, c + e), use_cap, cap_in, d);
        bool keep = row < p.q_len && col < p.kv_len && (!p.is_causal || col <= row + causal_off) && mk[e] != 0u &&
                    col >= lo && col < hi;
        if (compare) keep = keep && __ldg(key_seg + col) == seg;
        if (keep && has_bias) {
          const float bv = load_bias(p.bias, bias_base + int64_t(row) * p.bias_row_stride +
                                                 int64_t(col) * p.bias_col_stride, p.bias_dtype);
          x = add_bias(x, bv);
        }
        keep = keep && x != -INFINITY && lse[r] != -INFINITY;
        s(r, c + e) = keep ? exp2_ftz((x - lse[r]) * kLog2e) : 0.f;
        cd(r, c + e) = d;
        kept[r] |= uint32_t(keep) << (c + e);
      }
    }
  }
}

// lse and delta of this thread's rows of the query tile at m0 of (b, h).
template <class CS, int kRows>
__device__ __forceinline__ void load_row_stats(const BwdParams& p, CS const& cS, int b, int h, int m0,
                                               float (&lse)[kRows], float (&delta)[kRows]) {
  const int64_t base = (int64_t(b) * p.heads + h) * p.q_len;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = m0 + get<0>(cS(r, 0));
    lse[r] = row < p.q_len ? p.lse[base + row] : -INFINITY;
    delta[r] = row < p.q_len ? p.delta[base + row] : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------- non-finite tiles
// The products dV = P^T dO, dK = dS^T Q and dQ = dS K multiply the exact zeros of dropped pairs by the other
// operand, so an inf or NaN in q, dout or k would reach gradients of pairs that drop it (0 * NaN). A tile whose Q,
// dO or K holds one (each thread scans the pieces it copied; the barrier that follows ORs the flags) runs those
// products as scalar sums over its kept pairs instead (docs/cuda_backward.md, "Non-finite values"): slow, and
// only where the data is non-finite.

// keep[i * 64 + j] = 1 where fragment element (row i, key j) is kept (kept bits of scores_to_p).
template <int kRows, class CS>
__device__ __forceinline__ void store_kept_bytes(uint8_t* keep, CS const& cS, const uint32_t (&kept)[kRows]) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(cS); ++c) {
      keep[get<0>(cS(r, c)) * 64 + get<1>(cS(r, c))] = uint8_t((kept[r] >> c) & 1u);
    }
  }
}

// The sum a scalar kept-pair product runs over: dV += P^T dO and dK += dS^T Q sum over query rows, dQ += dS K over
// keys.
enum class KeptSum { kOverRows, kOverKeys };

// acc(x, d) += sum over kept pairs of A[i][j] * B[t][d], t < terms running over the summed index: (i, j) = (t, x)
// over rows (dV: A = P, B = dO; dK: A = dS, B = Q), (x, t) over keys (dQ: A = dS, B = K). Columns run outside and
// t inside, so that each column's shared-memory address is live for one inner loop (in the other order the compiler
// hoists every column's swizzled address out of it).
template <KeptSum kSum, class Acc, class CAcc, class SA, class SB>
__device__ __forceinline__ void kept_product(Acc& acc, CAcc const& cAcc, SA const& sA, SB const& sB,
                                             const uint8_t* keep, int terms) {
  Tensor a = make_tensor(acc.data(), rowcol_layout(acc.layout()));
  CUTE_UNROLL
  for (int c = 0; c < size<1>(a); ++c) {
    const int d = get<1>(cAcc(0, c));
#pragma unroll 1
    for (int t = 0; t < terms; ++t) {
      CUTE_UNROLL
      for (int r = 0; r < size<0>(a); ++r) {
        const int x = get<0>(cAcc(r, 0));
        const int i = kSum == KeptSum::kOverRows ? t : x, j = kSum == KeptSum::kOverRows ? x : t;
        if (keep[i * 64 + j]) a(r, c) += static_cast<float>(sA(i, j)) * static_cast<float>(sB(t, d));
      }
    }
  }
}

// kept_product as an out-of-line call (__noinline__) on a local copy of the fragment, for a kernel at the register
// limit: the key-list kernel with 128-row tiles spilled on its MMA path while the scalar loops were inlined (ptxas,
// sm_90a, D = 128: 828 bytes; 20-24 this way). The copies and the call cost only the tiles that take this path;
// the other kernels inline kept_product, which costs them no spill.
template <KeptSum kSum, class AccLayout, class CAcc, class SA, class SB>
__device__ __noinline__ void kept_product_out_of_line(float* acc, CAcc cAcc, SA sA, SB sB, const uint8_t* keep,
                                                      int terms) {
  Tensor a = make_tensor(acc, AccLayout{});
  kept_product<kSum>(a, cAcc, sA, sB, keep, terms);
}

template <KeptSum kSum, class Acc, class CAcc, class SA, class SB>
__device__ __forceinline__ void kept_product_through_call(Acc& acc, CAcc const& cAcc, SA const& sA, SB const& sB,
                                                          const uint8_t* keep, int terms) {
  float local[decltype(size(acc))::value];
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) local[i] = acc(i);
  kept_product_out_of_line<kSum, std::decay_t<decltype(acc.layout())>>(local, cAcc, sA, sB, keep, terms);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) acc(i) = local[i];
}

// ---------------------------------------------------------------------------------------------- main kernel

template <class Kt>
__global__ void __launch_bounds__(Kt::kNThreads, 1) flash_bwd_main_kernel(const __grid_constant__ BwdParams p) {
  using Elem = typename Kt::Elem;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kBlockN = Kt::kBlockN;
  constexpr int kD = Kt::kHeadDim;
  constexpr int kNThreads = Kt::kNThreads;

  // Hopper route: this kernel works only when the non-finite scan found an inf or NaN (flash_bwd.h: nonfinite).
  if (p.nonfinite != nullptr && *p.nonfinite == 0u) return;  // CTA-uniform
  extern __shared__ __align__(128) char smem[];

  const int n_block = blockIdx.x;
  const int kvh_begin = blockIdx.y * p.kv_heads_per_item;
  const int b_begin = blockIdx.z * p.batches_per_item;
  const int tid = threadIdx.x;
  const int n0 = n_block * kBlockN;
  const int g = p.group;
  const int causal_off = p.kv_len - p.q_len;
  const int m_tiles = (p.q_len + kBlockM - 1) / kBlockM;
  int m_begin = 0;
  if (p.is_causal) {
    const int first_row = n0 - causal_off;  // first query row that sees key n0
    m_begin = first_row <= 0 ? 0 : (first_row >= p.q_len ? m_tiles : first_row / kBlockM);
  }
  const int64_t q_row_stride = int64_t(p.heads) * kD;
  const int64_t k_row_stride = int64_t(p.kv_heads) * kD;

  // Shared memory: sQ[2] | sdO[2] | sK | sV | sP | sdS | fp32 dbias staging.
  Elem* sq_ptr = reinterpret_cast<Elem*>(smem);
  Elem* sdo_ptr = sq_ptr + 2 * Kt::kQElems;
  Elem* sk_ptr = sdo_ptr + 2 * Kt::kQElems;
  Elem* sv_ptr = sk_ptr + Kt::kKVElems;
  Elem* sp_ptr = sv_ptr + Kt::kKVElems;
  Elem* sds_ptr = sp_ptr + Kt::kPElems;
  float* sdb = reinterpret_cast<float*>(sds_ptr + Kt::kPElems);

  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), typename Kt::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sdo_ptr), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(sk_ptr), typename Kt::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(sv_ptr), typename Kt::SmemLayoutKV{});
  Tensor sP = make_tensor(make_smem_ptr(sp_ptr), typename Kt::SmemLayoutP{});
  Tensor sdS = make_tensor(make_smem_ptr(sds_ptr), typename Kt::SmemLayoutP{});
  Tensor sQt = make_tensor(make_smem_ptr(sq_ptr), typename Kt::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(sdo_ptr), typename Kt::SmemLayoutQt{});
  Tensor sKt = make_tensor(make_smem_ptr(sk_ptr), typename Kt::SmemLayoutKt{});
  Tensor sPt = make_tensor(make_smem_ptr(sp_ptr), typename Kt::SmemLayoutPt{});
  Tensor sdSt = make_tensor(make_smem_ptr(sds_ptr), typename Kt::SmemLayoutPt{});

  typename Kt::GmemTiledCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tKsK = gthr.partition_D(sK);
  Tensor tKsV = gthr.partition_D(sV);
  Tensor tQc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor tKc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kD>>{}));

  typename Kt::TiledMma mma;
  auto tmma = mma.get_thread_slice(tid);
  Tensor tSrQ = tmma.partition_fragment_A(sQ);
  Tensor tSrK = tmma.partition_fragment_B(sK);
  Tensor tdPrdO = tmma.partition_fragment_A(sdO);
  Tensor tdPrV = tmma.partition_fragment_B(sV);
  Tensor tdVrPt = tmma.partition_fragment_A(sPt);
  Tensor tdVrdOt = tmma.partition_fragment_B(sdOt);
  Tensor tdKrdSt = tmma.partition_fragment_A(sdSt);
  Tensor tdKrQt = tmma.partition_fragment_B(sQt);
  Tensor tdQrdS = tmma.partition_fragment_A(sdS);
  Tensor tdQrKt = tmma.partition_fragment_B(sKt);

  auto cpA = make_tiled_copy_A(typename Kt::S2RAtom{}, mma);
  auto cpA_t = cpA.get_thread_slice(tid);
  auto cpAT = make_tiled_copy_A(typename Kt::S2RAtomT{}, mma);
  auto cpAT_t = cpAT.get_thread_slice(tid);
  auto cpB = make_tiled_copy_B(typename Kt::S2RAtom{}, mma);
  auto cpB_t = cpB.get_thread_slice(tid);
  auto cpBT = make_tiled_copy_B(typename Kt::S2RAtomT{}, mma);
  auto cpBT_t = cpBT.get_thread_slice(tid);
  Tensor tSsK = cpB_t.partition_S(sK);
  Tensor tdPsV = cpB_t.partition_S(sV);
  Tensor tdVsPt = cpAT_t.partition_S(sPt);
  Tensor tdKsdSt = cpAT_t.partition_S(sdSt);
  Tensor tdQsdS = cpA_t.partition_S(sdS);
  Tensor tdQsKt = cpBT_t.partition_S(sKt);

  auto r2s = make_tiled_copy_C(typename Kt::R2SAtom{}, mma);
  auto r2s_t = r2s.get_thread_slice(tid);
  Tensor tPsP = r2s_t.partition_D(sP);
  Tensor tPsdS = r2s_t.partition_D(sdS);

  // Coordinates of this thread's accumulator elements, as (rows, cols).
  Tensor tScS = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS))::value;

  // The visited (query tile, query head) pairs of a (batch, kv head) item, in order: t = (m - m_begin) * g + hi.
  // With row bounds the query tiles [m_begin, m_end) that may keep a key of this tile depend on the batch (set below).
  int m_end = m_tiles;
  int n_work = (m_end - m_begin) * g;
  auto next_work = [&](int b, int kvh, int t) -> int {  // first t' >= t whose tile is not empty, or -1
    for (; t < n_work; ++t) {
      if (tile_class(p, b, kvh * g + t % g, m_begin + t / g, n_block) != kTileEmpty) return t;
    }
    return -1;
  };
  // cp.async of the Q and dO tiles of work item t into buffer buf.
  auto load_q_do = [&](int b, int kvh, int t, int buf) {
    const int m0 = (m_begin + t / g) * kBlockM;
    const int h = kvh * g + t % g;
    const int64_t q_off = (int64_t(b) * p.q_len + m0) * q_row_stride + int64_t(h) * kD;
    Tensor gQ = make_tensor(make_gmem_ptr(static_cast<const Elem*>(p.q) + q_off),
                            Shape<Int<kBlockM>, Int<kD>>{}, make_stride(q_row_stride, _1{}));
    Tensor gdO = make_tensor(make_gmem_ptr(static_cast<const Elem*>(p.dout) + q_off),
                             Shape<Int<kBlockM>, Int<kD>>{}, make_stride(q_row_stride, _1{}));
    Tensor sQb = make_tensor(make_smem_ptr(sq_ptr + buf * Kt::kQElems), typename Kt::SmemLayoutQ{});
    Tensor sdOb = make_tensor(make_smem_ptr(sdo_ptr + buf * Kt::kQElems), typename Kt::SmemLayoutQ{});
    Tensor dQ = gthr.partition_D(sQb);
    Tensor ddO = gthr.partition_D(sdOb);
    copy_rows(gmem_copy, gthr.partition_S(gQ), dQ, tQc, p.q_len - m0);
    copy_rows(gmem_copy, gthr.partition_S(gdO), ddO, tQc, p.q_len - m0);
  };
  Tensor tKVc = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kD>>{}));
  Tensor cKV = make_tensor(tKVc.data(), rowcol_layout(tKVc.layout()));
  Tensor tQDc = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cQD = make_tensor(tQDc.data(), rowcol_layout(tQDc.layout()));

  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kD>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kBlockN>, Int<kD>>{});

  // dbias: the current target tile (bias offset of its (batch, head, first row)) and its fp32 partial sum.
  const bool has_dbias = p.bias != nullptr && p.dbias_mode != kDbiasNone;
  const bool dbias_rows = p.bias_row_stride != 0;  // bias has full query rows
  Tensor dbacc = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
  clear(dbacc);
  int64_t db_key = -1, db_base = 0;
  int db_m0 = 0;
  auto flush_dbias = [&]() {  // CTA-uniform
    Tensor db = make_tensor(dbacc.data(), rowcol_layout(dbacc.layout()));
    CUTE_UNROLL
    for (int r = 0; r < size<0>(db); ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(db); ++c) {
        sdb[get<0>(cS(r, 0)) * Kt::kDbStride + get<1>(cS(0, c))] = db(r, c);
      }
    }
    clear(dbacc);
    __syncthreads();
    const bool direct = p.dbias_mode == kDbiasDirect;
    if (dbias_rows) {
      for (int e = tid; e < kBlockM * kBlockN; e += kNThreads) {
        const int lr = e / kBlockN, lc = e % kBlockN;
        const int row = db_m0 + lr, col = n0 + lc;
        if (row < p.q_len && col < p.kv_len) {
          const int64_t off = db_base + int64_t(row) * p.bias_row_stride + int64_t(col) * p.bias_col_stride;
          const float v = sdb[lr * Kt::kDbStride + lc];
          if (direct) store_bias(p.dbias, off, p.bias_dtype, v);
          else p.dbias_accum[off] += v;
        }
      }
    } else {
      for (int lc = tid; lc < kBlockN; lc += kNThreads) {
        float v = 0.f;
        for (int lr = 0; lr < kBlockM; ++lr) v += sdb[lr * Kt::kDbStride + lc];
        const int col = n0 + lc;
        if (col < p.kv_len) {
          const int64_t off = db_base + int64_t(col) * p.bias_col_stride;
          if (direct) store_bias(p.dbias, off, p.bias_dtype, v);
          else p.dbias_accum[off] += v;
        }
      }
    }
    __syncthreads();
  };

  for (int bi = 0; bi < p.batches_per_item; ++bi) {
    const int b = b_begin + bi;
    if (p.bounds.present()) {  // lo and hi are non-decreasing: two bisections (row_bounds.h)
      const int r_begin = static_cast<int>(p.bounds.first_row_above(b, n0, 0, p.q_len));
      const int r_end = static_cast<int>(p.bounds.first_row_from(b, n0 + kBlockN, r_begin, p.q_len));
      m_begin = r_begin / kBlockM;
      m_end = r_begin < r_end ? (r_end + kBlockM - 1) / kBlockM : m_begin;
      n_work = (m_end - m_begin) * g;
    }
    for (int ki = 0; ki < p.kv_heads_per_item; ++ki) {
      const int kvh = kvh_begin + ki;
      const Elem* k_ptr = static_cast<const Elem*>(p.k) + (int64_t(b) * p.kv_len + n0) * k_row_stride + kvh * kD;
      const Elem* v_ptr = static_cast<const Elem*>(p.v) + (int64_t(b) * p.kv_len + n0) * k_row_stride + kvh * kD;
      Tensor gK = make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kD>>{}, make_stride(k_row_stride, _1{}));
      Tensor gV = make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kD>>{}, make_stride(k_row_stride, _1{}));
      __syncthreads();  // every warp is done with the previous sK / sV
      copy_rows(gmem_copy, gthr.partition_S(gK), tKsK, tKc, p.kv_len - n0);
      copy_rows(gmem_copy, gthr.partition_S(gV), tKsV, tKc, p.kv_len - n0);
      int t = next_work(b, kvh, 0);
      int buf = 0;
      if (t >= 0) load_q_do(b, kvh, t, buf);
      cute::cp_async_fence();
      clear(acc_dk);
      clear(acc_dv);
      bool k_scanned = false, k_bad = false;  // this thread's K pieces, scanned once they landed

      while (t >= 0) {
        const int m = m_begin + t / g;
        const int m0 = m * kBlockM;
        const int h = kvh * g + t % g;
        const int cls = tile_class(p, b, h, m, n_block);
        // Prefetch the next visited tile's Q and dO into the other buffer (its readers finished at the barrier
        // that ended the previous iteration).
        const int t_next = next_work(b, kvh, t + 1);
        if (t_next >= 0) load_q_do(b, kvh, t_next, buf ^ 1);
        cute::cp_async_fence();

        if (has_dbias) {
          const int64_t base = b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride;
          const int tm0 = dbias_rows ? m0 : 0;
          const int64_t key = base + int64_t(tm0) * p.bias_row_stride;
          if (db_key >= 0 && key != db_key) flush_dbias();
          db_key = key, db_base = base, db_m0 = tm0;
        }

        float lse[kRows], delta[kRows];
        load_row_stats(p, cS, b, h, m0, lse, delta);
        cute::cp_async_wait<1>();  // everything but the prefetch: this tile's Q / dO (and K / V) landed
        Tensor sQb = make_tensor(make_smem_ptr(sq_ptr + buf * Kt::kQElems), typename Kt::SmemLayoutQ{});
        Tensor sdOb = make_tensor(make_smem_ptr(sdo_ptr + buf * Kt::kQElems), typename Kt::SmemLayoutQ{});
        if (!k_scanned) {
          k_bad = own_pieces_nonfinite<Elem>(tKsK);
          k_scanned = true;
        }
        // CTA-uniform: Q, dO or K of this tile holds an inf or NaN (see kept_product).
        const bool slow = __syncthreads_or(k_bad || own_pieces_nonfinite<Elem>(gthr.partition_D(sQb)) ||
                                           own_pieces_nonfinite<Elem>(gthr.partition_D(sdOb)));

        Tensor sQtb = make_tensor(make_smem_ptr(sq_ptr + buf * Kt::kQElems), typename Kt::SmemLayoutQt{});
        Tensor sdOtb = make_tensor(make_smem_ptr(sdo_ptr + buf * Kt::kQElems), typename Kt::SmemLayoutQt{});
        Tensor tSsQ = cpA_t.partition_S(sQb);
        Tensor tdPsdO = cpA_t.partition_S(sdOb);
        Tensor tdVsdOt = cpBT_t.partition_S(sdOtb);
        Tensor tdKsQt = cpBT_t.partition_S(sQtb);
        // S = Q K^T -> P.
        Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
        clear(acc_s);
        gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, cpA, cpA_t, cpB, cpB_t);
        Tensor capd = make_tensor_like(acc_s);
        uint32_t kept[kRows];
        scores_to_p(acc_s, capd, cS, p, b, h, m0, n0, cls, lse, kept);
        store_as<Elem>(acc_s, r2s, r2s_t, tPsP);
        uint8_t* keep_bytes = reinterpret_cast<uint8_t*>(sdb);  // free between dbias flushes
        if (slow) store_kept_bytes(keep_bytes, cS, kept);

        // dP = dO V^T -> dS = P (dP - delta); dbias takes dS, dQ / dK take it through the cap.
        Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
        clear(acc_dp);
        gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, mma, cpA, cpA_t, cpB, cpB_t);
        {
          Tensor ps = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
          Tensor dp = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
          Tensor cd = make_tensor(capd.data(), rowcol_layout(capd.layout()));
          Tensor db = make_tensor(dbacc.data(), rowcol_layout(dbacc.layout()));
          // dS = 0 at dropped pairs by select: their P = 0 meets dP - delta, NaN where v or the row is.
          CUTE_UNROLL
          for (int r = 0; r < size<0>(dp); ++r) {
            CUTE_UNROLL
            for (int c = 0; c < size<1>(dp); ++c) {
              const bool keep = (kept[r] >> c) & 1u;
              const float ds = keep ? ps(r, c) * (dp(r, c) - delta[r]) : 0.f;
              if (has_dbias) db(r, c) += ds;
              dp(r, c) = keep ? ds * cd(r, c) : 0.f;
            }
          }
          store_as<Elem>(acc_dp, r2s, r2s_t, tPsdS);
        }
        __syncthreads();  // sP, sdS (and the kept bytes) complete

        if (slow) {
          kept_product<KeptSum::kOverRows>(acc_dv, cKV, sP, sdOb, keep_bytes, kBlockM);  // dV += P^T dO
          kept_product<KeptSum::kOverRows>(acc_dk, cKV, sdS, sQb, keep_bytes, kBlockM);  // dK += dS^T Q
        } else {
          gemm_ss(acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, mma, cpAT, cpAT_t, cpBT, cpBT_t);  // dV += P^T dO
          gemm_ss(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, tdKsQt, mma, cpAT, cpAT_t, cpBT, cpBT_t);  // dK += dS^T Q
        }

        if (!p.deterministic) {  // dQ (this key tile's share) = dS K, added to the fp32 accumulator
          Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kD>>{});
          clear(acc_dq);
          if (slow) kept_product<KeptSum::kOverKeys>(acc_dq, cQD, sdS, sK, keep_bytes, 64);
          else gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma, cpA, cpA_t, cpBT, cpBT_t);
          Tensor dq = make_tensor(acc_dq.data(), rowcol_layout(acc_dq.layout()));
          CUTE_UNROLL
          for (int r = 0; r < size<0>(dq); ++r) {
            const int row = m0 + get<0>(cQD(r, 0));
            if (row < p.q_len) {
              float* dst = p.dq_accum + (int64_t(b) * p.q_len + row) * q_row_stride + int64_t(h) * kD;
              CUTE_UNROLL
              for (int c = 0; c < size<1>(dq); c += 2) {
                const int d = get<1>(cQD(0, c));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
                atomicAdd(reinterpret_cast<float2*>(dst + d), make_float2(dq(r, c) * p.scale, dq(r, c + 1) * p.scale));
#else
                atomicAdd(dst + d, dq(r, c) * p.scale);
                atomicAdd(dst + d + 1, dq(r, c + 1) * p.scale);
#endif
              }
            }
          }
        }
        __syncthreads();  // every warp is done with this buffer, sP and sdS
        buf ^= 1;
        t = t_next;
      }
      cute::cp_async_wait<0>();  // K / V of an item with no visited tile

      // dK (scaled) and dV of the whole GQA group of this kv head.
      Tensor dk = make_tensor(acc_dk.data(), rowcol_layout(acc_dk.layout()));
      Tensor dv = make_tensor(acc_dv.data(), rowcol_layout(acc_dv.layout()));
      CUTE_UNROLL
      for (int r = 0; r < size<0>(dk); ++r) {
        const int key = n0 + get<0>(cKV(r, 0));
        if (key < p.kv_len) {
          const int64_t off = (int64_t(b) * p.kv_len + key) * k_row_stride + int64_t(kvh) * kD;
          Elem* dk_dst = static_cast<Elem*>(p.dk) + off;
          Elem* dv_dst = static_cast<Elem*>(p.dv) + off;
          CUTE_UNROLL
          for (int c = 0; c < size<1>(dk); c += 2) {
            const int d = get<1>(cKV(0, c));
            store_pair(dk_dst + d, dk(r, c) * p.scale, dk(r, c + 1) * p.scale);
            store_pair(dv_dst + d, dv(r, c), dv(r, c + 1));
          }
        }
      }
    }
  }
  if (has_dbias && db_key >= 0) flush_dbias();
}

// ---------------------------------------------------------------------------------------------- dq kernel
// Deterministic dQ: one CTA per (query tile, query head, batch) walks its key tiles in a fixed order and
// accumulates dQ = sum_n dS_n K_n in registers.

template <class Kt>
__global__ void __launch_bounds__(Kt::kNThreads, 1) flash_bwd_dq_kernel(const __grid_constant__ BwdParams p) {
  using Elem = typename Kt::Elem;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kBlockN = Kt::kBlockN;
  constexpr int kD = Kt::kHeadDim;

  extern __shared__ __align__(128) char smem[];

  const int m_block = gridDim.x - 1 - blockIdx.x;  // heavy (late, causal) query tiles first
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int kvh = h / p.group;
  const int tid = threadIdx.x;
  const int m0 = m_block * kBlockM;
  const int causal_off = p.kv_len - p.q_len;
  const int n_tiles = (p.kv_len + kBlockN - 1) / kBlockN;
  int n_end = n_tiles;
  if (p.is_causal) {
    const int last_key = min(m0 + kBlockM, p.q_len) - 1 + causal_off;
    n_end = last_key < 0 ? 0 : min(n_tiles, last_key / kBlockN + 1);
  }
  const int64_t q_row_stride = int64_t(p.heads) * kD;
  const int64_t k_row_stride = int64_t(p.kv_heads) * kD;

  Elem* sq_ptr = reinterpret_cast<Elem*>(smem);
  Elem* sdo_ptr = sq_ptr + Kt::kQElems;
  Elem* sk_ptr = sdo_ptr + Kt::kQElems;  // sK[2]
  Elem* sv_ptr = sk_ptr + 2 * Kt::kKVElems;  // sV[2]
  Elem* sds_ptr = sv_ptr + 2 * Kt::kKVElems;
  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), typename Kt::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sdo_ptr), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(sk_ptr), typename Kt::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(sv_ptr), typename Kt::SmemLayoutKV{});
  Tensor sdS = make_tensor(make_smem_ptr(sds_ptr), typename Kt::SmemLayoutP{});
  Tensor sKt = make_tensor(make_smem_ptr(sk_ptr), typename Kt::SmemLayoutKt{});

  typename Kt::GmemTiledCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tQsQ = gthr.partition_D(sQ);
  Tensor tQsdO = gthr.partition_D(sdO);
  Tensor tQc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor tKc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kD>>{}));

  typename Kt::TiledMma mma;
  auto tmma = mma.get_thread_slice(tid);
  Tensor tSrQ = tmma.partition_fragment_A(sQ);
  Tensor tSrK = tmma.partition_fragment_B(sK);
  Tensor tdPrdO = tmma.partition_fragment_A(sdO);
  Tensor tdPrV = tmma.partition_fragment_B(sV);
  Tensor tdQrdS = tmma.partition_fragment_A(sdS);
  Tensor tdQrKt = tmma.partition_fragment_B(sKt);

  auto cpA = make_tiled_copy_A(typename Kt::S2RAtom{}, mma);
  auto cpA_t = cpA.get_thread_slice(tid);
  auto cpB = make_tiled_copy_B(typename Kt::S2RAtom{}, mma);
  auto cpB_t = cpB.get_thread_slice(tid);
  auto cpBT = make_tiled_copy_B(typename Kt::S2RAtomT{}, mma);
  auto cpBT_t = cpBT.get_thread_slice(tid);
  Tensor tSsQ = cpA_t.partition_S(sQ);
  Tensor tdPsdO = cpA_t.partition_S(sdO);
  Tensor tdQsdS = cpA_t.partition_S(sdS);

  auto r2s = make_tiled_copy_C(typename Kt::R2SAtom{}, mma);
  auto r2s_t = r2s.get_thread_slice(tid);
  Tensor tPsdS = r2s_t.partition_D(sdS);

  Tensor tScS = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS))::value;
  Tensor tQDc = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cQD = make_tensor(tQDc.data(), rowcol_layout(tQDc.layout()));

  const int64_t q_off = (int64_t(b) * p.q_len + m0) * q_row_stride + int64_t(h) * kD;
  Tensor gQ = make_tensor(make_gmem_ptr(static_cast<const Elem*>(p.q) + q_off), Shape<Int<kBlockM>, Int<kD>>{},
                          make_stride(q_row_stride, _1{}));
  Tensor gdO = make_tensor(make_gmem_ptr(static_cast<const Elem*>(p.dout) + q_off), Shape<Int<kBlockM>, Int<kD>>{},
                           make_stride(q_row_stride, _1{}));
  copy_rows(gmem_copy, gthr.partition_S(gQ), tQsQ, tQc, p.q_len - m0);
  copy_rows(gmem_copy, gthr.partition_S(gdO), tQsdO, tQc, p.q_len - m0);
  cute::cp_async_fence();
  float lse[kRows], delta[kRows];
  load_row_stats(p, cS, b, h, m0, lse, delta);
  uint8_t* keep_bytes = reinterpret_cast<uint8_t*>(sds_ptr + Kt::kPElems);

  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_dq);

  auto next_tile = [&](int n) -> int {  // first non-empty key tile >= n, or -1
    for (; n < n_end; ++n) {
      if (tile_class(p, b, h, m_block, n) != kTileEmpty) return n;
    }
    return -1;
  };
  // cp.async of key tile n's K and V into buffer buf.
  auto load_kv = [&](int n, int buf) {
    const int n0 = n * kBlockN;
    const Elem* k_ptr = static_cast<const Elem*>(p.k) + (int64_t(b) * p.kv_len + n0) * k_row_stride + kvh * kD;
    const Elem* v_ptr = static_cast<const Elem*>(p.v) + (int64_t(b) * p.kv_len + n0) * k_row_stride + kvh * kD;
    Tensor gK = make_tensor(make_gmem_ptr(k_ptr), Shape<Int<kBlockN>, Int<kD>>{}, make_stride(k_row_stride, _1{}));
    Tensor gV = make_tensor(make_gmem_ptr(v_ptr), Shape<Int<kBlockN>, Int<kD>>{}, make_stride(k_row_stride, _1{}));
    Tensor sKb = make_tensor(make_smem_ptr(sk_ptr + buf * Kt::kKVElems), typename Kt::SmemLayoutKV{});
    Tensor sVb = make_tensor(make_smem_ptr(sv_ptr + buf * Kt::kKVElems), typename Kt::SmemLayoutKV{});
    Tensor dK = gthr.partition_D(sKb);
    Tensor dV = gthr.partition_D(sVb);
    copy_rows(gmem_copy, gthr.partition_S(gK), dK, tKc, p.kv_len - n0);
    copy_rows(gmem_copy, gthr.partition_S(gV), dV, tKc, p.kv_len - n0);
  };

  int n_begin = 0;
  if (p.bounds.present()) {  // keys [lo(first row), hi(last row)) (row_bounds.h)
    n_begin = p.bounds.lo(b, m0) / kBlockN;
    n_end = min(n_end, (p.bounds.hi(b, min(m0 + kBlockM, p.q_len) - 1) + kBlockN - 1) / kBlockN);
  }
  int n = next_tile(n_begin);
  int buf = 0;
  if (n >= 0) load_kv(n, buf);
  cute::cp_async_fence();
  while (n >= 0) {
    const int cls = tile_class(p, b, h, m_block, n);
    const int n0 = n * kBlockN;
    const int n_next = next_tile(n + 1);
    if (n_next >= 0) load_kv(n_next, buf ^ 1);  // its buffer's readers finished at the last barrier
    cute::cp_async_fence();
    cute::cp_async_wait<1>();  // everything but the prefetch
    Tensor sKb = make_tensor(make_smem_ptr(sk_ptr + buf * Kt::kKVElems), typename Kt::SmemLayoutKV{});
    // CTA-uniform: K of this tile holds an inf or NaN (see kept_product).
    const bool slow = __syncthreads_or(own_pieces_nonfinite<Elem>(gthr.partition_D(sKb)));

    Tensor sVb = make_tensor(make_smem_ptr(sv_ptr + buf * Kt::kKVElems), typename Kt::SmemLayoutKV{});
    Tensor sKtb = make_tensor(make_smem_ptr(sk_ptr + buf * Kt::kKVElems), typename Kt::SmemLayoutKt{});
    Tensor tSsK = cpB_t.partition_S(sKb);
    Tensor tdPsV = cpB_t.partition_S(sVb);
    Tensor tdQsKt = cpBT_t.partition_S(sKtb);

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, cpA, cpA_t, cpB, cpB_t);
    Tensor capd = make_tensor_like(acc_s);
    uint32_t kept[kRows];
    scores_to_p(acc_s, capd, cS, p, b, h, m0, n0, cls, lse, kept);
    if (slow) store_kept_bytes(keep_bytes, cS, kept);

    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, mma, cpA, cpA_t, cpB, cpB_t);
    {
      Tensor ps = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
      Tensor dp = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
      Tensor cd = make_tensor(capd.data(), rowcol_layout(capd.layout()));
      CUTE_UNROLL
      for (int r = 0; r < size<0>(dp); ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(dp); ++c) {
          const bool keep = (kept[r] >> c) & 1u;  // as in the main kernel
          dp(r, c) = keep ? ps(r, c) * (dp(r, c) - delta[r]) * cd(r, c) : 0.f;
        }
      }
      store_as<Elem>(acc_dp, r2s, r2s_t, tPsdS);
    }
    __syncthreads();
    if (slow) kept_product<KeptSum::kOverKeys>(acc_dq, cQD, sdS, sKb, keep_bytes, 64);
    else gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma, cpA, cpA_t, cpBT, cpBT_t);
    __syncthreads();  // every warp is done with this K / V buffer and sdS
    buf ^= 1;
    n = n_next;
  }
  cute::cp_async_wait<0>();

  store_dq<Elem, kD>(p, make_tensor(acc_dq.data(), rowcol_layout(acc_dq.layout())), cQD, p.q_len, q_row_stride, b, h,
                     m0);
}

}  // namespace bwd
}  // namespace dmattn
