// Which calls the Hopper forwards (no mask; key lists) serve, and their head-dim / dtype dispatch (no CuTe here:
// the kernels live in the generated flash_fwd_sm90_hdim*.cu and flash_fwd_key_list_sm90_hdim*.cu).
#include <atomic>
#include <climits>
#include <cstdint>

#include "cuda/key_lists.h"
#include "cuda/sm90/flash_fwd_sm90.h"
#include "cuda/sm90/mask_tile_map.h"
#include "cuda/sm90/sm90_route.h"

namespace dmattn {
namespace {

// A TMA global stride (elements of 2 bytes): a 16-byte multiple, and an int for the CuTe strides.
bool tma_stride(int64_t s) { return s >= 0 && s % 8 == 0 && s <= INT_MAX; }

bool tma_base(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

std::atomic<int64_t> g_launches{0};
std::atomic<int64_t> g_key_list_launches{0};
std::atomic<int64_t> g_tile_unit_launches{0};

// The call's shapes and operands suit the Hopper forward's TMA loads and stores.
bool sm90_tile_operands_ok(const FwdParams& p) {
  if (!has_head_dim(kSm90FwdHeadDims, p.head_dim)) return false;
  if (p.q_len == 0 || p.kv_len == 0 || p.lse == nullptr) return false;
  const int64_t g = p.group;
  for (int64_t s : {p.q_row_stride, p.q_batch_stride, p.q_head_stride, p.q_head_stride * g, p.k_row_stride,
                    p.k_batch_stride, p.k_head_stride, p.v_row_stride, p.v_batch_stride, p.v_head_stride,
                    p.o_row_stride, p.o_batch_stride, p.o_head_stride})
    if (!tma_stride(s)) return false;
  if (int64_t(p.heads) * p.q_len > INT_MAX) return false;  // the LSE's batch stride
  return tma_base(p.q) && tma_base(p.k) && tma_base(p.v) && tma_base(p.out);
}

}  // namespace

bool flash_fwd_sm90_serves(const FwdParams& p) {
  if (p.mask != nullptr || p.key_lists != nullptr || p.classes != nullptr) return false;
  return sm90_tile_operands_ok(p) && sm90_kernels_route_open();
}

bool flash_fwd_sm90_serves_tile_units(const FwdParams& p) {
  if (p.key_lists == nullptr || p.mask == nullptr || p.bounds.present() || p.classes != nullptr) return false;
  return sm90::mask_tile_map_fits(p) && sm90_tile_operands_ok(p) && sm90_kernels_route_open();
}

int64_t flash_fwd_sm90_launches() { return g_launches.load(std::memory_order_relaxed); }
int64_t flash_fwd_sm90_tile_unit_launches() { return g_tile_unit_launches.load(std::memory_order_relaxed); }

namespace {

// The Hopper forward over the call (or, with key lists, over its dense units), then the exact rows.
cudaError_t run_sm90_tiles(const FwdParams& p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
#define DMATTN_FWD_SM90_CASE(D) \
  case D:                       \
    err = p.is_bf16 ? run_flash_fwd_sm90<D, true>(p, stream) : run_flash_fwd_sm90<D, false>(p, stream); \
    break;
  switch (p.head_dim) {
    DMATTN_FOR_EACH_SM90_HEAD_DIM(DMATTN_FWD_SM90_CASE)
    default:
      break;
  }
#undef DMATTN_FWD_SM90_CASE
  return err != cudaSuccess ? err : launch_flash_fwd_exact_rows(p, stream);
}

}  // namespace

cudaError_t launch_flash_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  g_launches.fetch_add(1, std::memory_order_relaxed);
  return run_sm90_tiles(p, stream);
}

bool flash_fwd_key_list_sm90_serves(const FwdParams& p) {
  return p.key_lists != nullptr && has_head_dim(kSm90FwdHeadDims, p.head_dim) && sm90_kernels_route_open();
}

int64_t flash_fwd_key_list_sm90_launches() { return g_key_list_launches.load(std::memory_order_relaxed); }

cudaError_t launch_flash_fwd_key_list_sm90(const FwdParams& p, cudaStream_t stream) {
  g_key_list_launches.fetch_add(1, std::memory_order_relaxed);
  // Dense units (more live keys than a list holds) and lists of most of their visible keys go to the Hopper forward,
  // which streams their K / V tiles and mask bytes through its pipelines; the key-list kernel then skips them
  // (key_list_unit_on_tiles). The units' counts are known on the device only, so both kernels cover the whole grid
  // and each CTA checks its unit's.
  FwdParams lists = p;
  const bool tile_units_apart = flash_fwd_sm90_serves_tile_units(p) &&
                                key_list_call_may_hold_tile_units(p.kv_len, p.kl_keys_stride - 1);
  lists.tile_units_apart = tile_units_apart;
  cudaError_t err = cudaErrorInvalidValue;
#define DMATTN_FWD_KEY_LIST_SM90_CASE(D) \
  case D:                                \
    err = lists.is_bf16 ? run_flash_fwd_key_list_sm90<D, true>(lists, stream) \
                        : run_flash_fwd_key_list_sm90<D, false>(lists, stream); \
    break;
  switch (p.head_dim) {
    DMATTN_FOR_EACH_SM90_HEAD_DIM(DMATTN_FWD_KEY_LIST_SM90_CASE)
    default:
      break;
  }
#undef DMATTN_FWD_KEY_LIST_SM90_CASE
  if (err != cudaSuccess || !tile_units_apart) return err;
  g_tile_unit_launches.fetch_add(1, std::memory_order_relaxed);
  return run_sm90_tiles(p, stream);
}

}  // namespace dmattn
