// Plain (CuTe-free) interface of the key-list CUDA backward: its parameter block and launchers.
// Included by the FFI handler TU (csrc/ffi/cuda_bwd_handler.cc), which must not see CuTe headers.
//
// The key-list backward is parallel over query tiles: one CTA per (query tile, query head, batch) walks the live
// keys of its tile's key-list unit (csrc/cuda/key_lists.h) 64 at a time, accumulates dQ in registers and adds
// dK, dV (and a query-broadcast dbias) with fp32 atomics, or, in deterministic mode, with 64-bit fixed-point
// integer atomics (order-independent, bitwise reproducible). See docs/cuda_backward.md, "Key-list path" and
// "Deterministic key-list path".
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "cuda/flash_bwd.h"
#include "kernel_facts.h"

namespace dmattn {

// Where a CTA finds the key list and the bit words of its rows (the layout of csrc/cuda/key_lists.h).
struct BwdKeyLists {
  // count (or kKeyListDense: walk every key, read the mask from base.mask), then the live keys ascending
  const int32_t* keys = nullptr;   // [units, keys_stride]
  const uint64_t* bits = nullptr;  // [units, chunks, rows_per_unit]
  // unit = b * unit_batch_stride + (h / mask_hdiv) * unit_head_stride + (rows_full ? row / 128 : 0)
  int64_t unit_batch_stride = 0, unit_head_stride = 0;
  int mask_hdiv = 1;
  bool rows_full = false;          // the mask has Lq rows (else one row, broadcast over queries)
  int64_t keys_stride = 0;         // 1 + capacity
  int64_t chunks = 0;              // capacity / 64
  int64_t rows_per_unit = 0;       // min(Mm, 128)
};

// Deterministic mode (docs/cuda_backward.md, "Deterministic key-list path"): dK, dV and dbias partials are added as
// int64 counts of a per-call power-of-two resolution (csrc/cuda/bwd_fixed_point.cuh). The stats words, zeroed
// with the accumulators, receive max|q|, max|v|, max|dout|, max|delta| (fp32 bit patterns of non-negative values,
// reduced with atomicMax: order-independent) and a flag set by the kernel on a non-finite / out-of-range partial.
enum FixedStat : int {
  kFixedMaxQ = 0,
  kFixedMaxV = 1,
  kFixedMaxDout = 2,
  kFixedMaxDelta = 3,
  kFixedBad = 4,  // the words up to kFixedStatsWords (kernel_facts.h) pad the workspace tail
};

struct BwdFixedPoint {
  unsigned long long* dk = nullptr;     // [B, Lk, Hkv, D] int64 counts; nullptr: fp32 atomics (not deterministic)
  unsigned long long* dv = nullptr;     // [B, Lk, Hkv, D]
  unsigned long long* dbias = nullptr;  // bias's element count, when dbias is computed (dbias_mode != kDbiasNone)
  uint32_t* stats = nullptr;            // [kFixedStatsWords]
  double rows_kv = 0;     // rows summed into one key's dK / dV: Lq * H / Hkv
  double rows_dbias = 0;  // rows summed into one dbias entry: Lq * (B / Bb) * (H / Hb)
};

struct BwdKeyListParams {
  // q, k, v, out, dout, lse, dlse, dq, dk, dv, delta, shapes, scale, softcap, causal; bias (only one with a
  // broadcast query dim, Mb == 1) with its strides and dbias_mode (kDbiasNone: key-broadcast bias, zero dbias;
  // otherwise dbias columns are added atomically into dbias_accum). mask and its strides are read only by the
  // CTAs of dense units (more live keys than the list capacity: csrc/cuda/mask_words.cuh), which walk every key
  // and read the mask's bytes themselves; classes / dq_accum are unused.
  BwdParams base;
  BwdKeyLists lists;
  float* dk_accum = nullptr;  // [B, Lk, accum_kv_heads, D] f32, zeroed, then converted into dk
  float* dv_accum = nullptr;  // [B, Lk, accum_kv_heads, D] f32, zeroed, then converted into dv
  BwdFixedPoint fixed;        // deterministic mode when fixed.dk != nullptr (then dk_accum / dv_accum are unused)
  int rows_per_cta = 0;       // 128 or 64 (key_list_bwd_has_rows); chosen by the caller from the device's limit
  // The pass over kv heads [kv_head_begin, kv_head_begin + accum_kv_heads) (kernel_facts.h:
  // key_list_bwd_accum_kv_heads): the kernels run the query heads of these kv heads only, and the accumulators hold
  // their dK / dV.
  int kv_head_begin = 0;
  int accum_kv_heads = 0;
};

// Element offset of (batch b, key, kv head kvh of the current pass, dim 0) in the dK / dV accumulators. The kernels
// pass their compile-time head dim, which keeps the address arithmetic as cheap as a plain [B, Lk, Hkv, D] index.
__host__ __device__ inline int64_t key_list_accum_offset(const BwdKeyListParams& sp, int b, int key, int kvh,
                                                         int head_dim) {
  return ((int64_t(b) * sp.base.kv_len + key) * sp.accum_kv_heads + (kvh - sp.kv_head_begin)) * head_dim;
}

// The whole key-list backward on `stream` after the key lists are built: delta, (deterministic mode: the maxima of
// the fixed-point bounds), then per pass over kv heads the zero-fill of the accumulators, the key-list kernel and
// the conversions into dk / dv; last the dbias conversion. Nothing is allocated, nothing synchronises.
cudaError_t launch_flash_bwd_key_list(const BwdKeyListParams& params, cudaStream_t stream);

// The key-list kernel of one (head dim, dtype), defined in the generated flash_bwd_key_list_hdim<D>.cu
// (cmake/Cuda.cmake).
template <int kHeadDim, bool kIsBF16>
cudaError_t run_flash_bwd_key_list(const BwdKeyListParams& params, cudaStream_t stream);

}  // namespace dmattn
