// Hopper (sm_90a) backward over the mask's live-key lists (csrc/cuda/key_lists.h): the sm80 key-list backward
// (csrc/cuda/flash_bwd_key_list_kernel.cuh) with its five products on wgmma. Same walk as the key-list forwards
// (csrc/cuda/key_list_walk.cuh), same P / dS arithmetic (bwd_key_list::chunk_scores_to_p), same atomics, so both
// backwards agree to rounding.
//
// A CTA of 256 threads (two warpgroups of 64 query rows each) serves one (batch, query head, 128-row query tile) and
// walks its unit's live keys 64 at a time; the grid runs query heads fastest, so the CTAs of one GQA group and query
// tile gather the same K / V rows while they are in L2. K and V rows are gathered by cp.async (one 16-byte piece per
// instruction, any row order) into 128-byte-swizzled K-major tiles, in a two-stage ring. Per chunk c:
//   [K(c), V(c) landed: cp.async wait, proxy fence, CTA barrier] -> gather chunk c + 1
//   -> S = Q K^T and dP = dO V^T issued together (wgmma, operands in shared memory)
//   -> P = exp(s - lse) with the masks (while dP runs), P to shared memory -> dS = P (dP - delta), dS to shared memory
//   -> dQ += dS K (wgmma, dS from registers, K's tile read MN-major: the same bytes, see SmemLayoutKt)
//   -> [proxy fence, CTA barrier] -> warpgroup 0: dV partial = P^T dO, warpgroup 1: dK partial = dS^T Q (wgmma,
//      [64 keys, D] over the 128 rows, every operand read MN-major from the tiles above), dbias column sums
//   -> partials added to the fp32 dK / dV workspaces by red.global.add.v2.f32 (the same keys come from other query
//      tiles and from the other heads of the GQA group), or, in deterministic mode (kFixed), to the int64 workspaces
//      as fixed-point counts (csrc/cuda/bwd_fixed_point.cuh); bwd_key_list::add_key_rows and add_key_rows_fixed,
//      shared with the sm80 kernel.
// dQ stays in registers and is written once.
//
// Non-finite inputs: the products multiply the exact zeros of dropped pairs by q, dout and k, so an inf or NaN there
// would reach gradients of pairs that drop it. The dispatch scans the three first (flash_bwd.h: nonfinite); when the
// word is set this kernel does nothing and the sm80 key-list kernel, which keeps such values out of dropped pairs,
// runs instead. An inf or NaN of v needs nothing: v enters dP only, and dS of a dropped pair is 0 by select.
//
// The proxy fences: wgmma reads shared memory through the async proxy, while cp.async and plain stores write it
// through the generic one; each thread fences its own writes once they landed, and the barrier publishes them.
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "collective/fmha_common.hpp"
#include "cuda/flash_bwd_key_list_kernel.cuh"
#include "cuda/key_list_walk.cuh"
#include "cuda/mask_words.cuh"
#include "cuda/sm90/flash_bwd_sm90.h"
#include "cuda/sm90/gmma_rowcol.cuh"
#include "cuda/smem_limit.cuh"

namespace dmattn::sm90 {

using namespace cute;

template <int kHeadDim, bool kIsBF16>
struct KeyListBwdTraits {
  using Elem = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kD = kHeadDim;
  static constexpr int kBlockM = kKeyListBlockM;  // 128 query rows: one key-list unit
  static constexpr int kChunk = kKeyListChunk;    // 64 keys: one bit word
  static constexpr int kStages = 2;
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kWarps = kThreads / 32;
  static_assert(kD % 64 == 0, "128-byte swizzled rows of D");

  using AtomLayout = Layout<Shape<_2, _1, _1>>;  // warpgroup w: query rows 64 w .. 64 w + 63
  // S = Q K^T and dP = dO V^T: [rows, keys] over D.
  using TiledMmaSdP =
      decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kChunk>, Int<kD>>>(),
                              AtomLayout{}));
  // dQ += dS K: [rows, D] over the chunk's keys, dS from registers.
  using TiledMmaDQ = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kD>, Int<kChunk>>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));
  // dV = P^T dO and dK = dS^T Q: [keys, D] over the CTA's rows, one warpgroup each.
  using TiledMmaKV = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<Int<kChunk>, Int<kD>, Int<kBlockM>>, GMMA::Major::MN,
                           GMMA::Major::MN>()));

  // Q and dO [rows, D], D contiguous: the K-major A operands of S and dP.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<Int<kBlockM>, Int<kD>>{}));
  // The same bytes as the (D, rows) MN-major B operands of dK and dV. GMMA's MN-major atom is 64 D x 8 rows; tiling
  // atoms along the rows first (Step<_2, _1>) puts every element at the address SmemLayoutQ gives it.
  using SmemLayoutQt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{}, Shape<Int<kD>, Int<kBlockM>>{},
                                              Step<_2, _1>{}));
  // K and V [keys, D] per ring stage: the K-major B operands of S and dP; K's tile is also dQ's (D, keys) MN-major B.
  using SmemLayoutKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{},
                                              Shape<Int<kChunk>, Int<kD>, Int<kStages>>{}));
  using SmemLayoutKt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{},
                                              Shape<Int<kD>, Int<kChunk>, Int<kStages>>{}, Step<_2, _1, _3>{}));
  // P and dS as (keys, rows), keys contiguous: the MN-major A operands of dV and dK.
  using SmemLayoutPt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{},
                                              Shape<Int<kChunk>, Int<kBlockM>>{}));

  static constexpr int kQElems = cosize_v<SmemLayoutQ>;
  static constexpr int kKVElems = cosize_v<SmemLayoutKV>;
  static constexpr int kPElems = cosize_v<SmemLayoutPt>;
  static_assert(cosize_v<SmemLayoutQt> == kQElems && cosize_v<SmemLayoutKt> == kKVElems, "views of the same tiles");
  // 1024-byte alignment: the hardware swizzles by address bits, the layouts by offset from the base.
  static constexpr int kAlign = 1024;
  static constexpr int kTableBytes = kStages * kChunk * (4 + 4);  // key index and per-key bias of each stage
  static constexpr int kColSumBytes = kWarps * kChunk * 4;        // dbias column sums of each warp's 16 rows
  static constexpr int kFixBytes = 4 * 4;                         // deterministic mode: 2^-e of dK, dV, dbias
  static constexpr int kSmemBytes = kAlign + (2 * kQElems + 2 * kKVElems + 2 * kPElems) * int(sizeof(Elem)) +
                                    kTableBytes + kColSumBytes + kFixBytes;
};

// Two fp32 values as one 32-bit pair of Elem, the lower address first.
template <class Elem>
__device__ __forceinline__ uint32_t pack_pair(float a, float b) {
  return uint32_t(Elem(a).raw()) | (uint32_t(Elem(b).raw()) << 16);
}

template <class Kt, bool kFixed>
__global__ void __launch_bounds__(Kt::kThreads, 1)
    flash_bwd_key_list_sm90_kernel(const __grid_constant__ BwdKeyListParams sp) {
  using Elem = typename Kt::Elem;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kChunk = Kt::kChunk;
  constexpr int kD = Kt::kD;
  constexpr int kThreads = Kt::kThreads;
  constexpr int kStages = Kt::kStages;
  constexpr int kPieces = kD / 8;  // 16-byte pieces of a row
  static_assert((kChunk * kPieces) % kThreads == 0 && (kBlockM * kPieces) % kThreads == 0, "copy split");
  constexpr int kRowsPerThread = kChunk * kPieces / kThreads;
  const BwdParams& p = sp.base;
  if (*p.nonfinite != 0u) return;  // q, dout or k holds an inf or NaN: the sm80 key-list kernel does the work

  extern __shared__ char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + Kt::kAlign - 1) &
                                       ~uintptr_t(Kt::kAlign - 1));

  const int h = sp.kv_head_begin * p.group + blockIdx.x;  // the query heads of this pass's kv heads
  const int m_block = gridDim.y - 1 - blockIdx.y;  // late (causally heavier) query tiles first
  const int b = blockIdx.z;
  const int hk = h / p.group;
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int row0 = m_block * kBlockM;
  const int q_len = p.q_len, kv_len = p.kv_len;
  const int64_t q_row_stride = int64_t(p.heads) * kD;
  const int64_t k_row_stride = int64_t(p.kv_heads) * kD;

  const KeyListWalk walk = key_list_walk<kBlockM, kChunk, kThreads>(sp, b, h, m_block);
  const bool dense = walk.dense;
  const int n_chunks = walk.n_chunks;
  const DenseMaskRows dense_mask = dense_mask_rows(p, b, h, dense);

  const Elem* q_ptr = static_cast<const Elem*>(p.q) + int64_t(b) * q_len * q_row_stride + int64_t(h) * kD;
  const Elem* do_ptr = static_cast<const Elem*>(p.dout) + int64_t(b) * q_len * q_row_stride + int64_t(h) * kD;
  const Elem* k_ptr = static_cast<const Elem*>(p.k) + int64_t(b) * kv_len * k_row_stride + int64_t(hk) * kD;
  const Elem* v_ptr = static_cast<const Elem*>(p.v) + int64_t(b) * kv_len * k_row_stride + int64_t(hk) * kD;

  Elem* smem_q = reinterpret_cast<Elem*>(smem);
  Elem* smem_do = smem_q + Kt::kQElems;
  Elem* smem_k = smem_do + Kt::kQElems;
  Elem* smem_v = smem_k + Kt::kKVElems;
  Elem* smem_p = smem_v + Kt::kKVElems;
  Elem* smem_ds = smem_p + Kt::kPElems;
  int32_t* smem_idx = reinterpret_cast<int32_t*>(smem_ds + Kt::kPElems);      // [kStages][kChunk]
  float* smem_kbias = reinterpret_cast<float*>(smem_idx + kStages * kChunk);  // [kStages][kChunk]
  float* smem_colsum = smem_kbias + kStages * kChunk;                         // [kWarps][kChunk]
  float* smem_fix = smem_colsum + Kt::kWarps * kChunk;                        // kFixed: count factors [3]
  // The GMMA layouts swizzle byte addresses: an element's address comes from the tensor (its swizzled pointer), never
  // from the layout alone.
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Kt::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Kt::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Kt::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Kt::SmemLayoutKt{});
  Tensor sPt = make_tensor(make_smem_ptr(smem_p), typename Kt::SmemLayoutPt{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Kt::SmemLayoutPt{});
  auto addr = [](auto& t, auto... coord) { return raw_pointer_cast(&t(coord...)); };

  typename Kt::TiledMmaSdP mma_sdp;
  typename Kt::TiledMmaDQ mma_dq;
  typename Kt::TiledMmaKV mma_kv;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  auto thr_kv = mma_kv.get_thread_slice(tid % 128);
  Tensor tSrQ = thr_sdp.make_fragment_A(thr_sdp.partition_A(sQ));
  Tensor tSrK = thr_sdp.make_fragment_B(thr_sdp.partition_B(sK));  // (MMA, N, K, stage)
  Tensor tdPrdO = thr_sdp.make_fragment_A(thr_sdp.partition_A(sdO));
  Tensor tdPrV = thr_sdp.make_fragment_B(thr_sdp.partition_B(sV));  // (MMA, N, K, stage)
  Tensor tdQrK = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));   // (MMA, N, K, stage)
  // Warpgroup 0: dV = P^T dO; warpgroup 1: dK = dS^T Q.
  Tensor sKVA = make_tensor(make_smem_ptr(wg == 0 ? smem_p : smem_ds), typename Kt::SmemLayoutPt{});
  Tensor sKVB = make_tensor(make_smem_ptr(wg == 0 ? smem_do : smem_q), typename Kt::SmemLayoutQt{});
  Tensor tKVrA = thr_kv.make_fragment_A(thr_kv.partition_A(sKVA));
  Tensor tKVrB = thr_kv.make_fragment_B(thr_kv.partition_B(sKVB));

  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_dq);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kChunk>>{}));
  Tensor cS = make_tensor(tScS.data(), gmma_rowcol_layout(tScS.layout()));
  Tensor tQcQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cQ = make_tensor(tQcQ.data(), gmma_rowcol_layout(tQcQ.layout()));
  Tensor tKVcKV = thr_kv.partition_C(make_identity_tensor(Shape<Int<kChunk>, Int<kD>>{}));
  Tensor cKV = make_tensor(tKVcKV.data(), gmma_rowcol_layout(tKVcKV.layout()));
  constexpr int kRows = decltype(size<0>(cS))::value;
  constexpr int kCols = decltype(size<1>(cS))::value;
  static_assert(kCols % 2 == 0, "columns come in pairs per thread");

  float lse[kRows], delta[kRows];
  bwd::load_row_stats(p, cS, b, h, row0, lse, delta);

  const bool has_bias = p.bias != nullptr;
  const bool has_dbias = has_bias && p.dbias_mode != kDbiasNone;
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;

  auto gather_row = [&](int i) { return (tid + i * kThreads) / kPieces; };
  auto gather_piece = [&](int i) { return (tid + i * kThreads) % kPieces; };
  // K and V rows of one chunk into ring stage `stage`; rows[i] < 0: past the walked keys, finite zeros (P is 0 there).
  auto gather = [&](int stage, const int (&rows)[kRowsPerThread]) {
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int j = gather_row(i), d0 = gather_piece(i) * 8;
      Elem* dk = addr(sK, j, d0, stage);
      Elem* dv = addr(sV, j, d0, stage);
      if (rows[i] >= 0) {
        copy_piece(k_ptr + int64_t(rows[i]) * k_row_stride + d0, dk);
        copy_piece(v_ptr + int64_t(rows[i]) * k_row_stride + d0, dv);
      } else {
        *reinterpret_cast<uint4*>(dk) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(dv) = make_uint4(0, 0, 0, 0);
      }
    }
  };
  auto load_key_bias = [&](int key) -> float {  // the key-list path's bias is constant along query rows
    if (!has_bias || key < 0) return 0.f;
    return load_bias(p.bias, bias_base + int64_t(key) * p.bias_col_stride, p.bias_dtype);
  };
  auto stage_tables = [&](int stage, int key, float key_bias) {
    stage_chunk_tables<kChunk>(smem_idx, smem_kbias, stage, tid, key, key_bias);
  };
  auto key_at = [&](int c, int j) { return walk.key_at(c, j, kChunk); };

  // Prologue: Q and dO (rows past Lq are zeros), chunk 0 and its tables, then the indices of chunk 1.
  CUTE_UNROLL
  for (int i = 0; i < kBlockM * kPieces / kThreads; ++i) {
    const int e = tid + i * kThreads, r = e / kPieces, d0 = (e % kPieces) * 8;
    Elem* dq = addr(sQ, r, d0);
    Elem* ddo = addr(sdO, r, d0);
    if (row0 + r < q_len) {
      copy_piece(q_ptr + int64_t(row0 + r) * q_row_stride + d0, dq);
      copy_piece(do_ptr + int64_t(row0 + r) * q_row_stride + d0, ddo);
    } else {
      *reinterpret_cast<uint4*>(dq) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(ddo) = make_uint4(0, 0, 0, 0);
    }
  }
  int next_rows[kRowsPerThread];
  int next_key = -1;
  float next_key_bias = 0.f;
  if (n_chunks > 0) {
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) next_rows[i] = key_at(0, gather_row(i));
    gather(0, next_rows);
    const int key0 = tid < kChunk ? key_at(0, tid) : -1;
    stage_tables(0, key0, load_key_bias(key0));
    if (n_chunks > 1) {
      CUTE_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) next_rows[i] = key_at(1, gather_row(i));
      if (tid < kChunk) next_key = key_at(1, tid);
      next_key_bias = load_key_bias(next_key);
    }
  }
  cute::cp_async_fence();
  if constexpr (kFixed) {
    if (tid == 0) fixed::store_count_factors(smem_fix, sp.fixed.stats, sp.fixed, kD, p.scale);
  }

  const int lane = tid % 32;
  const int warp = tid / 32;
  float* const kv_accum = wg == 0 ? sp.dv_accum : sp.dk_accum;
  const float kv_mul = wg == 0 ? 1.f : p.scale;

  for (int c = 0; c < n_chunks; ++c) {
    const int stage = c % kStages;
    const int next_stage = (c + 1) % kStages;
    cute::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    // Chunk c landed in every thread's pieces; every warpgroup finished chunk c - 1 (its stage, P, dS, column sums).
    __syncthreads();

    if (c + 1 < n_chunks) {
      gather(next_stage, next_rows);
      stage_tables(next_stage, next_key, next_key_bias);
      if (c + 2 < n_chunks) {  // consumed at the next iteration: a whole chunk hides their latency
        CUTE_UNROLL
        for (int i = 0; i < kRowsPerThread; ++i) next_rows[i] = key_at(c + 2, gather_row(i));
        if (tid < kChunk) next_key = key_at(c + 2, tid);
        next_key_bias = load_key_bias(next_key);
      }
    }
    cute::cp_async_fence();

    // Mask words of this chunk, loaded while the products run.
    uint64_t word[kRows];
    uint4 row_bytes[kRows];  // dense unit: this lane's 16 mask bytes of each row, packed after the products issue
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int rl = get<0>(cS(r, 0));
      if (dense) {
        row_bytes[r] = row_bytes_global(
            row0 + rl < q_len ? dense_mask.rows + int64_t(row0 + rl) * p.mask_row_stride : nullptr, c * kChunk,
            kv_len, dense_mask.vec);
      } else {
        word[r] = row0 + rl < q_len ? walk.word(c, rl) : 0ull;
      }
    }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kChunk>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kChunk>>{});
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);
    warpgroup_arrive();
    cutlass::fmha::collective::gemm_zero_acc(mma_sdp, tSrQ, tSrK(_, _, _, stage), acc_s);
    warpgroup_commit_batch();
    cutlass::fmha::collective::gemm_zero_acc(mma_sdp, tdPrdO, tdPrV(_, _, _, stage), acc_dp);
    warpgroup_commit_batch();
    if (dense) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const uint64_t w = quad_word(pack16(row_bytes[r]));  // every lane takes part (shuffles)
        word[r] = row0 + get<0>(cS(r, 0)) < q_len ? w : 0ull;
      }
    }
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc_s);

    // P in place (fp32), then to shared memory as (keys, rows).
    const int32_t* idx = smem_idx + stage * kChunk;
    Tensor s = make_tensor(acc_s.data(), gmma_rowcol_layout(acc_s.layout()));
    bwd_key_list::NoSoftcap no_cap;
    uint32_t kept[kRows];
    bwd_key_list::chunk_scores_to_p(s, no_cap, cS, p, row0, idx, smem_kbias + stage * kChunk, word, lse, kept);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int rl = get<0>(cS(r, 0));
      CUTE_UNROLL
      for (int cc = 0; cc < kCols; cc += 2) {
        *reinterpret_cast<uint32_t*>(addr(sPt, get<1>(cS(0, cc)), rl)) = pack_pair<Elem>(s(r, cc), s(r, cc + 1));
      }
    }

    // dS = P (dP - delta) (0 at dropped pairs by select: 0 * NaN otherwise).
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dp);
    Tensor dp = make_tensor(acc_dp.data(), gmma_rowcol_layout(acc_dp.layout()));
    CUTE_UNROLL
    for (int cc = 0; cc < kCols; ++cc) {
      float colsum = 0.f;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const bool keep = (kept[r] >> cc) & 1u;
        const float ds = keep ? s(r, cc) * (dp(r, cc) - delta[r]) : 0.f;
        colsum += ds;
        dp(r, cc) = ds;
      }
      if (has_dbias) {  // column sum over the warp's 16 rows: lanes that differ in lane / 4 hold other rows
        colsum += __shfl_xor_sync(0xffffffffu, colsum, 4);
        colsum += __shfl_xor_sync(0xffffffffu, colsum, 8);
        colsum += __shfl_xor_sync(0xffffffffu, colsum, 16);
        if (lane < 4) smem_colsum[warp * kChunk + get<1>(cS(0, cc))] = colsum;
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int rl = get<0>(cS(r, 0));
      CUTE_UNROLL
      for (int cc = 0; cc < kCols; cc += 2) {
        *reinterpret_cast<uint32_t*>(addr(sdSt, get<1>(cS(0, cc)), rl)) = pack_pair<Elem>(dp(r, cc), dp(r, cc + 1));
      }
    }

    // dQ += dS K, running while the CTA meets and the key partials start.
    Tensor dsa = cutlass::fmha::collective::make_acc_into_op<Elem>(acc_dp, typename Kt::TiledMmaDQ::LayoutA_TV{});
    warpgroup_fence_operand(acc_dq);
    warpgroup_fence_operand(dsa);
    warpgroup_arrive();
    cute::gemm(mma_dq, dsa, tdQrK(_, _, _, stage), acc_dq);
    warpgroup_commit_batch();

    cutlass::arch::fence_view_async_shared();
    __syncthreads();  // P, dS and the column sums of every warp are in shared memory

    Tensor acc_kv = partition_fragment_C(mma_kv, Shape<Int<kChunk>, Int<kD>>{});
    warpgroup_fence_operand(acc_kv);
    warpgroup_arrive();
    cutlass::fmha::collective::gemm_zero_acc(mma_kv, tKVrA, tKVrB, acc_kv);
    warpgroup_commit_batch();

    // dbias[key] += column sums of dS over the tile's rows.
    if (has_dbias && tid < kChunk && idx[tid] >= 0) {
      float v = 0.f;
      CUTE_UNROLL
      for (int w = 0; w < Kt::kWarps; ++w) v += smem_colsum[w * kChunk + tid];
      const int64_t off = bias_base + int64_t(idx[tid]) * p.bias_col_stride;
      if constexpr (kFixed) bwd_key_list::add_dbias_fixed(sp, off, v, smem_fix[2]);
      else atomicAdd(p.dbias_accum + off, v);
    }

    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_dq);
    warpgroup_fence_operand(acc_kv);
    // The warpgroup's partial into its [B, Lk, accum_kv_heads, D] accumulator: int64 counts or fp32 sums.
    Tensor kv = make_tensor(acc_kv.data(), gmma_rowcol_layout(acc_kv.layout()));
    if constexpr (kFixed) {
      bwd_key_list::add_key_rows_fixed<kD>(sp, kv, cKV, wg == 0 ? sp.fixed.dv : sp.fixed.dk, idx, b, hk, kv_mul,
                                           smem_fix[wg == 0 ? 1 : 0]);
    } else {
      bwd_key_list::add_key_rows<kD>(sp, kv, cKV, kv_accum, idx, b, hk, kv_mul);
    }
  }
  cute::cp_async_wait<0>();  // Q / dO of a tile with no chunk

  bwd::store_dq<Elem, kD>(p, make_tensor(acc_dq.data(), gmma_rowcol_layout(acc_dq.layout())), cQ, q_len,
                          q_row_stride, b, h, row0);
}

// One mode's kernel (each instantiation raises its own shared-memory limit once).
template <class Kt, bool kFixed>
cudaError_t launch_key_list_bwd_mode(const BwdKeyListParams& sp, dim3 grid, cudaStream_t stream) {
  static std::atomic<uint64_t> configured{0};
  auto kernel = flash_bwd_key_list_sm90_kernel<Kt, kFixed>;
  if (cudaError_t err = raise_smem_limit_once(kernel, Kt::kSmemBytes, configured); err != cudaSuccess) return err;
  kernel<<<grid, Kt::kThreads, Kt::kSmemBytes, stream>>>(sp);
  return cudaGetLastError();
}

template <int kHeadDim, bool kIsBF16>
cudaError_t launch_key_list_bwd(const BwdKeyListParams& sp, cudaStream_t stream) {
  using Kt = KeyListBwdTraits<kHeadDim, kIsBF16>;
  const BwdParams& p = sp.base;
  const int m_blocks = (p.q_len + Kt::kBlockM - 1) / Kt::kBlockM;
  if (m_blocks == 0 || p.heads == 0 || p.batch == 0) return cudaSuccess;
  const dim3 grid(sp.accum_kv_heads * p.group, m_blocks, p.batch);
  return sp.fixed.dk != nullptr ? launch_key_list_bwd_mode<Kt, true>(sp, grid, stream)
                                : launch_key_list_bwd_mode<Kt, false>(sp, grid, stream);
}

}  // namespace dmattn::sm90

namespace dmattn {

template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_key_list_sm90(const BwdKeyListParams& sp, cudaStream_t stream) {
  return sm90::launch_key_list_bwd<kHeadDim, kIsBF16>(sp, stream);
}

}  // namespace dmattn

#define DMATTN_INSTANTIATE_BWD_KEY_LIST_SM90(D)                                                                     \
  template cudaError_t dmattn::run_flash_bwd_key_list_sm90<D, true>(const dmattn::BwdKeyListParams&, cudaStream_t); \
  template cudaError_t dmattn::run_flash_bwd_key_list_sm90<D, false>(const dmattn::BwdKeyListParams&, cudaStream_t);
