// Which calls the Hopper backwards (key tiles; key lists) serve, and their head-dim / dtype dispatch (no CuTe here: the
// kernels live in the generated flash_bwd_sm90_hdim*.cu and flash_bwd_key_list_sm90_hdim*.cu).
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda/sm90/flash_bwd_sm90.h"
#include "cuda/sm90/sm90_route.h"

namespace dmattn {
namespace {

std::atomic<int64_t> g_launches{0};
std::atomic<int64_t> g_key_list_launches{0};

// A bias with query rows: q's 16-bit dtype, rows in 16-byte pieces (the tiles' cp.async copies), and a dbias whose
// every element one CTA finishes (one batch element and one kv head per CTA: the bias's batch is not broadcast over
// several, and the query heads of a bias head lie in one GQA group); S starts from bias / scale, so the scale must
// have a finite inverse.
bool row_bias_fits(const BwdParams& p) {
  return bias_rows_in_16_byte_pieces(p) && p.bias_dtype == (p.is_bf16 ? DType::kBF16 : DType::kF16) &&
         (reinterpret_cast<uintptr_t>(p.dbias) & 15) == 0 && p.dbias_mode == kDbiasDirect && p.batches_per_item == 1 &&
         p.kv_heads_per_item == 1 && p.group % p.bias_hdiv == 0 && p.scale != 0.f && std::isfinite(1.f / p.scale);
}

// A bool mask, read by the masked instantiation (a bias with query rows, no row bounds) in 16-byte chunks of 16 keys
// (mask_rows_in_16_byte_pieces), Lk a multiple of 16 so that no chunk straddles the sequence end.
bool mask_fits(const BwdParams& p) {
  return p.bias != nullptr && p.bias_row_stride != 0 && !p.bounds.present() && mask_rows_in_16_byte_pieces(p) &&
         p.kv_len % 16 == 0;
}

}  // namespace

bool flash_bwd_sm90_serves(const BwdParams& p) {
  if (p.softcap > 0.f || p.deterministic) return false;
  if (p.mask != nullptr ? !mask_fits(p) : p.classes != nullptr) return false;
  if (p.bias != nullptr && p.bias_row_stride != 0 && !row_bias_fits(p)) return false;
  if (!has_head_dim(kSm90BwdHeadDims, p.head_dim) || p.q_len == 0 || p.kv_len == 0 || p.dq_accum == nullptr)
    return false;
  // Batch strides of the canonical layouts as ints (the TMA descriptors' CuTe strides).
  if (int64_t(p.q_len) * p.heads * p.head_dim > INT_MAX || int64_t(p.kv_len) * p.kv_heads * p.head_dim > INT_MAX)
    return false;
  return sm90_kernels_route_open();
}

int64_t flash_bwd_sm90_launches() { return g_launches.load(std::memory_order_relaxed); }

cudaError_t launch_flash_bwd_sm90(const BwdParams& p, cudaStream_t stream) {
  g_launches.fetch_add(1, std::memory_order_relaxed);
#define DMATTN_BWD_SM90_CASE(D) \
  case D:                       \
    return p.is_bf16 ? run_flash_bwd_sm90<D, true>(p, stream) : run_flash_bwd_sm90<D, false>(p, stream);
  switch (p.head_dim) {
    DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM(DMATTN_BWD_SM90_CASE)
    default:
      return cudaErrorInvalidValue;
  }
#undef DMATTN_BWD_SM90_CASE
}

bool flash_bwd_key_list_sm90_serves(const BwdKeyListParams& sp) {
  return sp.base.softcap == 0.f && sp.base.nonfinite != nullptr && has_head_dim(kSm90BwdHeadDims, sp.base.head_dim) &&
         sm90_kernels_route_open();
}

int64_t flash_bwd_key_list_sm90_launches() { return g_key_list_launches.load(std::memory_order_relaxed); }

cudaError_t launch_flash_bwd_key_list_sm90(const BwdKeyListParams& sp, cudaStream_t stream) {
  g_key_list_launches.fetch_add(1, std::memory_order_relaxed);
#define DMATTN_BWD_KEY_LIST_SM90_CASE(D)                                                  \
  case D:                                                                                 \
    return sp.base.is_bf16 ? run_flash_bwd_key_list_sm90<D, true>(sp, stream)             \
                           : run_flash_bwd_key_list_sm90<D, false>(sp, stream);
  switch (sp.base.head_dim) {
    DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM(DMATTN_BWD_KEY_LIST_SM90_CASE)
    default:
      return cudaErrorInvalidValue;
  }
#undef DMATTN_BWD_KEY_LIST_SM90_CASE
}

}  // namespace dmattn
