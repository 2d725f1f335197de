// Key-list flash-attention backward for sm80+: query-tile parallel, walking the live keys of the
// mask's key-list units (csrc/cuda/key_lists.h) 64 at a time with gathered K / V rows.
//
// Why: a top-k mask keeps ~k scattered keys per query row, so nearly every 64 x 64 tile is partial and the
// key-tile-parallel kernel (flash_bwd_kernel.cuh) visits every causal tile. The union of the kept keys of a
// 128-row query tile is only ~k keys, so listing them and gathering their K / V rows makes the work
// proportional to the live keys instead of to Lk.
//
// One CTA per (query tile, query head, batch). Per chunk of 64 listed keys: K / V rows gathered by cp.async
// (double-buffered: the next chunk is in flight while this one computes), S = Q K^T, P = exp(s - lse) with the
// mask from the unit's bit words and causality / sequence ends checked on the real key index, dP = dO V^T,
// dS = P (dP - delta); dQ += dS K stays in registers (written once, no atomics); dV[key] += P^T dO and
// dK[key] += dS^T Q go to workspaces by atomics (several query tiles and the whole GQA group share a key);
// a query-broadcast bias (Mb == 1) gets the column sums of dS by atomics. kFixed = false: fp32 atomics, so dk /
// dv / dbias depend on the order in the last bits (deterministic=False). kFixed = true (deterministic=True):
// every partial becomes an int64 count of a per-call power-of-two resolution added with integer atomics, which
// are order-independent, so the results are bitwise reproducible (csrc/cuda/bwd_fixed_point.cuh).
#pragma once

#include <climits>

#include "cuda/bias_element.cuh"
#include "cuda/bwd_fixed_point.cuh"
#include "cuda/flash_bwd_kernel.cuh"  // the dense backward's helpers (load_row_stats, store_pair, ...)
#include "cuda/flash_bwd_key_list.h"
#include "cuda/key_list_walk.cuh"
#include "cuda/key_lists.h"
#include "cuda/mask_words.cuh"
#include "cuda/smem_limit.cuh"
#include "cuda/smem_tiles.cuh"
#include "cuda/fast_exp2.cuh"

namespace dmattn {
namespace bwd_key_list {

using namespace cute;

// SmemTiles is given the 256 threads of kNWarps below: a base cannot read the members of the class it starts.
template <int kHeadDim_, bool kIsBF16, int kBlockM_>
struct BwdKeyListTraits : bwd::SmemTiles<std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>, kHeadDim_,
                                         kBlockM_, kKeyListChunk, 256> {
  using Elem = std::conditional_t<kIsBF16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;       // query rows per CTA
  static constexpr int kBlockN = kKeyListChunk;  // listed keys per chunk (one bit word)
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kBlockM == 64 || kBlockM == 128, "a CTA covers a whole unit (128 rows) or one half of it");
  static_assert(kKeyListBlockM % kBlockM == 0, "a CTA's rows lie in one unit");
  static_assert(kBlockN == 64, "the bit words are 64 keys wide");

  using MmaOp = std::conditional_t<kIsBF16, SM80_16x8x16_F32BF16BF16F32_TN, SM80_16x8x16_F32F16F16F32_TN>;
  // S, dP [M, 64] and dQ [M, D]: warps stacked along the query rows (8 x 1 at M = 128, 4 x 2 at M = 64), so a
  // warp's rows are one 16-row band.
  static constexpr int kWarpsM = kBlockM / 16;
  static constexpr int kWarpsN = kNWarps / kWarpsM;
  using MmaRows =
      TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<Int<kWarpsM>, Int<kWarpsN>, _1>>, Tile<Int<kBlockM>, Int<16 * kWarpsN>, _16>>;
  // dV, dK partials [64 keys, D] (contraction over the M query rows).
  using MmaKeys = TiledMMA<MMA_Atom<MmaOp>, Layout<Shape<_4, _2, _1>>, Tile<_64, _32, _16>>;

  // Q / dO rows are contiguous: CuTe's tiled cp.async (GmemTiledCopy). K / V rows are gathered: one 16-byte piece
  // per cp.async.
  static constexpr int kPieces = kHeadDim / 8;                      // 16-byte pieces of a K / V row
  static constexpr int kGatherSlots = kBlockN * kPieces / kNThreads;  // pieces per thread per operand
  static_assert(kBlockN * kPieces % kNThreads == 0, "every thread gathers the same number of pieces");

  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kPElems = kBlockM * kBlockN;
  // sQ | sdO | sK[2] | sV[2] | sP | sdS | dense-unit mask bytes [2][M][64] | bit words [2][M] | keys [2][64] |
  // bias [2][64] | dbias bands | fixed-point scales [4].
  static constexpr int kElemBytes = (2 * kQElems + 4 * kKVElems + 2 * kPElems) * int(sizeof(Elem));
  static constexpr int kMaskBytes = 2 * kBlockM * kBlockN;
  static constexpr int kSmemBytes = kElemBytes + kMaskBytes + 2 * kBlockM * 8 + 2 * kBlockN * 4 +
                                    2 * kBlockN * 4 + kWarpsM * kBlockN * 4 + 4 * 4;
  static_assert(kSmemBytes <= kMaxSmemPerBlockSm90, "shared memory over the sm_90 limit");
  static_assert(kSmemBytes == key_list_bwd_smem_bytes(kHeadDim, kBlockM), "flash_bwd_key_list.h's formula is stale");
};

// 16 bytes global -> shared, zero-filled when !valid (src is not read then).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}

// The first `bytes` (0..16) of a 16-byte aligned global piece -> shared, the rest zero-filled.
__device__ __forceinline__ void cp_async_16_prefix(void* smem, const void* gmem, int bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}

// 8 bytes global -> shared (one bit word), zero-filled when !valid.
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 8 : 0));
}

// The bit word of chunk-local rows for the sm80 kernel: a dense unit's from the chunk's raw mask bytes [M][64] (every
// lane takes part: shuffles), a list's from the staged words; 0 for rows past Lq.
template <class CS, int kRows>
__device__ __forceinline__ void chunk_row_words(uint64_t (&word)[kRows], CS const& cS, const BwdParams& p, int m0,
                                                const uint64_t* sbits, const uint8_t* smask) {
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int lrow = get<0>(cS(r, 0));
    if (smask != nullptr) {
      const uint4 bytes = *reinterpret_cast<const uint4*>(smask + lrow * 64 + 16 * (threadIdx.x & 3));
      word[r] = quad_word(pack16(bytes));
    } else {
      word[r] = sbits[lrow];
    }
    if (m0 + lrow >= p.q_len) word[r] = 0ull;
  }
}

// Turns the raw scores s = q.k of a chunk ((rows, cols) view of either MMA's accumulator; cS: CTA rows from m0,
// chunk columns = listed keys skey) into P in place: s = cap(scale q.k) + bias[key] as the forward computes it,
// P = exp(s - lse) where the key is kept (its bit in the row's word, causal and sequence bounds on the real key index,
// a logit that is not -inf, a row with a kept key), else 0; kept bits as bwd::scores_to_p. cd receives the softcap
// factor 1 - tanh^2 (or 1), unless it is NoSoftcap (a kernel that serves no softcap call). Shared by the sm80 and
// the Hopper key-list backwards.
struct NoSoftcap {};

template <class S, class CD, class CS, int kRows>
__device__ __forceinline__ void chunk_scores_to_p(S& s, CD& cd, CS const& cS, const BwdParams& p, int m0,
                                                  const int* skey, const float* sbias,
                                                  const uint64_t (&word)[kRows], const float (&lse)[kRows],
                                                  uint32_t (&kept)[kRows]) {
  const bool has_bias = p.bias != nullptr;
  constexpr bool kCapFactor = !std::is_same_v<CD, NoSoftcap>;
  const bool use_cap = kCapFactor && p.softcap > 0.f;
  const float cap_in = use_cap ? p.scale / p.softcap : 0.f;
  const int causal_off = p.kv_len - p.q_len;
  int row_last_key[kRows];  // the last key index row r may see
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_last_key[r] = p.is_causal ? m0 + get<0>(cS(r, 0)) + causal_off : INT_MAX;
    kept[r] = 0u;
  }
  static_assert(decltype(size<1>(s))::value <= 32, "kept bits fit a word per row");
  // The row's word shifted once to the thread's first column, so that each element tests a constant bit.
  const int col0 = get<1>(cS(0, 0));
  uint64_t row_word[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) row_word[r] = word[r] >> col0;
  // kWhole: a chunk uniform for the CTA (chunk_keys_uniform): the word alone decides where the key is kept. Only a
  // unit's last chunks take the key tests.
  auto to_p = [&](auto whole) {
    constexpr bool kWhole = decltype(whole)::value;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) {
      const int lcol = get<1>(cS(0, c));
      const int key = skey[lcol];  // -1 past the end of the list
      const float bias = has_bias ? sbias[lcol] : 0.f;
      CUTE_UNROLL
      for (int r = 0; r < size<0>(s); ++r) {
        float d;
        const float x = add_bias(bwd::capped_logit(p, s(r, c), use_cap, cap_in, d), bias);
        bool keep = ((row_word[r] >> (lcol - col0)) & 1ull) != 0 && x != -INFINITY && lse[r] != -INFINITY;
        if constexpr (!kWhole) keep = keep && key >= 0 && key <= row_last_key[r];
        s(r, c) = keep ? exp2_ftz((x - lse[r]) * kLog2e) : 0.f;
        if constexpr (kCapFactor) cd(r, c) = d;
        kept[r] |= uint32_t(keep) << c;
      }
    }
  };
  if (chunk_keys_uniform(skey[kKeyListChunk - 1], p, m0)) {
    to_p(std::true_type{});
  } else {
    to_p(std::false_type{});
  }
}

// Adds a [keys, D] partial times mul into the fp32 [B, Lk, accum_kv_heads, D] accumulator: one float2 atomic per
// column pair from sm_90 on (red.global.add.v2.f32), two scalar ones before. a, cKV, keys as for add_key_rows_fixed
// below.
template <int kD, class TA, class TC>
__device__ __forceinline__ void add_key_rows(const BwdKeyListParams& sp, const TA& a, const TC& cKV, float* accum,
                                             const int* keys, int b, int kvh, float mul) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(a); ++r) {
    const int key = keys[get<0>(cKV(r, 0))];
    if (key < 0) continue;
    float* dst = accum + key_list_accum_offset(sp, b, key, kvh, kD);
    CUTE_UNROLL
    for (int c = 0; c < size<1>(a); c += 2) {
      const int d = get<1>(cKV(0, c));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float2*>(dst + d), make_float2(a(r, c) * mul, a(r, c + 1) * mul));
#else
      atomicAdd(dst + d, a(r, c) * mul);
      atomicAdd(dst + d + 1, a(r, c + 1) * mul);
#endif
    }
  }
}

// Adds a [keys, D] partial into the int64 [B, Lk, accum_kv_heads, D] accumulator of counts (deterministic mode):
// each partial (times mul, rounded in fp32 as the fp32 path rounds it) is scaled by the exact power of two inv_res,
// rounded to the nearest integer and added with a 64-bit integer atomic. A non-finite or out-of-range count raises
// the flag (the outputs become NaN). a is the partial as (keys, D) in an MMA accumulator's row / column view
// (mma.sync's and wgmma's agree: lane q of a quad holds columns 2q, 2q + 1 of each 8-column block of its rows), cKV
// its coordinates, keys[row] the chunk's key of a row (< 0: past the list).
// Coalescing: adding the columns as the quad holds them makes every warp instruction touch 8 rows x two half-used
// 32-byte sectors. The quad first swaps counts (4 shuffles per pair) so that lane q adds columns q and q + 4: each
// instruction then covers one full sector per row, half the L2 sectors for the same 8-byte adds. Shuffles run on
// every lane (rows past the list included); only the atomics are skipped for them.
template <int kD, class TA, class TC>
__device__ __forceinline__ void add_key_rows_fixed(const BwdKeyListParams& sp, const TA& a, const TC& cKV,
                                                   unsigned long long* accum, const int* keys, int b, int kvh,
                                                   float mul, float inv_res) {
  static_assert(decltype(size<1>(a))::value % 2 == 0, "columns come in pairs per lane");
  const int lane = threadIdx.x % 32;
  const int q = lane & 3;
  const int src_lo = (lane & ~3) + (q >> 1), src_hi = src_lo + 2;
  bool bad = false;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(a); ++r) {
    const int key = keys[get<0>(cKV(r, 0))];
    unsigned long long* dst = accum + key_list_accum_offset(sp, b, key < 0 ? 0 : key, kvh, kD);
    CUTE_UNROLL
    for (int c = 0; c < size<1>(a); c += 2) {
      const unsigned long long e0 = fixed::to_count((a(r, c) * mul) * inv_res, bad);
      const unsigned long long e1 = fixed::to_count((a(r, c + 1) * mul) * inv_res, bad);
      const unsigned long long lo0 = __shfl_sync(0xffffffffu, e0, src_lo);
      const unsigned long long lo1 = __shfl_sync(0xffffffffu, e1, src_lo);
      const unsigned long long hi0 = __shfl_sync(0xffffffffu, e0, src_hi);
      const unsigned long long hi1 = __shfl_sync(0xffffffffu, e1, src_hi);
      const int n0 = get<1>(cKV(0, c)) - 2 * q;  // first column of this 8-column block
      if (key >= 0) {
        atomicAdd(dst + n0 + q, (q & 1) ? lo1 : lo0);
        atomicAdd(dst + n0 + q + 4, (q & 1) ? hi1 : hi0);
      }
    }
  }
  if (bad) atomicOr(sp.fixed.stats + kFixedBad, 1u);
}

// The dbias entry `off` += v as a count of resolution 1 / inv_res (deterministic mode).
__device__ __forceinline__ void add_dbias_fixed(const BwdKeyListParams& sp, int64_t off, float v, float inv_res) {
  bool bad = false;
  atomicAdd(sp.fixed.dbias + off, fixed::to_count(v * inv_res, bad));
  if (bad) atomicOr(sp.fixed.stats + kFixedBad, 1u);
}

template <class Kt, bool kFixed>
__global__ void __launch_bounds__(Kt::kNThreads, 1)
    flash_bwd_key_list_kernel(const __grid_constant__ BwdKeyListParams sp) {
  using Elem = typename Kt::Elem;
  constexpr int kBlockM = Kt::kBlockM;
  constexpr int kBlockN = Kt::kBlockN;
  constexpr int kD = Kt::kHeadDim;
  constexpr int kNThreads = Kt::kNThreads;
  constexpr int kPieces = Kt::kPieces;
  constexpr int kSlots = Kt::kGatherSlots;
  const BwdParams& p = sp.base;
  const BwdKeyLists& kl = sp.lists;
  // Hopper route: this kernel works only when the non-finite scan found an inf or NaN (flash_bwd.h: nonfinite).
  if (p.nonfinite != nullptr && *p.nonfinite == 0u) return;  // CTA-uniform

  extern __shared__ __align__(128) char smem[];

  const int m_block = gridDim.x - 1 - blockIdx.x;  // late (causally heavier) query tiles first
  const int h = sp.kv_head_begin * p.group + blockIdx.y;  // the query heads of this pass's kv heads
  const int b = blockIdx.z;
  const int kvh = h / p.group;
  const int tid = threadIdx.x;
  const int m0 = m_block * kBlockM;
  const int64_t q_row_stride = int64_t(p.heads) * kD;
  const int64_t k_row_stride = int64_t(p.kv_heads) * kD;

  // This CTA's key-list unit, and where its rows sit in the unit's bit words.
  const int64_t unit = b * kl.unit_batch_stride + (h / kl.mask_hdiv) * kl.unit_head_stride +
                       (kl.rows_full ? m0 / kKeyListBlockM : 0);
  const int32_t* live = kl.keys + unit * kl.keys_stride + 1;
  const int count = __ldg(live - 1);
  const bool dense = count == kKeyListDense;  // more live keys than the capacity: walk them all, read the mask
  const uint64_t* unit_bits = kl.bits + unit * kl.chunks * kl.rows_per_unit;
  const int row_in_unit0 = kl.rows_full ? m0 % kKeyListBlockM : 0;
  const int last_key = p.is_causal ? min(m0 + kBlockM, p.q_len) - 1 + (p.kv_len - p.q_len) : p.kv_len - 1;

  // Keys to walk: a dense unit's are 0 .. last_key. A list's chunks: with causality only those whose first key
  // the tile's last row can see (the list is ascending, so they are a prefix); the rest of the causal bound is
  // checked per element.
  const int n_keys = dense ? max(last_key + 1, 0) : count;
  int n_chunks = (n_keys + kBlockN - 1) / kBlockN;
  if (p.is_causal && !dense) {
    int visible = 0;
    for (int c0 = 0; c0 < n_chunks; c0 += kNThreads) {  // uniform trip count: every thread reaches the barrier
      const int c = c0 + tid;
      visible += __syncthreads_count(c < n_chunks && __ldg(live + int64_t(c) * kBlockN) <= last_key);
    }
    n_chunks = visible;
  }
  // Dense units: the mask rows of this (batch, head); 16-byte cp.async pieces where the rows are aligned.
  const DenseMaskRows dense_mask = dense_mask_rows(p, b, h, dense);

  Elem* sq_ptr = reinterpret_cast<Elem*>(smem);
  Elem* sdo_ptr = sq_ptr + Kt::kQElems;
  Elem* sk_ptr = sdo_ptr + Kt::kQElems;        // 2 stages
  Elem* sv_ptr = sk_ptr + 2 * Kt::kKVElems;    // 2 stages
  Elem* sp_ptr = sv_ptr + 2 * Kt::kKVElems;
  Elem* sds_ptr = sp_ptr + Kt::kPElems;
  uint8_t* smask = reinterpret_cast<uint8_t*>(sds_ptr + Kt::kPElems);    // [2][kBlockM][64], dense units
  uint64_t* sbits = reinterpret_cast<uint64_t*>(smask + Kt::kMaskBytes);  // [2][kBlockM]
  int* skey = reinterpret_cast<int*>(sbits + 2 * kBlockM);                // [2][kBlockN]
  float* sbias = reinterpret_cast<float*>(skey + 2 * kBlockN);            // [2][kBlockN]
  float* sdb = sbias + 2 * kBlockN;                                       // [kWarpsM][kBlockN]
  float* sfix = sdb + Kt::kWarpsM * kBlockN;  // kFixed: 2^-e of dK, dV, dbias (partial -> count factors)

  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), typename Kt::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sdo_ptr), typename Kt::SmemLayoutQ{});
  Tensor sP = make_tensor(make_smem_ptr(sp_ptr), typename Kt::SmemLayoutP{});
  Tensor sdS = make_tensor(make_smem_ptr(sds_ptr), typename Kt::SmemLayoutP{});
  Tensor sQt = make_tensor(make_smem_ptr(sq_ptr), typename Kt::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(sdo_ptr), typename Kt::SmemLayoutQt{});
  Tensor sPt = make_tensor(make_smem_ptr(sp_ptr), typename Kt::SmemLayoutPt{});
  Tensor sdSt = make_tensor(make_smem_ptr(sds_ptr), typename Kt::SmemLayoutPt{});
  auto stage_k = [&](int s) { return make_tensor(make_smem_ptr(sk_ptr + s * Kt::kKVElems), typename Kt::SmemLayoutKV{}); };
  auto stage_v = [&](int s) { return make_tensor(make_smem_ptr(sv_ptr + s * Kt::kKVElems), typename Kt::SmemLayoutKV{}); };
  auto stage_kt = [&](int s) { return make_tensor(make_smem_ptr(sk_ptr + s * Kt::kKVElems), typename Kt::SmemLayoutKt{}); };

  // ---- Q / dO of the tile (cp.async group 0), row statistics.
  typename Kt::GmemTiledCopy gmem_copy;
  auto gthr = gmem_copy.get_thread_slice(tid);
  Tensor tQc = gthr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  {
    const int64_t q_off = (int64_t(b) * p.q_len + m0) * q_row_stride + int64_t(h) * kD;
    Tensor gQ = make_tensor(make_gmem_ptr(static_cast<const Elem*>(p.q) + q_off), Shape<Int<kBlockM>, Int<kD>>{},
                            make_stride(q_row_stride, _1{}));
    Tensor gdO = make_tensor(make_gmem_ptr(static_cast<const Elem*>(p.dout) + q_off),
                             Shape<Int<kBlockM>, Int<kD>>{}, make_stride(q_row_stride, _1{}));
    Tensor tQsQ = gthr.partition_D(sQ);
    Tensor tQsdO = gthr.partition_D(sdO);
    copy_rows(gmem_copy, gthr.partition_S(gQ), tQsQ, tQc, p.q_len - m0);
    copy_rows(gmem_copy, gthr.partition_S(gdO), tQsdO, tQc, p.q_len - m0);
    cute::cp_async_fence();
  }

  typename Kt::MmaRows mma;
  auto tmma = mma.get_thread_slice(tid);
  typename Kt::MmaKeys mmak;
  auto tmmak = mmak.get_thread_slice(tid);

  Tensor tScS = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor cS = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS))::value;
  float lse[kRows], delta[kRows];
  bwd::load_row_stats(p, cS, b, h, m0, lse, delta);
  bool qdo_bad = false;  // this thread's Q / dO pieces hold an inf or NaN (scanned at chunk 0, once they landed)

  // ---- Gathering one chunk: K / V rows of its listed keys (16-byte pieces), its keys, bias values and the bit
  // words of this CTA's rows. The key indices of a chunk are read into registers one chunk ahead, so issuing
  // the gather never waits on a global load.
  const Elem* k_base = static_cast<const Elem*>(p.k) + (int64_t(b) * p.kv_len) * k_row_stride + int64_t(kvh) * kD;
  const Elem* v_base = static_cast<const Elem*>(p.v) + (int64_t(b) * p.kv_len) * k_row_stride + int64_t(kvh) * kD;
  const bool has_bias = p.bias != nullptr;
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;
  int slot_key[kSlots];  // key of each of this thread's gather pieces, for the next chunk to issue
  int row_key = -1;      // threads < 64: the key at position tid of the next chunk to issue
  float row_bias = 0.f;  // threads < 64: its bias value, stored to shared memory one iteration later
  auto read_keys = [&](int c) {
    const int first = c * kBlockN;
    CUTE_UNROLL
    for (int j = 0; j < kSlots; ++j) {
      const int pos = first + (tid + j * kNThreads) / kPieces;
      slot_key[j] = (c < n_chunks && pos < n_keys) ? (dense ? pos : __ldg(live + pos)) : -1;
    }
    if (tid < kBlockN) {
      const int pos = first + tid;
      row_key = (c < n_chunks && pos < n_keys) ? (dense ? pos : __ldg(live + pos)) : -1;
    }
  };
  auto issue_chunk = [&](int c, int s) {
    Tensor sK = stage_k(s);
    Tensor sV = stage_v(s);
    CUTE_UNROLL
    for (int j = 0; j < kSlots; ++j) {
      const int i = tid + j * kNThreads;
      const int row = i / kPieces, col = (i % kPieces) * 8;
      const int key = slot_key[j];
      const int64_t off = int64_t(key < 0 ? 0 : key) * k_row_stride + col;
      cp_async_16(&sK(row, col), k_base + off, key >= 0);
      cp_async_16(&sV(row, col), v_base + off, key >= 0);
    }
    if (dense) {
      // The chunk's raw mask block [M rows][64 keys] (keys past kv_len and rows past q_len read as 0).
      const int k0 = c * kBlockN;
      uint8_t* dst_base = smask + s * kBlockM * kBlockN;
      for (int i = tid; i < kBlockM * 4; i += kNThreads) {
        const int r = i / 4, piece = i % 4;
        const int row = m0 + r;
        const int col = k0 + 16 * piece;
        uint8_t* dst = dst_base + r * kBlockN + 16 * piece;
        const uint8_t* src = dense_mask.rows + int64_t(row) * p.mask_row_stride + col;
        const int bytes = row < p.q_len ? max(0, min(16, p.kv_len - col)) : 0;
        if (dense_mask.vec) {
          cp_async_16_prefix(dst, bytes > 0 ? src : dense_mask.rows, bytes);
        } else {  // unaligned rows (Lk % 16 != 0): plain loads, correct but slower
          uint32_t words[4] = {0, 0, 0, 0};
          for (int j = 0; j < bytes; ++j) words[j / 4] |= uint32_t(src[j] != 0) << (8 * (j % 4));
          *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
        }
      }
    } else if (tid < kBlockM) {
      const int row = m0 + tid;
      const int64_t w = int64_t(c) * kl.rows_per_unit + (kl.rows_full ? row_in_unit0 + tid : 0);
      cp_async_8(sbits + s * kBlockM + tid, unit_bits + (row < p.q_len ? w : 0), row < p.q_len);
    }
    cute::cp_async_fence();
    if (tid < kBlockN) {
      skey[s * kBlockN + tid] = row_key;
      row_bias = (has_bias && row_key >= 0)
                     ? load_bias(p.bias, bias_base + int64_t(row_key) * p.bias_col_stride, p.bias_dtype)
                     : 0.f;
    }
  };

  Tensor tSrQ = tmma.partition_fragment_A(sQ);
  Tensor tSrK = tmma.partition_fragment_B(stage_k(0));
  Tensor tdPrdO = tmma.partition_fragment_A(sdO);
  Tensor tdPrV = tmma.partition_fragment_B(stage_v(0));
  Tensor tdQrdS = tmma.partition_fragment_A(sdS);
  Tensor tdQrKt = tmma.partition_fragment_B(stage_kt(0));
  Tensor tdVrPt = tmmak.partition_fragment_A(sPt);
  Tensor tdVrdOt = tmmak.partition_fragment_B(sdOt);
  Tensor tdKrdSt = tmmak.partition_fragment_A(sdSt);
  Tensor tdKrQt = tmmak.partition_fragment_B(sQt);

  auto cpA = make_tiled_copy_A(typename Kt::S2RAtom{}, mma);
  auto cpA_t = cpA.get_thread_slice(tid);
  auto cpB = make_tiled_copy_B(typename Kt::S2RAtom{}, mma);
  auto cpB_t = cpB.get_thread_slice(tid);
  auto cpBT = make_tiled_copy_B(typename Kt::S2RAtomT{}, mma);
  auto cpBT_t = cpBT.get_thread_slice(tid);
  auto cpkAT = make_tiled_copy_A(typename Kt::S2RAtomT{}, mmak);
  auto cpkAT_t = cpkAT.get_thread_slice(tid);
  auto cpkBT = make_tiled_copy_B(typename Kt::S2RAtomT{}, mmak);
  auto cpkBT_t = cpkBT.get_thread_slice(tid);
  Tensor tSsQ = cpA_t.partition_S(sQ);
  Tensor tdPsdO = cpA_t.partition_S(sdO);
  Tensor tdQsdS = cpA_t.partition_S(sdS);
  Tensor tdVsPt = cpkAT_t.partition_S(sPt);
  Tensor tdVsdOt = cpkBT_t.partition_S(sdOt);
  Tensor tdKsdSt = cpkAT_t.partition_S(sdSt);
  Tensor tdKsQt = cpkBT_t.partition_S(sQt);

  auto r2s = make_tiled_copy_C(typename Kt::R2SAtom{}, mma);
  auto r2s_t = r2s.get_thread_slice(tid);
  Tensor tPsP = r2s_t.partition_D(sP);
  Tensor tPsdS = r2s_t.partition_D(sdS);

  Tensor tQDc = tmma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kD>>{}));
  Tensor cQD = make_tensor(tQDc.data(), rowcol_layout(tQDc.layout()));
  Tensor tKVc = tmmak.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kD>>{}));
  Tensor cKV = make_tensor(tKVc.data(), rowcol_layout(tKVc.layout()));

  const bool has_dbias = has_bias && p.dbias_mode != kDbiasNone;
  const int lane = tid % 32;
  const int band = get<0>(cS(0, 0)) / 16;  // this warp's 16-row band of the tile

  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_dq);

  // ---- Prologue: chunk 0 in flight, keys of chunk 1 in registers.
  read_keys(0);
  if (n_chunks > 0) issue_chunk(0, 0);
  read_keys(1);
  if constexpr (kFixed) {
    if (tid == 0) fixed::store_count_factors(sfix, sp.fixed.stats, sp.fixed, kD, p.scale);
  }

  for (int c = 0; c < n_chunks; ++c) {
    const int s = c & 1;
    if (tid < kBlockN) sbias[s * kBlockN + tid] = row_bias;  // bias of chunk c (loaded when it was issued)
    cute::cp_async_wait<0>();
    if (c == 0) {
      qdo_bad = own_pieces_nonfinite<Elem>(gthr.partition_D(sQ)) ||
                own_pieces_nonfinite<Elem>(gthr.partition_D(sdO));
    }
    uint32_t k_bits = 0;  // this thread's gathered K pieces of chunk c
    {
      Tensor sKs = stage_k(s);
      CUTE_UNROLL
      for (int j = 0; j < kSlots; ++j) {
        const int i = tid + j * kNThreads;
        k_bits |= piece_nonfinite_bits<Elem>(&sKs(i / kPieces, (i % kPieces) * 8));
      }
    }
    // Chunk c landed; every warp is done with chunk c - 1 (its stage, sP, sdS, sdb). CTA-uniform slow: Q, dO or
    // K of this chunk holds an inf or NaN (bwd::kept_product).
    const bool slow = __syncthreads_or(qdo_bad || (k_bits & kNonfiniteBits) != 0);
    if (c + 1 < n_chunks) {
      issue_chunk(c + 1, s ^ 1);
      read_keys(c + 2);
    }
    const int* ckey = skey + s * kBlockN;

    Tensor sK = stage_k(s);
    Tensor sV = stage_v(s);
    Tensor sKt = stage_kt(s);
    Tensor tSsK = cpB_t.partition_S(sK);
    Tensor tdPsV = cpB_t.partition_S(sV);
    Tensor tdQsKt = cpBT_t.partition_S(sKt);

    // S = Q K^T -> P.
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, cpA, cpA_t, cpB, cpB_t);
    Tensor capd = make_tensor_like(acc_s);
    uint32_t kept[kRows];
    {
      uint64_t word[kRows];
      chunk_row_words(word, cS, p, m0, sbits + s * kBlockM, dense ? smask + s * kBlockM * kBlockN : nullptr);
      Tensor ps = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
      Tensor cd = make_tensor(capd.data(), rowcol_layout(capd.layout()));
      chunk_scores_to_p(ps, cd, cS, p, m0, ckey, sbias + s * kBlockN, word, lse, kept);
    }
    bwd::store_as<Elem>(acc_s, r2s, r2s_t, tPsP);

    // dP = dO V^T -> dS = P (dP - delta); dbias takes dS, dQ / dK take it through the softcap factor.
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, mma, cpA, cpA_t, cpB, cpB_t);
    {
      Tensor ps = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
      Tensor dp = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
      Tensor cd = make_tensor(capd.data(), rowcol_layout(capd.layout()));
      CUTE_UNROLL
      for (int cc = 0; cc < size<1>(dp); ++cc) {
        float colsum = 0.f;
        CUTE_UNROLL
        for (int r = 0; r < size<0>(dp); ++r) {  // dS = 0 at dropped pairs by select (0 * NaN otherwise)
          const bool keep = (kept[r] >> cc) & 1u;
          const float ds = keep ? ps(r, cc) * (dp(r, cc) - delta[r]) : 0.f;
          colsum += ds;
          dp(r, cc) = keep ? ds * cd(r, cc) : 0.f;
        }
        if (has_dbias) {  // column sum over the warp's band: lanes that differ in lane / 4 hold other rows
          colsum += __shfl_xor_sync(0xffffffffu, colsum, 4);
          colsum += __shfl_xor_sync(0xffffffffu, colsum, 8);
          colsum += __shfl_xor_sync(0xffffffffu, colsum, 16);
          if (lane < 4) sdb[band * kBlockN + get<1>(cS(0, cc))] = colsum;
        }
      }
      bwd::store_as<Elem>(acc_dp, r2s, r2s_t, tPsdS);
    }
    // Kept bytes [M][64] of a slow chunk, in this stage's dense-mask bytes (every warp has read those by the
    // extra barrier; the stage is next filled after the next iteration's first barrier).
    uint8_t* keep_bytes = smask + s * kBlockM * kBlockN;
    if (slow) {
      __syncthreads();
      bwd::store_kept_bytes(keep_bytes, cS, kept);
    }
    __syncthreads();  // sP, sdS, sdb (and the kept bytes) complete

    // dQ += dS K (registers).
    if (slow) bwd::kept_product_through_call<bwd::KeptSum::kOverKeys>(
        acc_dq, cQD, sdS, sK, keep_bytes, 64);
    else gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma, cpA, cpA_t, cpBT, cpBT_t);

    // dbias[key] += column sums of dS over the tile's rows.
    if (has_dbias && tid < kBlockN && ckey[tid] >= 0) {
      float v = 0.f;
      CUTE_UNROLL
      for (int w = 0; w < Kt::kWarpsM; ++w) v += sdb[w * kBlockN + tid];
      const int64_t off = bias_base + int64_t(ckey[tid]) * p.bias_col_stride;
      if constexpr (kFixed) {
        add_dbias_fixed(sp, off, v, sfix[2]);
      } else {
        atomicAdd(p.dbias_accum + off, v);
      }
    }

    // dV[key] += P^T dO, dK[key] += scale dS^T Q.
    {
      Tensor acc_kv = partition_fragment_C(mmak, Shape<Int<kBlockN>, Int<kD>>{});
      auto kv_rows = [&] { return make_tensor(acc_kv.data(), rowcol_layout(acc_kv.layout())); };
      clear(acc_kv);
      if (slow)
        bwd::kept_product_through_call<bwd::KeptSum::kOverRows>(acc_kv, cKV, sP, sdO, keep_bytes, kBlockM);
      else gemm_ss(acc_kv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, mmak, cpkAT, cpkAT_t, cpkBT, cpkBT_t);
      if constexpr (kFixed) add_key_rows_fixed<kD>(sp, kv_rows(), cKV, sp.fixed.dv, ckey, b, kvh, 1.f, sfix[1]);
      else add_key_rows<kD>(sp, kv_rows(), cKV, sp.dv_accum, ckey, b, kvh, 1.f);
      clear(acc_kv);
      if (slow)
        bwd::kept_product_through_call<bwd::KeptSum::kOverRows>(acc_kv, cKV, sdS, sQ, keep_bytes, kBlockM);
      else gemm_ss(acc_kv, tdKrdSt, tdKrQt, tdKsdSt, tdKsQt, mmak, cpkAT, cpkAT_t, cpkBT, cpkBT_t);
      if constexpr (kFixed) add_key_rows_fixed<kD>(sp, kv_rows(), cKV, sp.fixed.dk, ckey, b, kvh, p.scale, sfix[0]);
      else add_key_rows<kD>(sp, kv_rows(), cKV, sp.dk_accum, ckey, b, kvh, p.scale);
    }
  }
  cute::cp_async_wait<0>();  // Q / dO of a tile with no chunk

  bwd::store_dq<Elem, kD>(p, make_tensor(acc_dq.data(), rowcol_layout(acc_dq.layout())), cQD, p.q_len, q_row_stride,
                          b, h, m0);
}

}  // namespace bwd_key_list
}  // namespace dmattn
