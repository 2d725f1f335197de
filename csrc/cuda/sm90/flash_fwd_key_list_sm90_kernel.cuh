// Hopper (sm_90a) forward over the mask's live-key lists (csrc/cuda/key_lists.h): the sm80 key-list forward
// (csrc/cuda/flash_fwd_key_list_kernel.cuh) with its two products on wgmma. Same walk (csrc/cuda/key_list_walk.cuh),
// same logits, masks, online softmax, non-finite rules and epilogue arithmetic, so both kernels agree to rounding.
//
// Why not TMA: the keys of a list are scattered rows, and a gather is what cp.async does per 16-byte piece. The
// pieces go straight into the swizzled shared-memory layouts wgmma reads (K K-major, V MN-major, so V needs no
// transpose), and every thread of the CTA gathers, as in the sm80 kernel.
//
// A CTA of 256 threads (two warpgroups of 64 query rows each) serves one (batch, query head, 128-row query tile);
// the grid runs query heads fastest, so the CTAs of one GQA group and query tile share the gathered K/V rows in L2.
// K and V chunks of 64 keys live in a ring of kStages stages: chunks c + 1 .. c + kStages - 1 are in flight while
// chunk c is computed. A chunk's products are short next to a gather's latency from HBM (scattered rows), so with two
// stages each chunk waited for nearly a full gather (a decoding step's walk of 8 chunks ran at ~5 us per chunk on an
// H200); the deeper ring keeps several gathers in flight. Per chunk c:
//   [K(c), V(c) landed: cp.async wait, proxy fence, CTA barrier] -> gather chunk c + kStages - 1, stage its key /
//   bias table -> S = Q K^T (wgmma, Q and K from shared memory) -> logits, masks -> online softmax -> O += P V
//   (wgmma, P from registers).
// The list entries, per-key bias and mask words a chunk needs are loaded one chunk before they are used.
// The proxy fence: wgmma reads shared memory through the async proxy, while cp.async and plain stores write it
// through the generic one; each thread fences its own writes once they landed, and the barrier publishes them.
#pragma once

#include <atomic>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "collective/fmha_common.hpp"
#include "cuda/bias_element.cuh"
#include "cuda/flash_fwd.h"
#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/flash_fwd_key_list_kernel.cuh"
#include "cuda/key_list_walk.cuh"
#include "cuda/mask_words.cuh"
#include "cuda/sm90/flash_fwd_sm90.h"
#include "cuda/sm90/gmma_rowcol.cuh"
#include "cuda/smem_limit.cuh"
#include "cuda/smem_tiles.cuh"

namespace dmattn::sm90 {

using namespace cute;

template <int kHeadDim, bool kIsBF16>
struct KeyListFwdTraits {
  using Elem = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kD = kHeadDim;
  static constexpr int kBlockM = kKeyListBlockM;  // 128 query rows: one key-list unit
  static constexpr int kChunk = kKeyListChunk;    // 64 keys: one bit word
  // As deep as shared memory allows next to Q: 4 stages (128 KiB of K/V) up to D = 128, 3 at 192, 2 at 256.
  static constexpr int kStages = kHeadDim <= 128 ? 4 : (kHeadDim <= 192 ? 3 : 2);
  static constexpr int kThreads = 256;  // two warpgroups, 64 rows each
  static_assert(kD % 64 == 0, "128-byte swizzled rows of D");

  using AtomLayout = Layout<Shape<_2, _1, _1>>;
  using TiledMmaQK =
      decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kChunk>, Int<kD>>>(),
                              AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kD>, Int<kChunk>>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{},
                                             Shape<Int<kBlockM>, Int<kD>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{},
                                             Shape<Int<kChunk>, Int<kD>, Int<kStages>>{}));
  // V as the (D, keys) B operand of P V, D contiguous: the rows are gathered as they are stored.
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Elem>{},
                                              Shape<Int<kD>, Int<kChunk>, Int<kStages>>{}));

  // The gather: 16-byte pieces, kPieces a row; a thread's pieces of a chunk lie kGatherRowStep rows apart in one
  // column. Their byte offsets from the thread's first piece at stage 0, without the 128-byte swizzle (address bits
  // 4-9): the steps are whole 1024-byte swizzle atoms, which leave those bits as they are.
  static constexpr int kPieces = kD / 8;
  static constexpr int kGatherRowStep = kThreads / kPieces;
  static_assert(kThreads % kPieces == 0, "a thread's pieces share one column");
  static constexpr uint32_t kKPieceStep = SmemLayoutK{}.layout_b()(kGatherRowStep, 0, 0) * sizeof(Elem);
  static constexpr uint32_t kKStageBytes = SmemLayoutK{}.layout_b()(0, 0, 1) * sizeof(Elem);
  static constexpr uint32_t kVPieceStep = SmemLayoutVt{}.layout_b()(0, kGatherRowStep, 0) * sizeof(Elem);
  static constexpr uint32_t kVStageBytes = SmemLayoutVt{}.layout_b()(0, 0, 1) * sizeof(Elem);
  static_assert((kKPieceStep | kKStageBytes | kVPieceStep | kVStageBytes) % 1024 == 0, "whole swizzle atoms");

  static constexpr int kQElems = cosize_v<SmemLayoutQ>;
  static constexpr int kKElems = cosize_v<SmemLayoutK>;
  static constexpr int kVElems = cosize_v<SmemLayoutVt>;
  // 1024-byte alignment: the hardware swizzles by address bits, the layouts by offset from the base.
  static constexpr int kAlign = 1024;
  static constexpr int kTableBytes = kStages * kChunk * (4 + 4);  // key index and per-key bias of each stage
  static constexpr int kSmemBytes = kAlign + (kQElems + kKElems + kVElems) * int(sizeof(Elem)) + kTableBytes;
};

template <class Kt>
__global__ void __launch_bounds__(Kt::kThreads, 1) flash_fwd_key_list_sm90_kernel(const __grid_constant__ FwdParams p) {
  using Elem = typename Kt::Elem;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kChunk = Kt::kChunk;
  constexpr int kD = Kt::kD;
  constexpr int kThreads = Kt::kThreads;
  constexpr int kStages = Kt::kStages;
  // Gathered K/V copy: 16-byte pieces, kPieces per row; piece i of a thread is (tid + i * kThreads).
  constexpr int kPieces = Kt::kPieces;
  static_assert((kChunk * kPieces) % kThreads == 0 && (kBlockM * kPieces) % kThreads == 0, "copy split");
  constexpr int kRowsPerThread = kChunk * kPieces / kThreads;

  extern __shared__ char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + Kt::kAlign - 1) &
                                       ~uintptr_t(Kt::kAlign - 1));

  const int h = blockIdx.x;
  const int m_block = gridDim.y - 1 - blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  const int row0 = m_block * kBlockM;
  const int q_len = p.q_len, kv_len = p.kv_len;

  const KeyListWalk walk = key_list_walk<kBlockM, kChunk, kThreads>(p, b, h, m_block);
  const bool dense = walk.dense;
  // The Hopper forward computes this unit (the whole CTA leaves).
  if (p.tile_units_apart && key_list_unit_on_tiles(walk.count, walk.last_key + 1)) return;
  const int n_chunks = walk.n_chunks;
  const DenseMaskRows dense_mask = dense_mask_rows(p, b, h, dense);

  const HeadOperands<Elem> head = head_operands<Elem>(p, b, h);

  Elem* smem_q = reinterpret_cast<Elem*>(smem);
  Elem* smem_k = smem_q + Kt::kQElems;
  Elem* smem_v = smem_k + Kt::kKElems;
  int32_t* smem_idx = reinterpret_cast<int32_t*>(smem_v + Kt::kVElems);  // [kStages][kChunk]
  float* smem_kbias = reinterpret_cast<float*>(smem_idx + kStages * kChunk);  // [kStages][kChunk]
  // The GMMA layouts swizzle byte addresses: an element's address comes from the tensor (its swizzled pointer), never
  // from the layout alone.
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Kt::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Kt::SmemLayoutVt{});
  auto addr = [](auto& t, auto... coord) { return raw_pointer_cast(&t(coord...)); };

  typename Kt::TiledMmaQK mma_qk;
  typename Kt::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(tid);
  auto thr_pv = mma_pv.get_thread_slice(tid);
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));     // (MMA, N, K, stage)
  Tensor tOrV = thr_pv.make_fragment_B(thr_pv.partition_B(sVt));    // (MMA, N, K, stage)
  Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);
  Tensor o = make_tensor(acc_o.data(), gmma_rowcol_layout(acc_o.layout()));
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kChunk>>{}));
  Tensor cS = make_tensor(tScS.data(), gmma_rowcol_layout(tScS.layout()));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cO = make_tensor(tOcO.data(), gmma_rowcol_layout(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(cS))::value;
  uint64_t next_bits[kRows];  // the mask words of the next chunk (list units)
  // Whether any row of this warp is a query row. A decoding step fills few of the tile's 128 rows (its G packed
  // query heads): the warps holding only rows past Lq skip the per-element work (logits, softmax), whose results
  // only reach rows that are never stored, and take part in the gathers, barriers and products alone.
  bool own_live = false;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) own_live |= row0 + get<0>(cS(r, 0)) < q_len;
  const bool warp_live = __any_sync(0xffffffffu, own_live);

  float row_max[kRows], row_sum[kRows];
  fwd::start_softmax_rows(row_max, row_sum);

  const bool has_bias = p.bias != nullptr;
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;
  const bool bias_per_key = has_bias && p.bias_row_stride == 0;

  auto gather_row = [&](int i) { return (tid + i * kThreads) / kPieces; };
  auto gather_piece = [&](int i) { return (tid + i * kThreads) % kPieces; };
  // The thread's pieces: column d0 of rows gather_row(i) = gather_row(0) + i * kGatherRowStep, at the shared-memory
  // byte addresses k_piece0 / v_piece0 + stage * k/vStageBytes + i * k/vPieceStep (Kt: whole swizzle atoms).
  const int d0 = gather_piece(0) * 8;
  const uint32_t k_piece0 = static_cast<uint32_t>(__cvta_generic_to_shared(addr(sK, gather_row(0), d0, 0)));
  const uint32_t v_piece0 = static_cast<uint32_t>(__cvta_generic_to_shared(addr(sVt, d0, gather_row(0), 0)));
  const Elem* k_src = head.k + d0;
  const Elem* v_src = head.v + d0;
  // K and V rows of one chunk into ring stage `stage`; rows[i] < 0: past the walked keys, finite zeros (P is 0 there).
  auto gather = [&](int stage, const int (&rows)[kRowsPerThread]) {
    const uint32_t dk = k_piece0 + stage * Kt::kKStageBytes, dv = v_piece0 + stage * Kt::kVStageBytes;
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) {
      const bool valid = rows[i] >= 0;
      const int64_t row = valid ? rows[i] : 0;
      copy_piece_or_zero(dk + i * Kt::kKPieceStep, k_src + row * p.k_row_stride, valid);
      copy_piece_or_zero(dv + i * Kt::kVPieceStep, v_src + row * p.v_row_stride, valid);
    }
  };
  auto v_piece = [&](int stage, int i) { return addr(sVt, gather_piece(i) * 8, gather_row(i), stage); };
  auto own_v_nonfinite = [&](int stage) {
    const uint32_t dv = v_piece0 + stage * Kt::kVStageBytes;
    uint32_t bits = 0;
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) bits |= shared_piece_nonfinite_bits<Elem>(dv + i * Kt::kVPieceStep);
    return (bits & kNonfiniteBits) != 0;
  };
  // A per-key bias's bits, converted where a stage's table is written (bias_of_bits), so that no warp waits for the
  // load before then.
  auto load_key_bias_bits = [&](int key) -> uint32_t {
    return load_bias_bits(p.bias, bias_base + int64_t(key) * p.bias_col_stride, p.bias_dtype,
                          bias_per_key && key >= 0);
  };
  __shared__ uint64_t key_keep[kStages];  // per-key bias tables' keep words (stage_chunk_keep_word)
  auto stage_tables = [&](int stage, int key, float key_bias) {
    stage_chunk_tables<kChunk>(smem_idx, smem_kbias, stage, tid, key, key_bias);
    if (bias_per_key) stage_chunk_keep_word<kChunk>(key_keep, stage, tid, key_bias);
  };
  // Chunk columns whose V holds an inf or NaN, per ring stage (see the sm80 tile kernel).
  __shared__ unsigned long long bad_v_keys[kStages];
  if (tid < kStages) bad_v_keys[tid] = 0ull;


  // Prologue: Q (rows past Lq are zeros), chunks 0 .. kStages - 2 and their tables (one cp.async group each, empty
  // past the walk, so that group counts stay uniform), then the indices of chunk kStages - 1.
  CUTE_UNROLL
  for (int i = 0; i < kBlockM * kPieces / kThreads; ++i) {
    const int e = tid + i * kThreads, r = e / kPieces, d0 = (e % kPieces) * 8;
    Elem* dq = addr(sQ, r, d0);
    if (row0 + r < q_len) {
      copy_piece(head.q + int64_t(row0 + r) * p.q_row_stride + d0, dq);
    } else {
      *reinterpret_cast<uint4*>(dq) = make_uint4(0, 0, 0, 0);
    }
  }
  auto key_at = [&](int c, int j) { return walk.key_at(c, j, kChunk); };
  // The gathers' indices run two chunks ahead of their gather: `next_*` are those of the chunk gathered at this
  // iteration (its per-key bias loaded one iteration ago), `later_*` those of the chunk after it (loaded one
  // iteration ago; its bias is loaded at this one). So no global load of the walk waits at the gather that uses it:
  // the list entry and the bias that depends on it each get a whole chunk's time.
  int next_rows[kRowsPerThread], later_rows[kRowsPerThread];
  int next_key = -1, later_key = -1;
  uint32_t next_key_bias = 0;  // bits
  auto load_indices = [&](int c, int (&rows)[kRowsPerThread], int& key) {
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) rows[i] = key_at(c, gather_row(i));
    key = tid < kChunk ? key_at(c, tid) : -1;
  };
  // Moves the later chunk's indices up to next (loading its bias) and loads those of chunk c as the later ones.
  auto advance_indices = [&](int c) {
    CUTE_UNROLL
    for (int i = 0; i < kRowsPerThread; ++i) next_rows[i] = later_rows[i];
    next_key = later_key;
    next_key_bias = load_key_bias_bits(next_key);
    load_indices(c, later_rows, later_key);
  };
  {
    // All of the prologue's indices first, then its gathers: one index latency, not one per chunk.
    int rows[kStages - 1][kRowsPerThread], key[kStages - 1];
    uint32_t key_bias[kStages - 1];  // bits
    CUTE_UNROLL
    for (int c = 0; c < kStages - 1; ++c) {
      CUTE_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) rows[c][i] = key_at(c, gather_row(i));
      key[c] = tid < kChunk ? key_at(c, tid) : -1;
    }
    CUTE_UNROLL
    for (int c = 0; c < kStages - 1; ++c) key_bias[c] = load_key_bias_bits(key[c]);
    CUTE_UNROLL
    for (int c = 0; c < kStages - 1; ++c) {
      if (c < n_chunks) {
        gather(c, rows[c]);
        stage_tables(c, key[c], bias_of_bits(key_bias[c], p.bias_dtype));
      }
      cute::cp_async_fence();
    }
  }
  // key_at gives -1 past the walk, so chunks past it load nothing and gather nothing.
  load_indices(kStages - 1, next_rows, next_key);
  next_key_bias = load_key_bias_bits(next_key);
  load_indices(kStages, later_rows, later_key);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) next_bits[r] = 0;
  if (!dense && n_chunks > 0) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) next_bits[r] = walk.word(0, get<0>(cS(r, 0)));
  }

  for (int c = 0; c < n_chunks; ++c) {
    const int stage = c % kStages;
    const int fill_stage = (c + kStages - 1) % kStages;  // chunk c + kStages - 1's: chunk c - 1 read it last
    cute::cp_async_wait<kStages - 2>();  // chunk c's group; the kStages - 2 after it may still fly
    const bool own_bad = own_v_nonfinite(stage);
    cutlass::arch::fence_view_async_shared();
    // Chunk c landed in every thread's pieces; every warpgroup finished chunk c - 1, whose stage is refilled now.
    const bool v_bad = __syncthreads_or(own_bad);
    if (tid == 0) bad_v_keys[fill_stage] = 0ull;

    if (c + kStages - 1 < n_chunks) {
      gather(fill_stage, next_rows);
      stage_tables(fill_stage, next_key, bias_of_bits(next_key_bias, p.bias_dtype));
      advance_indices(c + kStages + 1);
    }
    cute::cp_async_fence();

    // Mask words of this chunk (loaded at the previous iteration), and those of the next.
    uint64_t row_bits[kRows];
    uint4 row_bytes[kRows];  // dense unit: this lane's 16 mask bytes of each row, packed after the product
    if (dense) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int row = row0 + get<0>(cS(r, 0));
        row_bytes[r] = row_bytes_global(row < q_len ? dense_mask.rows + int64_t(row) * p.mask_row_stride : nullptr,
                                        c * kChunk, kv_len, dense_mask.vec);
      }
    } else {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        row_bits[r] = next_bits[r];
        if (c + 1 < n_chunks) next_bits[r] = walk.word(c + 1, get<0>(cS(r, 0)));
      }
    }

    Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kChunk>>{});
    warpgroup_fence_operand(acc_s);
    warpgroup_arrive();
    cutlass::fmha::collective::gemm_zero_acc(mma_qk, tSrQ, tSrK(_, _, _, stage), acc_s);
    warpgroup_commit_batch();
    if (dense) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) row_bits[r] = quad_word(pack16(row_bytes[r]));
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);

    const int32_t* idx = smem_idx + stage * kChunk;
    Tensor s = make_tensor(acc_s.data(), gmma_rowcol_layout(acc_s.layout()));
    if (warp_live)
      fwd::key_list_logits(acc_s, s, cS, p, idx, bias_per_key ? smem_kbias + stage * kChunk : nullptr,
                           bias_per_key ? key_keep[stage] : ~uint64_t{0}, bias_base, row_bits, row0);

    if (v_bad) {  // rare (CTA-uniform): V of this chunk holds an inf or NaN; see correct_nonfinite_v_rows
      uint64_t kept[kRows];
      if (warp_live) fwd::kept_words_rows(s, cS, kept);
      CUTE_UNROLL
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (zero_nonfinite_piece<Elem>(v_piece(stage, i))) atomicOr(&bad_v_keys[stage], 1ull << gather_row(i));
      }
      cutlass::arch::fence_view_async_shared();
      __syncthreads();  // V cleaned, the bad columns known
      if (warp_live) {
        fwd::online_softmax_rows(s, o, row_max, row_sum);
        fwd::correct_nonfinite_v_rows<Elem>(o, cO, kept, bad_v_keys[stage],
                                       [&](int j) { return head.v + int64_t(idx[j]) * p.v_row_stride; });
      }
    } else if (warp_live) {
      fwd::online_softmax_rows(s, o, row_max, row_sum);
    }

    Tensor pa = cutlass::fmha::collective::make_acc_into_op<Elem>(acc_s, typename Kt::TiledMmaPV::LayoutA_TV{});
    warpgroup_fence_operand(acc_o);
    warpgroup_fence_operand(pa);
    warpgroup_arrive();
    cute::gemm(mma_pv, pa, tOrV(_, _, _, stage), acc_o);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_o);
  }
  cute::cp_async_wait<0>();

  // Epilogue: normalise, lse, then O through shared memory (the Q tile) into 16-byte row-predicated stores.
  float* lse_ptr = p.lse + (int64_t(b) * p.heads + h) * p.q_len;
  fwd::normalize_rows(o, row_max, row_sum, cS, lse_ptr, row0, q_len);
  __syncthreads();  // every warpgroup is done reading sQ (and the Q copies landed)
  CUTE_UNROLL
  for (int i = 0; i < size(o); ++i) {
    const auto rc = cO(i);
    sQ(get<0>(rc), get<1>(rc)) = static_cast<Elem>(o(i));
  }
  __syncthreads();
  CUTE_UNROLL
  for (int i = 0; i < kBlockM * kPieces / kThreads; ++i) {
    const int e = tid + i * kThreads, r = e / kPieces, d0 = (e % kPieces) * 8;
    if (row0 + r < q_len) {
      *reinterpret_cast<uint4*>(head.out + int64_t(row0 + r) * p.o_row_stride + d0) =
          *reinterpret_cast<const uint4*>(addr(sQ, r, d0));
    }
  }
}

template <int kHeadDim, bool kIsBF16>
cudaError_t launch_key_list(const FwdParams& p, cudaStream_t stream) {
  using Kt = KeyListFwdTraits<kHeadDim, kIsBF16>;
  const int m_blocks = (p.q_len + Kt::kBlockM - 1) / Kt::kBlockM;
  if (m_blocks == 0 || p.heads == 0 || p.batch == 0) return cudaSuccess;
  static std::atomic<uint64_t> configured{0};
  auto kernel = flash_fwd_key_list_sm90_kernel<Kt>;
  if (cudaError_t err = raise_smem_limit_once(kernel, Kt::kSmemBytes, configured); err != cudaSuccess) return err;
  kernel<<<dim3(p.heads, m_blocks, p.batch), Kt::kThreads, Kt::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dmattn::sm90

namespace dmattn {

template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_fwd_key_list_sm90(const FwdParams& p, cudaStream_t stream) {
  return sm90::launch_key_list<kHeadDim, kIsBF16>(p, stream);
}

}  // namespace dmattn

#define DMATTN_INSTANTIATE_FWD_KEY_LIST_SM90(D)                                                                  \
  template cudaError_t dmattn::run_flash_fwd_key_list_sm90<D, true>(const dmattn::FwdParams&, cudaStream_t);  \
  template cudaError_t dmattn::run_flash_fwd_key_list_sm90<D, false>(const dmattn::FwdParams&, cudaStream_t);
