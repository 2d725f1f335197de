// The CUDA forward's FFI handler. This translation unit must not include CuTe (its headers break the FFI headers'
// warnings setup): kernels are reached through the plain launch functions in csrc/cuda/*.h.
// Handlers never allocate and never synchronise, so they run inside CUDA graphs / command buffers.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "attention_params.h"
#include "cuda/flash_fwd.h"
#include "cuda/key_lists.h"
#include "ffi/cuda_handler_common.h"
#include "ffi/row_bounds_operands.h"
#include "ffi/targets.h"

namespace ffi = xla::ffi;

namespace dmattn {
namespace {

// q [B, Lq, H / q_head_repeat, D], or [B, H / q_head_repeat, Lq, D] with q_heads_first (query head h reads q's head
// h / q_head_repeat; both only with key lists given without a mask), k/v [B, Lk, Hkv, D]; bias [Bb, Hb, Mb, Nb] or
// zero-size; mask bool of the same rule or zero-size; with key_lists, the mask's live-key lists and bit words built
// by dmattn_key_lists_cuda (int32 [units * (1 + C)], uint64 words as u32 pairs [2 * units * C / 64 * min(Mm, 128)];
// zero-size otherwise). They are inputs, not built here, so that XLA's CSE can share one pre-pass between the
// forward, the backward and layers with the same mask. Returns out [B, Lq, H, D], lse [B, H, Lq] f32 and, off the
// list path, the mask tile classes [Bm, Hm, ceil(Mm / 128), ceil(Nm / 64)] uint8 (workspace; zero-size without a
// mask or with lists).
ffi::Error flash_fwd_impl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::AnyBuffer bias, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> key_lists,
                          ffi::Buffer<ffi::U32> key_bits, ffi::AnyBuffer bound_rows, ffi::AnyBuffer key_segments,
                          ffi::Result<ffi::AnyBuffer> out,
                          ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::U8> classes, float scale,
                          float softcap, bool is_causal, bool skip_empty_tiles, bool use_key_lists,
                          int64_t list_batch, int64_t list_heads, int64_t list_rows, int64_t q_head_repeat,
                          bool q_heads_first) {
  count_cuda_handler_run(stream);
  constexpr const char* kTarget = "dmattn_fwd_cuda";
  QkvDims s;
  FwdParams p;
  BroadcastOperand bias_op;
  if (auto e = set_call_params(kTarget, q, k, v, bias, bound_rows, key_segments, scale, softcap, is_causal, s, p,
                               bias_op, q_head_repeat, q_heads_first);
      e.failure())
    return e;
  // Only the key-list kernels read q through head_operands (q_head_div); lists without a mask reach only them.
  if ((q_head_repeat > 1 || q_heads_first) && list_rows == 0)
    return ffi::Error::InvalidArgument(
        "dmattn_fwd_cuda: q_head_repeat > 1 and q_heads_first need key lists given without a mask");
  if (out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("dmattn_fwd_cuda: out must have q's dtype");
  const int64_t Lq = s.Lq, H = s.H, D = s.D, Lk = s.Lk, Hkv = s.Hkv;

  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  const int64_t Hq = H / q_head_repeat;  // q's own heads
  p.q_row_stride = q_heads_first ? D : Hq * D, p.q_head_stride = q_heads_first ? Lq * D : D;
  p.q_batch_stride = Lq * Hq * D;
  p.q_head_div = static_cast<int>(q_head_repeat);
  p.k_row_stride = Hkv * D, p.k_head_stride = D, p.k_batch_stride = Lk * Hkv * D;
  p.v_row_stride = Hkv * D, p.v_head_stride = D, p.v_batch_stride = Lk * Hkv * D;
  p.o_row_stride = H * D, p.o_head_stride = D, p.o_batch_stride = Lq * H * D;
  p.skip_empty_tiles = skip_empty_tiles;

  if (p.bounds.present() && use_key_lists)
    return ffi::Error::InvalidArgument("dmattn_fwd_cuda: row bounds are taken on the tile path only");

  const bool has_mask = mask.element_count() > 0;
  // Lists given without a mask (a compact mask, jax_dmattn/_compact.py) describe their units by the list_*
  // attributes instead of the mask's shape, and never hold a dense unit.
  const bool compact = list_rows > 0;
  if (compact && (!use_key_lists || has_mask))
    return ffi::Error::InvalidArgument("dmattn_fwd_cuda: list_rows > 0 means key lists without a mask");
  if (use_key_lists && !has_mask && !compact)
    return ffi::Error::InvalidArgument("dmattn_fwd_cuda: key lists need a mask or their list_* geometry");
  if (!use_key_lists && (key_lists.element_count() != 0 || key_bits.element_count() != 0))
    return ffi::Error::InvalidArgument("dmattn_fwd_cuda: key list inputs must be zero-size unless key_lists");
  if (has_mask) {
    BroadcastOperand op;
    if (auto e = set_mask_params(kTarget, mask, s, p, op); e.failure()) return e;
    if (use_key_lists && op.cols != Lk)
      return ffi::Error::InvalidArgument("dmattn_fwd_cuda: key lists need a full key dim");
  }
  // Lists over units of the geometry dims = [Bm, Hm, Mm, Lk] (the mask's shape, or a compact mask's list_*).
  auto launch_with_key_lists = [&](const int64_t dims[4]) -> ffi::Error {
    KeyListArgs largs;
    if (auto e = key_list_capacity_from_sizes("dmattn_fwd_cuda", dims, key_lists.element_count(),
                                              key_bits.element_count(), largs);
        e.failure())
      return e;
    if (Lq == 0) return ffi::Error::Success();
    // The kernel also reads p.mask (set above) for units whose live keys exceed the capacity (marked dense);
    // compact lists have none.
    const int64_t mt = largs.m_tiles();
    p.key_lists = key_lists.typed_data();
    p.key_bits = reinterpret_cast<const uint64_t*>(key_bits.typed_data());
    p.kl_batch_stride = dims[0] == 1 ? 0 : dims[1] * mt;
    p.kl_head_stride = dims[1] == 1 ? 0 : mt;
    p.kl_m_stride = dims[2] == 1 ? 0 : 1;
    p.kl_keys_stride = largs.keys_stride();
    p.kb_rows = static_cast<int>(largs.rows_per_unit());
    p.kb_unit_stride = largs.chunks() * largs.rows_per_unit();
    return cuda_error(launch_flash_fwd(p, stream), "flash_fwd");
  };
  if (has_mask && use_key_lists) {
    const auto md = mask.dimensions();
    const int64_t dims[4] = {md[0], md[1], md[2], md[3]};
    return launch_with_key_lists(dims);
  }
  if (compact) {
    const int64_t dims[4] = {list_batch, list_heads, list_rows, Lk};
    if (auto e = check_broadcast_dims(kTarget, "key-list geometry", dims, s); e.failure()) return e;
    p.mask_hdiv = static_cast<int>(H / list_heads);
    return launch_with_key_lists(dims);
  }
  if (has_mask) {
    const auto md = mask.dimensions();
    const int64_t dims[4] = {md[0], md[1], md[2], md[3]};
    if (auto e = set_tile_class_params(kTarget, mask, dims, kFwdBlockM, kFwdBlockN, *classes, stream, p);
        e.failure())
      return e;
  }
  if (Lq == 0) return ffi::Error::Success();
  return cuda_error(launch_flash_fwd(p, stream), "flash_fwd");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashFwdCuda, flash_fwd_impl,
                              bind_attention_operands()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // live-key lists (zero-size: tile path)
                                  .Arg<ffi::Buffer<ffi::U32>>()  // their mask bit words (zero-size: tile path)
                                  .Arg<ffi::AnyBuffer>()  // row bounds (zero-size: none)
                                  .Arg<ffi::AnyBuffer>()  // key segment ids (zero-size: none)
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Ret<ffi::Buffer<ffi::U8>>()  // mask tile classes (workspace / residual)
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("is_causal")
                                  .Attr<bool>("skip_empty_tiles")
                                  .Attr<bool>("key_lists")
                                  .Attr<int64_t>("list_batch")  // unit geometry of compact lists (0: none)
                                  .Attr<int64_t>("list_heads")
                                  .Attr<int64_t>("list_rows")
                                  .Attr<int64_t>("q_head_repeat")  // query heads per head of q
                                  .Attr<bool>("q_heads_first"),    // q [B, Hq, Lq, D]
                              {ffi::Traits::kCmdBufferCompatible});

namespace {
std::atomic<int64_t> handler_runs{0}, captured_handler_runs{0};
}  // namespace

void count_cuda_handler_run(cudaStream_t stream) {
  handler_runs.fetch_add(1, std::memory_order_relaxed);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) == cudaSuccess && status == cudaStreamCaptureStatusActive)
    captured_handler_runs.fetch_add(1, std::memory_order_relaxed);
}

CudaHandlerRuns cuda_handler_runs() {
  return {handler_runs.load(std::memory_order_relaxed), captured_handler_runs.load(std::memory_order_relaxed)};
}

std::vector<FfiTarget> cuda_fwd_targets() {
  return {
      {"dmattn_fwd_cuda", reinterpret_cast<void*>(kFlashFwdCuda)},
  };
}

}  // namespace dmattn
