// The rows the Hopper forward marks with lse = +inf (flash_fwd_sm90_mainloop.cuh: an inf or NaN of V reached the
// row through P V, possibly through the exact-zero weight of a dropped key, 0 * NaN), recomputed over their kept
// keys only (the row's range, and its mask where the forward served a key-list call's dense units): out and lse
// exactly as the sm80 kernels give them. One warp per marked row, keys in order, lanes over D (an online softmax in
// fp32); a pass over the lse finds the rows, so a call without such rows costs one read of it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "cuda/bias_element.cuh"
#include "cuda/half_float.cuh"
#include "cuda/sm90/flash_fwd_sm90.h"
#include "cuda/fast_exp2.cuh"
#include "log_constants.h"

namespace dmattn {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 256 / 32;  // head dims up to 256

template <class T>
__global__ void __launch_bounds__(kWarps * 32) exact_rows_kernel(FwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.batch) * p.heads * p.q_len;
  const int64_t warp = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  for (int64_t base = warp * 32; base < rows; base += warps * 32) {
    const int64_t mine = base + lane;
    unsigned marked = __ballot_sync(0xffffffffu, mine < rows && p.lse[mine] == INFINITY);
    while (marked != 0) {
      const int64_t row = base + __ffs(marked) - 1;
      marked &= marked - 1;
      // lse is [B, H, Lq]: row = (b * H + h) * Lq + i.
      const int i = int(row % p.q_len), h = int((row / p.q_len) % p.heads), b = int(row / (int64_t(p.q_len) * p.heads));
      const int hk = h / p.group;
      const T* qr =
          q + b * p.q_batch_stride + int64_t(i) * p.q_row_stride + int64_t(h / p.q_head_div) * p.q_head_stride;
      const T* kb = k + b * p.k_batch_stride + int64_t(hk) * p.k_head_stride;
      const T* vb = v + b * p.v_batch_stride + int64_t(hk) * p.v_head_stride;
      float qv[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int d = lane + 32 * e;
        qv[e] = d < p.head_dim ? to_f32(qr[d]) : 0.f;
        acc[e] = 0.f;
      }
      // The row's keys: its bounds (which fold causality in: is_causal is false with them), or 0 .. Lk - 1 up to the
      // causal limit.
      RowRange range{0, p.kv_len, 0, nullptr};
      if (p.bounds.present()) range = p.bounds.range(b, i);
      else if (p.is_causal) range.hi = min(p.kv_len, i + p.kv_len - p.q_len + 1);
      float m = -INFINITY, sum = 0.f;
      for (int j = range.lo; j < range.hi; ++j) {
        if (!range.keeps(j)) continue;
        if (p.mask != nullptr && p.mask[b * p.mask_batch_stride + int64_t(h / p.mask_hdiv) * p.mask_head_stride +
                                        int64_t(i) * p.mask_row_stride + int64_t(j) * p.mask_col_stride] == 0)
          continue;  // a key the mask drops (the dense units of a key-list call)
        float x = 0.f;
#pragma unroll
        for (int e = 0; e < kMaxPerLane; ++e) {
          const int d = lane + 32 * e;
          if (d < p.head_dim) x = fmaf(qv[e], to_f32(kb[int64_t(j) * p.k_row_stride + d]), x);
        }
#pragma unroll
        for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
        float s = p.softcap > 0.f ? p.softcap * tanhf(x * p.scale / p.softcap) : x * p.scale;
        if (p.bias != nullptr) {
          const int64_t off = b * p.bias_batch_stride + int64_t(h / p.bias_hdiv) * p.bias_head_stride +
                              int64_t(i) * p.bias_row_stride + int64_t(j) * p.bias_col_stride;
          const float bv = load_bias(p.bias, off, p.bias_dtype);
          s = add_bias(s, bv);
        }
        if (s == -INFINITY) continue;  // a dropped key contributes nothing, whatever its values
        const float m_new = fmaxf(m, s);
        const float corr = exp2_ftz((m - m_new) * kLog2e);
        const float w = exp2_ftz((s - m_new) * kLog2e);
        m = m_new;
        sum = sum * corr + w;
#pragma unroll
        for (int e = 0; e < kMaxPerLane; ++e) {
          const int d = lane + 32 * e;
          if (d < p.head_dim) acc[e] = fmaf(w, to_f32(vb[int64_t(j) * p.v_row_stride + d]), acc[e] * corr);
        }
      }
      T* orow = out + b * p.o_batch_stride + int64_t(i) * p.o_row_stride + int64_t(h) * p.o_head_stride;
      const bool empty = sum == 0.f;
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int d = lane + 32 * e;
        if (d < p.head_dim) orow[d] = from_f32<T>(empty ? 0.f : acc[e] / sum);
      }
      if (lane == 0) p.lse[row] = empty ? -INFINITY : m + logf(sum);
    }
  }
}

}  // namespace

cudaError_t launch_flash_fwd_exact_rows(const FwdParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.heads * p.q_len;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((rows + kWarps * 32 - 1) / (kWarps * 32), 4096);
  if (p.is_bf16) exact_rows_kernel<__nv_bfloat16><<<int(blocks), kWarps * 32, 0, stream>>>(p);
  else exact_rows_kernel<__half><<<int(blocks), kWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dmattn
