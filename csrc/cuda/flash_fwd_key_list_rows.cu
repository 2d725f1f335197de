#include "cuda/flash_fwd_key_list_rows.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <type_traits>

#include "cuda/bias_element.cuh"
#include "cuda/fast_exp2.cuh"
#include "cuda/half_float.cuh"
#include "cuda/key_list_walk.cuh"
#include "cuda/mask_words.cuh"
#include "cuda/smem_limit.cuh"
#include "cuda/smem_tiles.cuh"
#include "kernel_facts.h"

namespace dmattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = kKeyListChunk;
static_assert(kChunk == 8 * kWarps, "a chunk's 64 keys (one bit word) are 8 per warp");

std::atomic<int64_t> g_launches{0};

template <bool kIsBF16>
using ElemOf = std::conditional_t<kIsBF16, __nv_bfloat16, __half>;


template <class Elem>
__device__ __forceinline__ float2 to_float2(uint32_t w) {
  const Elem* e = reinterpret_cast<const Elem*>(&w);
  return make_float2(to_f32(e[0]), to_f32(e[1]));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// mma.sync m16n8k16 with fp32 accumulators: d += a b (a: 16 x 16 row-major, b: 16 x 8 column-major fragments).
template <bool kIsBF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (kIsBF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Four 8 x 8 matrices of 16-bit elements from shared memory (lane l gives row l % 8 of matrix l / 8); kTrans
// transposes each.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  }
}

template <class Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    const __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&x);
  } else {
    const __half2 x = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&x);
  }
}

// Shared-memory layout of the kernel (one CTA): a ring of chunk stages.
template <int kD>
struct RowsSmem {
  static constexpr int kPieces = kD / 8;  // 16-byte pieces of a K / V row
  // Rows padded by one piece: ldmatrix reads 8 rows of a piece column at once, which the pad spreads over all banks.
  static constexpr int kRowBytes = 2 * kD + 16;
  static constexpr int kKBytes = kChunk * kRowBytes, kVBytes = kChunk * kRowBytes;
  static constexpr int kStageBytes = kKBytes + kVBytes + kChunk * 4;  // K, V, the chunk's key indices
  // Enough chunks in flight to cover a gather's latency, and two CTAs a multiprocessor where they fit.
  static constexpr int kStages = kStageBytes <= 40 * 1024 ? 3 : 2;
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(kBytes <= kMaxSmemPerBlockSm90, "shared memory of one CTA");
  static_assert(kPieces * kChunk % kThreads == 0, "whole pieces per thread");
  static constexpr int kLoadRows = kPieces * kChunk / kThreads;  // K (and V) pieces a thread gathers per chunk
  static constexpr int kCtasPerSm = 2 * (kBytes + 4 * 1024) <= kSmemPerSmSm90 ? 2 : 1;
};

// One CTA per (batch, query head) of a call with Lq <= kRowsMax rows (one key-list unit; the header says why). The
// rows are the first rows of mma.sync's 16-row tiles (the others are zeros): warp w scores keys [8w, 8w + 8) of each
// chunk against every row and, after the softmax, accumulates P V for head-dim columns 8n of n = w, w + 8, ...
template <int kD, bool kIsBF16>
__global__ void __launch_bounds__(kThreads, RowsSmem<kD>::kCtasPerSm)
    flash_fwd_key_list_rows_kernel(const __grid_constant__ FwdParams p) {
  using Elem = ElemOf<kIsBF16>;
  using L = RowsSmem<kD>;
  constexpr int kStages = L::kStages;
  constexpr int kRowsMax = 8;  // rows of an mma.sync fragment a lane quad holds (g = lane / 4)
  static_assert(kKeyListRowsMax <= kRowsMax, "a call's rows fit the fragments' first 8 rows");
  constexpr int kKSteps = kD / 16;       // q . k: k-steps of 16 dims
  constexpr int kNTiles = kD / 8;        // P V: 8-dim column tiles
  constexpr int kTilesPerWarp = (kNTiles + kWarps - 1) / kWarps;
  static_assert(kD % 32 == 0, "ldmatrix.x4 covers 32 dims of a key");
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float s_wmax[kWarps][kRowsMax];            // each warp's max of each row over its keys of the chunk
  // P of the chunk in the input dtype (as the tile kernels); rows padded by 8 keys, so that a fragment's 8 rows fall
  // in different banks.
  __shared__ __align__(16) Elem s_p[kRowsMax][kChunk + 8];
  __shared__ uint8_t s_kept[kRowsMax][kChunk];          // the row keeps the key (NaN logits count as kept)
  __shared__ float s_wsum[kWarps][kRowsMax];

  const int h = blockIdx.x, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;  // fragment row and column pair of this lane
  const int q_len = p.q_len;
  const KeyListWalk walk = key_list_walk<kKeyListBlockM, kChunk, kThreads>(p, b, h, 0);
  const DenseMaskRows dense_mask = dense_mask_rows(p, b, h, walk.dense);
  const HeadOperands<Elem> head = head_operands<Elem>(p, b, h);
  const int n_chunks = walk.n_chunks;

  // A stage's key indices, after its K and V rows.
  auto stage_keys = [&](int stage) {
    return reinterpret_cast<int32_t*>(smem + stage * L::kStageBytes + L::kKBytes + L::kVBytes);
  };
  // The gather: thread tid copies pieces tid + i * kThreads of a chunk's K and V, row (key) e / kPieces.
  const uint32_t ring = smem_addr(smem);
  int g_row[L::kLoadRows], g_piece[L::kLoadRows], g_key[L::kLoadRows];
#pragma unroll
  for (int i = 0; i < L::kLoadRows; ++i) {
    const int e = tid + i * kThreads;
    g_row[i] = e / L::kPieces, g_piece[i] = e % L::kPieces;
    g_key[i] = walk.key_at(0, g_row[i], kChunk);
  }
  // Issues chunk c's copies into its stage (rows past the walk are zero-filled) and reads the keys of chunk c + 1.
  auto gather = [&](int c) {
    const int stage = c % kStages;
    const uint32_t k_base = ring + stage * L::kStageBytes, v_base = k_base + L::kKBytes;
    int32_t* s_keys = stage_keys(stage);
#pragma unroll
    for (int i = 0; i < L::kLoadRows; ++i) {
      const int key = g_key[i];
      const bool valid = key >= 0;
      const uint32_t dst = g_row[i] * L::kRowBytes + g_piece[i] * 16;
      const int64_t k_off = valid ? int64_t(key) * p.k_row_stride : 0;
      const int64_t v_off = valid ? int64_t(key) * p.v_row_stride : 0;
      copy_piece_or_zero(k_base + dst, head.k + k_off + g_piece[i] * 8, valid);
      copy_piece_or_zero(v_base + dst, head.v + v_off + g_piece[i] * 8, valid);
      if (g_piece[i] == 0) s_keys[g_row[i]] = key;
    }
#pragma unroll
    for (int i = 0; i < L::kLoadRows; ++i) g_key[i] = walk.key_at(c + 1, g_row[i], kChunk);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_chunks) gather(s);
    cp_async_commit();
  }

  // The query rows as mma.sync A fragments (row g; rows g + 8 are zero): a[ks][0] dims 16ks + 2t, a[ks][1] + 8.
  uint32_t qa[kKSteps][2];
  {
    const Elem* qrow = head.q + int64_t(g) * p.q_row_stride;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      qa[ks][0] = g < q_len ? *reinterpret_cast<const uint32_t*>(qrow + 16 * ks + 2 * t) : 0u;
      qa[ks][1] = g < q_len ? *reinterpret_cast<const uint32_t*>(qrow + 16 * ks + 2 * t + 8) : 0u;
    }
  }

  const bool has_bias = p.bias != nullptr;
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;
  const int causal_off = p.kv_len - q_len;
  const float cap_in = p.softcap > 0.f ? p.scale / p.softcap : 0.f;

  // What the lane's two logits (row g, keys 8 warp + 2t + i of a chunk) need from global memory, as loaded: read for
  // chunk c + 1 while chunk c computes, and converted where chunk c + 1 uses them, so that the loads' latency
  // overlaps chunk c (a conversion next to its load would wait for it there).
  struct Meta {
    int key[2];
    uint32_t bias_bits[2];
    uint64_t word;       // the row's bit word of the chunk (a list's unit)
    uint8_t dense[2];    // the row's mask bytes of the keys (a dense unit)
  };
  auto fill_meta = [&](int c, const int (&keys)[2]) {
    Meta m;
    m.word = !walk.dense && g < q_len ? walk.word(c, g) : 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int key = keys[i];
      m.key[i] = key;
      const bool live = key >= 0 && g < q_len;
      m.bias_bits[i] = load_bias_bits(
          p.bias, bias_base + int64_t(g) * p.bias_row_stride + int64_t(key) * p.bias_col_stride, p.bias_dtype,
          has_bias && live);
      m.dense[i] = walk.dense && live ? dense_mask.rows[int64_t(g) * p.mask_row_stride +
                                                        int64_t(key) * p.mask_col_stride]
                                      : 0;
    }
    return m;
  };
  // Chunk c's keys from its stage (written by other threads: after a barrier that follows its gather).
  auto load_meta = [&](int c) {
    const int32_t* s_keys = stage_keys(c % kStages);
    const int keys[2] = {s_keys[8 * warp + 2 * t], s_keys[8 * warp + 2 * t + 1]};
    return fill_meta(c, keys);
  };
  // Chunk 0's from the list itself, before the loop's first barrier.
  Meta meta;
  {
    const int keys[2] = {walk.key_at(0, 8 * warp + 2 * t, kChunk), walk.key_at(0, 8 * warp + 2 * t + 1, kChunk)};
    meta = fill_meta(0, keys);
  }

  float row_max = -INFINITY, row_sum = 0.f;  // row g's running max (the same in every warp) and this lane's sum
  float acc[kTilesPerWarp][4];  // P V: rows g (and g + 8: zeros), dims 8n + 2t, + 1 of n = warp + 8j
#pragma unroll
  for (int j = 0; j < kTilesPerWarp; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;
  }

  for (int c = 0; c < n_chunks; ++c) {
    cp_async_wait<kStages - 2>();
    const int stage = c % kStages;
    const uint32_t k_stage = ring + stage * L::kStageBytes, v_stage = k_stage + L::kKBytes;
    // Whether the chunk's V holds an inf or NaN: each thread scans the pieces it copied (its own copies are visible
    // to it); P V then takes the exact per-element rules instead of mma.sync (0 * inf would be NaN).
    uint32_t halves = 0;
#pragma unroll
    for (int i = 0; i < L::kLoadRows; ++i) {
      halves |= shared_piece_nonfinite_bits<Elem>(v_stage + g_row[i] * L::kRowBytes + g_piece[i] * 16);
    }
    // Chunk c's stage has landed for every thread; every thread is done with chunk c - 1.
    const bool v_nonfinite = __syncthreads_or((halves & kNonfiniteBits) != 0);
    if (c + kStages - 1 < n_chunks) gather(c + kStages - 1);
    cp_async_commit();

    // S = q k^T for keys [8 warp, 8 warp + 8): B fragments by ldmatrix from the K rows (lane l: key l % 8, dims
    // 8 (4j + l / 8) .. + 8).
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < kD / 32; ++j) {
      uint32_t kb[4];
      ldmatrix_x4<false>(kb, k_stage + (8 * warp + (lane & 7)) * L::kRowBytes + (4 * j + (lane >> 3)) * 16);
      mma_16816<kIsBF16>(sc, qa[2 * j][0], 0u, qa[2 * j][1], 0u, kb[0], kb[1]);
      mma_16816<kIsBF16>(sc, qa[2 * j + 1][0], 0u, qa[2 * j + 1][1], 0u, kb[2], kb[3]);
    }

    // Logits of row g, keys 8 warp + 2t + i, in natural units, -inf where the pair is dropped (as
    // fwd::key_list_logits); the warp's max of each row over its 8 keys.
    float x[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float logit = p.softcap > 0.f ? p.softcap * tanhf(sc[i] * cap_in) : sc[i] * p.scale;
      if (has_bias) logit = add_bias(logit, bias_of_bits(meta.bias_bits[i], p.bias_dtype));
      const int col = 8 * warp + 2 * t + i;
      const bool mask = meta.key[i] >= 0 && g < q_len &&
                        (walk.dense ? meta.dense[i] != 0 : ((meta.word >> col) & 1u) != 0);
      const bool keep = mask && (!p.is_causal || meta.key[i] <= g + causal_off);
      x[i] = keep ? logit : -INFINITY;
      s_kept[g][col] = x[i] != -INFINITY;
    }
    float wmax = max_nan(x[0], x[1]);
    wmax = max_nan(wmax, __shfl_xor_sync(0xffffffffu, wmax, 1));
    wmax = max_nan(wmax, __shfl_xor_sync(0xffffffffu, wmax, 2));
    if (t == 0) s_wmax[warp][g] = wmax;
    __syncthreads();
    // Chunk c + 1's key indices are in its stage by now (its gather ran before this barrier, at the latest).
    if (c + 1 < n_chunks) meta = load_meta(c + 1);

    // Online softmax: every warp forms the same chunk max of row g from the warps' maxima.
    float mx = row_max;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = max_nan(mx, s_wmax[w][g]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    const float corr = exp2_ftz((row_max - m_use) * kLog2e);
    row_max = mx;
    const float p0 = exp2_ftz((x[0] - m_use) * kLog2e), p1 = exp2_ftz((x[1] - m_use) * kLog2e);
    row_sum = row_sum * corr + p0 + p1;
    *reinterpret_cast<uint32_t*>(&s_p[g][8 * warp + 2 * t]) = pack2<Elem>(p0, p1);
#pragma unroll
    for (int j = 0; j < kTilesPerWarp; ++j) acc[j][0] *= corr, acc[j][1] *= corr;
    __syncthreads();

    // O += P V over the chunk's 64 keys for this warp's column tiles.
    if (!v_nonfinite) {
#pragma unroll
      for (int kp = 0; kp < 2; ++kp) {  // 32 keys: two k-steps
        uint32_t pa[2][2];
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          pa[s][0] = *reinterpret_cast<const uint32_t*>(&s_p[g][32 * kp + 16 * s + 2 * t]);
          pa[s][1] = *reinterpret_cast<const uint32_t*>(&s_p[g][32 * kp + 16 * s + 2 * t + 8]);
        }
#pragma unroll
        for (int j = 0; j < kTilesPerWarp; ++j) {
          const int n = warp + kWarps * j;
          if (kNTiles % kWarps != 0 && n >= kNTiles) break;
          uint32_t vb[4];  // lane l: key 32 kp + l, dims 8n .. 8n + 8, transposed
          ldmatrix_x4<true>(vb, v_stage + (32 * kp + lane) * L::kRowBytes + n * 16);
          mma_16816<kIsBF16>(acc[j], pa[0][0], 0u, pa[0][1], 0u, vb[0], vb[1]);
          mma_16816<kIsBF16>(acc[j], pa[1][0], 0u, pa[1][1], 0u, vb[2], vb[3]);
        }
      }
    } else {
      // A kept key's inf or NaN V element is added as it is (an underflowed P must not turn inf into NaN); a dropped
      // key adds nothing, whatever its V holds.
      const uint8_t* vrows = smem + stage * L::kStageBytes + L::kKBytes;
#pragma unroll
      for (int j = 0; j < kTilesPerWarp; ++j) {
        const int n = warp + kWarps * j;
        if (kNTiles % kWarps != 0 && n >= kNTiles) break;
        for (int key = 0; key < kChunk; ++key) {
          if (!s_kept[g][key]) continue;
          const float pk = to_f32(s_p[g][key]);
          const uint8_t* v_pair = vrows + key * L::kRowBytes + n * 16 + 4 * t;
          const float2 v = to_float2<Elem>(*reinterpret_cast<const uint32_t*>(v_pair));
          acc[j][0] += is_nonfinite(v.x) ? v.x : pk * v.x;
          acc[j][1] += is_nonfinite(v.y) ? v.y : pk * v.y;
        }
      }
    }
  }
  cp_async_wait<0>();

  // Row g's sum over every warp's keys; a row that kept no key is empty (out 0, lse -inf).
  row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
  row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 2);
  if (t == 0) s_wsum[warp][g] = row_sum;
  __syncthreads();
  if (g < q_len) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += s_wsum[w][g];
    const bool empty = row_max == -INFINITY;
    const float inv = empty ? 0.f : 1.f / total;
    Elem* orow = head.out + int64_t(g) * p.o_row_stride;
#pragma unroll
    for (int j = 0; j < kTilesPerWarp; ++j) {
      const int n = warp + kWarps * j;
      if (kNTiles % kWarps != 0 && n >= kNTiles) break;
      *reinterpret_cast<uint32_t*>(orow + 8 * n + 2 * t) = pack2<Elem>(acc[j][0] * inv, acc[j][1] * inv);
    }
    if (warp == 0 && t == 0) {
      p.lse[(int64_t(b) * p.heads + h) * p.q_len + g] = empty ? -INFINITY : row_max + logf(total);
    }
  }
}

template <int kD, bool kIsBF16>
cudaError_t launch_rows(const FwdParams& p, cudaStream_t stream) {
  constexpr int smem = RowsSmem<kD>::kBytes;
  auto kernel = flash_fwd_key_list_rows_kernel<kD, kIsBF16>;
  static std::atomic<uint64_t> configured{0};
  if (cudaError_t err = raise_smem_limit_once(kernel, smem, configured); err != cudaSuccess) return err;
  kernel<<<dim3(p.heads, 1, p.batch), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool flash_fwd_key_list_rows_serves(const FwdParams& p) {
  return p.key_lists != nullptr && p.q_len >= 1 && p.q_len <= kKeyListRowsMax && p.head_dim % 32 == 0;
}

int64_t flash_fwd_key_list_rows_launches() { return g_launches.load(std::memory_order_relaxed); }

cudaError_t launch_flash_fwd_key_list_rows(const FwdParams& p, cudaStream_t stream) {
  if (!flash_fwd_key_list_rows_serves(p)) return cudaErrorInvalidValue;
  if (p.heads == 0 || p.batch == 0) return cudaSuccess;
  g_launches.fetch_add(1, std::memory_order_relaxed);
#define DMATTN_FWD_ROWS_CASE(D) \
  case D:                       \
    return p.is_bf16 ? launch_rows<D, true>(p, stream) : launch_rows<D, false>(p, stream);
  switch (p.head_dim) {
    DMATTN_FOR_EACH_CUDA_HEAD_DIM(DMATTN_FWD_ROWS_CASE)
    default:
      return cudaErrorInvalidValue;
  }
#undef DMATTN_FWD_ROWS_CASE
}

}  // namespace dmattn
