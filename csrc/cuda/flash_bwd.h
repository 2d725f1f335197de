// Plain (CuTe-free) interface of the CUDA flash backward: the parameter block and the launchers. Included by
// the FFI handler TU (csrc/ffi/cuda_bwd_handler.cc), which must not see CuTe headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/flash_params.h"
#include "kernel_facts.h"

namespace dmattn {

// How the main kernel writes dbias.
enum DbiasMode : int {
  kDbiasNone = 0,    // no bias, or a bias broadcast along keys (its gradient is exactly 0: zero-filled)
  kDbiasDirect = 1,  // every dbias tile is finished by one flush: store it in the bias dtype
  kDbiasAccum = 2,   // a tile gets several flushes (batch / head broadcast): read-modify-write an fp32 buffer
};

struct BwdParams : CallParams {
  // Canonical contiguous layouts: q, out, dout, dq [B, Lq, H, D]; k, v, dk, dv [B, Lk, Hkv, D];
  // lse, dlse, delta [B, H, Lq] f32; dq_accum [B, Lq, H, D] f32.
  const void* out = nullptr;
  const void* dout = nullptr;
  const float* lse = nullptr;
  const float* dlse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dq_accum = nullptr;  // fp32 dq accumulator (atomics); unused when deterministic
  float* delta = nullptr;     // rowsum(dout * out) - dlse, written by the preprocess kernel
  // Hopper routes only (csrc/cuda/sm90/flash_bwd_sm90.h), else nullptr: one word, set by the non-finite scan when q,
  // dout or k holds an inf or NaN. The Hopper kernel then does nothing and the sm80 kernel of the same path (main or
  // key-list), which keeps such values out of the pairs that drop them, runs instead; it does nothing while the
  // word is 0.
  uint32_t* nonfinite = nullptr;

  bool deterministic = false;  // dq by a separate query-tile-parallel kernel instead of atomics

  // dbias (bias's shape and dtype: bias_size = Bb * Hb * Mb * Nb elements), and the fp32 accumulation target of
  // kDbiasAccum (the dbias buffer itself for an f32 bias, else an fp32 workspace of bias's shape converted at the
  // end).
  int64_t bias_size = 0;
  void* dbias = nullptr;
  float* dbias_accum = nullptr;
  int dbias_mode = kDbiasNone;
  // A CTA covers this many batches / kv heads so that it owns whole dbias columns (no atomics).
  int batches_per_item = 1, kv_heads_per_item = 1;
};

// Runs the whole backward on `stream` (the preprocess, the main kernel, the deterministic dq kernel or the dq
// conversion, the dbias conversion). Buffers are XLA's: nothing is allocated, nothing synchronises. The
// caller has already written the tile-class map.
cudaError_t launch_flash_bwd(const BwdParams& params, cudaStream_t stream);

// Pieces of the launch sequence shared with the key-list backward (csrc/cuda/flash_bwd_key_list.h). The preprocess:
// delta = rowsum(dout * out) - dlse into params.delta, in one pass over the rows of out and dout that also zeroes
// `dq_zero` ([B, Lq, H, D] fp32, nullptr: none) and, with `scan_nonfinite` (the Hopper routes), zeroes
// *params.nonfinite and sets it when q, dout or k holds an inf or NaN. Then an fp32 -> bf16 / f16 conversion of n
// elements.
cudaError_t launch_bwd_preprocess(const BwdParams& params, float* dq_zero, bool scan_nonfinite, cudaStream_t stream);
cudaError_t launch_f32_to_half(const float* src, void* dst, int64_t n, bool to_bf16, cudaStream_t stream);

// The main and dq kernels of one (head dim, dtype), defined in the generated flash_bwd_hdim<D>.cu (cmake/Cuda.cmake).
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_main(const BwdParams& params, cudaStream_t stream);
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_dq(const BwdParams& params, cudaStream_t stream);

}  // namespace dmattn
