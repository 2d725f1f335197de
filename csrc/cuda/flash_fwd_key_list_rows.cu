#include "cuda/flash_fwd_key_list_rows.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <type_traits>

#include "cuda/bias_element.cuh"
#include "cuda/key_list_walk.cuh"
#include "cuda/mask_words.cuh"
#include "cuda/smem_tiles.cuh"
#include "kernel_facts.h"
#include "cuda/fast_exp2.cuh"

namespace dmattn {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 32;  // keys a warp scores at once, one per lane
static_assert(kKeyListChunk == 2 * kGroup, "a chunk's bit word covers two groups");

std::atomic<int64_t> g_launches{0};

template <bool kIsBF16>
using ElemOf = std::conditional_t<kIsBF16, __nv_bfloat16, __half>;

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }

// The 8 elements of a 16-byte piece as floats.
template <class Elem>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const Elem* e = reinterpret_cast<const Elem*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float(e[i]);
}

// kN consecutive elements of one row, as packed 32-bit words (16-bit loads when kN is odd: the lane's offset is
// then only 2-byte aligned).
template <class Elem, int kN>
struct RawElems {
  static constexpr int kWords = (kN + 1) / 2;
  uint32_t w[kWords];
  __device__ __forceinline__ void load(const Elem* src) {
    if constexpr (kN % 2 == 0) {
#pragma unroll
      for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const unsigned int*>(src) + i);
    } else {
      const unsigned short* s16 = reinterpret_cast<const unsigned short*>(src);
#pragma unroll
      for (int i = 0; i < kWords; ++i) {
        const uint32_t lo = __ldg(s16 + 2 * i);
        const uint32_t hi = 2 * i + 1 < kN ? uint32_t(__ldg(s16 + 2 * i + 1)) : 0u;
        w[i] = lo | (hi << 16);
      }
    }
  }
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
  }
  __device__ __forceinline__ float operator[](int i) const {
    return to_float(reinterpret_cast<const Elem*>(w)[i]);
  }
};

__device__ __forceinline__ float warp_max_nan(float x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

// One CTA per (batch, query head) of a call with Lq <= kRows rows (one key-list unit; the header says why).
template <int kD, bool kIsBF16, int kRows>
__global__ void __launch_bounds__(kThreads, kRows <= 4 && kD <= 128 ? 2 : 1) flash_fwd_key_list_rows_kernel(const __grid_constant__ FwdParams p) {
  using Elem = ElemOf<kIsBF16>;
  constexpr int kWarps = kThreads / 32;
  constexpr int kDL = kD / 32;  // output dims per lane: lane l holds dims [l * kDL, (l + 1) * kDL) of every row
  static_assert(kD % 32 == 0 && kD % 8 == 0, "whole 16-byte pieces of a row, whole dims per lane");
  // K pieces a lane has in flight at once (the whole row up to D = 128), and V rows a warp reads at once.
  constexpr int kKBatch = kD / 8 <= 8 ? kD / 8 : (kD % 64 == 0 ? 8 : 12);
  constexpr int kVBatch = kDL * kRows <= 16 ? 16 : 8;
  static_assert((kD / 8) % kKBatch == 0 && kGroup % kVBatch == 0, "whole batches");
  __shared__ __align__(16) float sq[kRows][kD];  // the query rows (zeros past Lq)
  __shared__ float s_max[kWarps][kRows], s_sum[kWarps][kRows];
  // The warps' outputs for the merge, two warps at a time: 48 KiB of static shared memory hold no more for
  // kRows * kD = 2048.
  __shared__ float s_out[kWarps / 2][kRows][kD];

  const int h = blockIdx.x, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int q_len = p.q_len;
  const KeyListWalk walk = key_list_walk<kKeyListBlockM, kKeyListChunk, kThreads>(p, b, h, 0);
  const DenseMaskRows dense_mask = dense_mask_rows(p, b, h, walk.dense);

  const HeadOperands<Elem> head = head_operands<Elem>(p, b, h);

  for (int e = tid; e < kRows * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    sq[r][d] = r < q_len ? to_float(head.q[int64_t(r) * p.q_row_stride + d]) : 0.f;
  }
  __syncthreads();

  const bool has_bias = p.bias != nullptr;
  const int64_t bias_base = has_bias ? b * p.bias_batch_stride + (h / p.bias_hdiv) * p.bias_head_stride : 0;
  const bool bias_per_key = has_bias && p.bias_row_stride == 0;
  const int causal_off = p.kv_len - q_len;
  const float cap_in = p.softcap > 0.f ? p.scale / p.softcap : 0.f;

  float row_max[kRows], row_sum[kRows], acc[kRows][kDL];  // row_sum: this lane's share; the rest warp-uniform
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY, row_sum[r] = 0.f;
#pragma unroll
    for (int d = 0; d < kDL; ++d) acc[r][d] = 0.f;
  }

  const int n_groups = walk.n_chunks * 2;
  for (int g = warp; g < n_groups; g += kWarps) {
    const int c = g >> 1, col = (g & 1) * kGroup + lane;  // this lane's key: column `col` of chunk c
    const int key = walk.key_at(c, col, kKeyListChunk);

    // q . k of every row for this lane's key: its K row read whole (16-byte pieces), the query rows broadcast.
    float s[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) s[r] = 0.f;
    if (key >= 0) {
      const uint4* krow = reinterpret_cast<const uint4*>(head.k + int64_t(key) * p.k_row_stride);
#pragma unroll
      for (int i0 = 0; i0 < kD / 8; i0 += kKBatch) {
        uint4 raw[kKBatch];  // all loads issued before the first is used
#pragma unroll
        for (int i = 0; i < kKBatch; ++i) raw[i] = __ldg(krow + i0 + i);
#pragma unroll
        for (int i = 0; i < kKBatch; ++i) {
          float kf[8];
          unpack8<Elem>(raw[i], kf);
          const int d0 = 8 * (i0 + i);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const float4 q0 = *reinterpret_cast<const float4*>(&sq[r][d0]);
            const float4 q1 = *reinterpret_cast<const float4*>(&sq[r][d0 + 4]);
            s[r] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] + q1.x * kf[4] + q1.y * kf[5] +
                    q1.z * kf[6] + q1.w * kf[7];
          }
        }
      }
    }

    // Logits in natural units, -inf where the pair is dropped (as fwd::key_list_logits).
    const float key_bias = bias_per_key && key >= 0
                               ? load_bias(p.bias, bias_base + int64_t(key) * p.bias_col_stride, p.bias_dtype)
                               : 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float x = p.softcap > 0.f ? p.softcap * tanhf(s[r] * cap_in) : s[r] * p.scale;
      if (bias_per_key) {
        x = add_bias(x, key_bias);
      } else if (has_bias && key >= 0 && r < q_len) {
        x = add_bias(x, load_bias(p.bias, bias_base + int64_t(r) * p.bias_row_stride +
                                              int64_t(key) * p.bias_col_stride, p.bias_dtype));
      }
      bool keep = r < q_len && key >= 0 && (!p.is_causal || key <= r + causal_off);
      if (keep) {
        keep = walk.dense ? dense_mask.rows[int64_t(r) * p.mask_row_stride + int64_t(key) * p.mask_col_stride] != 0
                          : ((walk.word(c, r) >> col) & 1u) != 0;
      }
      s[r] = keep ? x : -INFINITY;
    }

    // Online softmax over the group; kept[r] bit j: lane j's key is kept by row r (NaN counts as kept).
    uint32_t kept[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      kept[r] = __ballot_sync(0xffffffffu, s[r] != -INFINITY);
      const float mx = max_nan(row_max[r], warp_max_nan(s[r]));
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float corr = exp2_ftz((row_max[r] - m_use) * kLog2e);
      row_max[r] = mx;
      s[r] = exp2_ftz((s[r] - m_use) * kLog2e);  // P of this lane's key
      row_sum[r] = row_sum[r] * corr + s[r];
#pragma unroll
      for (int d = 0; d < kDL; ++d) acc[r][d] *= corr;
    }

    // P V: the warp reads the group's V rows one at a time (lane l its dims), each row's P from the key's lane. A
    // kept key's inf or NaN V element is added as it is (an underflowed fp32 P must not turn inf into NaN, as in
    // the tile kernels); a dropped key adds nothing, whatever its V holds.
    const uint32_t any_kept = [&] {
      uint32_t x = 0;
#pragma unroll
      for (int r = 0; r < kRows; ++r) x |= kept[r];
      return x;
    }();
#pragma unroll 1
    for (int j0 = 0; j0 < kGroup; j0 += kVBatch) {
      if (((any_kept >> j0) & ((1ull << kVBatch) - 1)) == 0) continue;  // warp-uniform
      RawElems<Elem, kDL> raw[kVBatch];  // the batch's V rows, all loads issued before the first is used
#pragma unroll
      for (int jj = 0; jj < kVBatch; ++jj) {
        const int kj = __shfl_sync(0xffffffffu, key, j0 + jj);
        if ((any_kept >> (j0 + jj)) & 1u) {
          raw[jj].load(head.v + int64_t(kj) * p.v_row_stride + lane * kDL);
        } else {
          raw[jj].clear();
        }
      }
      // V rows without an inf or NaN (the batch's raw words, warp-wide): a dropped key's P is 0 and adds nothing, so
      // every row takes P v without a test.
      uint32_t halves = 0;
#pragma unroll
      for (int jj = 0; jj < kVBatch; ++jj) {
#pragma unroll
        for (int i = 0; i < RawElems<Elem, kDL>::kWords; ++i) halves |= nonfinite_halves<Elem>(raw[jj].w[i]);
      }
      if (!__any_sync(0xffffffffu, (halves & kNonfiniteBits) != 0)) {
#pragma unroll
        for (int jj = 0; jj < kVBatch; ++jj) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const float pj = __shfl_sync(0xffffffffu, s[r], j0 + jj);
#pragma unroll
            for (int d = 0; d < kDL; ++d) acc[r][d] = fmaf(pj, raw[jj][d], acc[r][d]);
          }
        }
        continue;
      }
#pragma unroll
      for (int jj = 0; jj < kVBatch; ++jj) {
        const int j = j0 + jj;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float pj = __shfl_sync(0xffffffffu, s[r], j);
          if ((kept[r] >> j) & 1u) {
#pragma unroll
            for (int d = 0; d < kDL; ++d) {
              const float v = raw[jj][d];
              acc[r][d] += is_nonfinite(v) ? v : pj * v;
            }
          }
        }
      }
    }
  }

  // Merge the warps: out = sum_w exp(max_w - M) acc_w / sum_w exp(max_w - M) sum_w, M = max_w max_w (NaN
  // propagates); a row no warp saw a key of is empty (out 0, lse -inf).
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float sum = warp_sum(row_sum[r]);
    if (lane == 0) s_max[warp][r] = row_max[r], s_sum[warp][r] = sum;
  }
  __syncthreads();
  // Each lane rescales its dims by its warp's weight exp(max_w - M) now; the weighted outputs then add up in
  // s_out, half the warps writing and half adding at a time.
  float weight[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = max_nan(m, s_max[w][r]);
    const float m_use = m == -INFINITY ? 0.f : m;
    weight[r] = exp2_ftz((row_max[r] - m_use) * kLog2e);
  }
  const int half = kWarps / 2;
  if (warp >= half) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int d = 0; d < kDL; ++d) s_out[warp - half][r][lane * kDL + d] = weight[r] * acc[r][d];
    }
  }
  __syncthreads();
  if (warp < half) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int d = 0; d < kDL; ++d) s_out[warp][r][lane * kDL + d] += weight[r] * acc[r][d];
    }
  }
  __syncthreads();
  float* lse_ptr = p.lse + (int64_t(b) * p.heads + h) * p.q_len;
  for (int e = tid; e < q_len * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = max_nan(m, s_max[w][r]);
    const bool empty = m == -INFINITY;
    const float m_use = empty ? 0.f : m;
    float total = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += exp2_ftz((s_max[w][r] - m_use) * kLog2e) * s_sum[w][r];
#pragma unroll
    for (int w = 0; w < half; ++w) o += s_out[w][r][d];
    store(head.out + int64_t(r) * p.o_row_stride + d, empty ? 0.f : o / total);
    if (d == 0) lse_ptr[r] = empty ? -INFINITY : m + logf(total);
  }
}

template <int kD, bool kIsBF16>
cudaError_t launch_rows(const FwdParams& p, cudaStream_t stream) {
  const dim3 grid(p.heads, 1, p.batch);
  if (p.q_len <= 4) {
    flash_fwd_key_list_rows_kernel<kD, kIsBF16, 4><<<grid, kThreads, 0, stream>>>(p);
  } else {
    flash_fwd_key_list_rows_kernel<kD, kIsBF16, kKeyListRowsMax><<<grid, kThreads, 0, stream>>>(p);
  }
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
