// Plain (CuTe-free) interface of the CUDA flash forward: the parameter block and the launcher. Included by the
// FFI handler TU, which must not see CuTe headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/flash_params.h"
#include "kernel_facts.h"

namespace dmattn {

struct FwdParams : CallParams {
  // out [B, Lq, H, D] (q's dtype), lse [B, H, Lq] f32; element strides of q, k, v and out.
  void* out = nullptr;
  float* lse = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  bool skip_empty_tiles = true;  // false: every mask tile is treated as partial (for bitwise tests)
  // Query heads per head of q: query head h reads q's head h / q_head_div (a decoding step's key parts run as query
  // heads that share their q, jax_dmattn/_decode.py). 1 but for key lists given without a mask.
  int q_head_div = 1;

  // Live-key lists of the mask (csrc/cuda/key_lists.h); when set the kernel walks them instead of key tiles.
  // Unit of (b, h, query tile) = b * kl_batch_stride + (h / mask_hdiv) * kl_head_stride + m * kl_m_stride.
  // A unit whose first word is kKeyListDense walks every key and reads the mask (p.mask) itself.
  const int32_t* key_lists = nullptr;  // [units, kl_keys_stride]
  const uint64_t* key_bits = nullptr;  // [units, capacity / 64, kb_rows]
  int64_t kl_batch_stride = 0, kl_head_stride = 0, kl_m_stride = 0;
  int64_t kl_keys_stride = 0;  // 1 + capacity
  int64_t kb_unit_stride = 0;  // capacity / 64 * kb_rows
  int kb_rows = 0;             // rows per unit: 128, or 1 for a row-broadcast mask
  // The Hopper forward computes the units that key_list_unit_on_tiles picks (flash_fwd_sm90_serves_tile_units):
  // key-list CTAs of those units leave at once.
  bool tile_units_apart = false;
};

// The operands of (batch b, query head h) at row 0, addressed with the call's row strides: out of the head, q of its
// q head (h / q_head_div), k and v of its kv head (h / group).
template <class Elem>
struct HeadOperands {
  const Elem* q;
  const Elem* k;
  const Elem* v;
  Elem* out;
};

template <class Elem>
__host__ __device__ inline HeadOperands<Elem> head_operands(const FwdParams& p, int b, int h) {
  const int hk = h / p.group;
  return {static_cast<const Elem*>(p.q) + b * p.q_batch_stride + (h / p.q_head_div) * p.q_head_stride,
          static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride,
          static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride,
          static_cast<Elem*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride};
}

// Launches the forward for params.head_dim in {32, 64, 96, 128, 192, 256} and params.is_bf16.
cudaError_t launch_flash_fwd(const FwdParams& params, cudaStream_t stream);

// One instantiation per (head dim, dtype), defined in the generated flash_fwd_hdim<D>.cu (cmake/Cuda.cmake).
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_fwd(const FwdParams& params, cudaStream_t stream);

}  // namespace dmattn
