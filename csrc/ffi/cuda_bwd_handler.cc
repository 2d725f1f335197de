// CUDA FFI handlers of the backward pass (kept apart from the forward's, csrc/ffi/cuda_fwd_handler.cc).
// No CuTe includes here: kernels are reached through plain launch functions. Handlers never allocate and never
// synchronise: every scratch buffer is an extra FFI result that XLA owns. The key-list path's live-key lists are
// inputs built by dmattn_key_lists_cuda (csrc/ffi/cuda_key_lists_handler.cc), so that a jitted forward + backward
// shares the forward's lists through XLA's CSE.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "attention_params.h"
#include "cuda/flash_bwd.h"
#include "cuda/flash_bwd_key_list.h"
#include "cuda/key_lists.h"
#include "ffi/cuda_handler_common.h"
#include "ffi/row_bounds_operands.h"
#include "ffi/targets.h"

namespace ffi = xla::ffi;

namespace dmattn {
namespace {

constexpr const char* kTarget = "dmattn_bwd_cuda";

ffi::Error bad(const std::string& what) { return ffi::Error::InvalidArgument(std::string(kTarget) + ": " + what); }

// Inputs: q [B, Lq, H, D], k/v [B, Lk, Hkv, D], bias [Bb, Hb, Mb, Nb] or zero-size, mask (same rule, bool) or
// zero-size, out [B, Lq, H, D], lse [B, H, Lq] f32, dout, dlse [B, H, Lq] f32, then on the key-list path the mask's
// live-key lists from dmattn_key_lists_cuda: key_list_keys [units * (1 + C)] s32 and key_list_bits
// [2 * units * C / 64 * min(Mm, 128)] u32 (uint64 words), C the list capacity; zero-size otherwise.
// Results: dq, dk, dv, dbias (bias's shape and dtype; zero-size without a bias), then workspaces:
// dq_accum [B, Lq, H, D] f32 (zero-size when deterministic), delta [B, H, Lq] f32, the mask tile classes
// [Bm, Hm, ceil(Mm / 64), ceil(Nm / 64)] u8 (zero-size without a mask), dbias_accum f32 of bias's shape
// (only for a bf16/f16 bias whose dbias tiles get several flushes, see docs/cuda_backward.md; else zero-size).
// Key-list path (uses_key_list_path): dq_accum and the tile classes are zero-size. With Hs the kv heads of one pass
// (kernel_facts.h: key_list_bwd_accum_kv_heads), not deterministic: dbias_accum is f32 of bias's shape for any
// bf16/f16 bias that is not key-broadcast, dkv_accum [2, B, Lk, Hs, D] f32 (dK then dV). Deterministic (fixed
// point): dbias_accum is u32 [2 * bias elements] (int64 counts) for any bias that is not key-broadcast, dkv_accum u32
// [2 * 2 * B * Lk * Hs * D + kFixedStatsWords] (int64 dK counts, int64 dV counts, the stats words). The dense path
// requires f32 for a non-empty dbias_accum. Last, nonfinite u32 [1]: the word the Hopper route's non-finite scan
// sets (csrc/cuda/flash_bwd.h).
// dq may share dout's buffer (the caller aliases them): every kernel reads a query tile's dout before it writes
// that tile's dq, and no other CTA reads those rows afterwards (docs/cuda_backward.md, "Buffers").
ffi::Error flash_bwd_impl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::AnyBuffer bias, ffi::Buffer<ffi::PRED> mask, ffi::AnyBuffer out,
                          ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> dlse,
                          ffi::Buffer<ffi::S32> key_list_keys, ffi::Buffer<ffi::U32> key_list_bits,
                          ffi::AnyBuffer bound_rows, ffi::AnyBuffer key_segments, ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                          ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> dbias,
                          ffi::ResultBuffer<ffi::F32> dq_accum, ffi::ResultBuffer<ffi::F32> delta,
                          ffi::ResultBuffer<ffi::U8> classes, ffi::Result<ffi::AnyBuffer> dbias_accum,
                          ffi::Result<ffi::AnyBuffer> dkv_accum, ffi::ResultBuffer<ffi::U32> nonfinite, float scale,
                          float softcap, bool is_causal, bool deterministic, int64_t key_list_rows,
                          int64_t list_batch, int64_t list_heads, int64_t list_rows) {
  count_cuda_handler_run(stream);
  QkvDims s;
  BwdParams p;
  BroadcastOperand bias_op;
  if (auto e = set_call_params(kTarget, q, k, v, bias, bound_rows, key_segments, scale, softcap, is_causal, s, p,
                               bias_op);
      e.failure())
    return e;
  const int64_t B = s.B, Lq = s.Lq, H = s.H, D = s.D, Lk = s.Lk, Hkv = s.Hkv;
  const auto dt = q.element_type();
  if (out.element_type() != dt || dout.element_type() != dt || dq->element_type() != dt ||
      dk->element_type() != dt || dv->element_type() != dt)
    return bad("out, dout and the gradients must have q's dtype");
  const size_t rows = static_cast<size_t>(B * H * Lq);
  if (out.element_count() != q.element_count() || dout.element_count() != q.element_count() ||
      lse.element_count() != rows || dlse.element_count() != rows || delta->element_count() != rows)
    return bad("out / dout / lse / dlse / delta have the wrong size");
  const bool has_bias = bias.element_count() > 0, has_mask = mask.element_count() > 0;
  if ((has_bias && bias.dimensions().size() != 4) || (has_mask && mask.dimensions().size() != 4))
    return bad("bias and mask must be rank 4");
  // key_list_rows: the key-list kernel's rows per CTA that the caller chose for this device (0: its shared memory
  // fits no build of the head dim, take the key-tile path; jax_dmattn/_cuda_bwd.py: key_list_rows_per_cta).
  // Lists given without a mask (a compact mask, jax_dmattn/_compact.py) describe their units by the list_*
  // attributes instead of the mask's shape, and never hold a dense unit; only the key-list path takes them.
  const bool compact = list_rows > 0;
  if (compact && has_mask) return bad("key lists of a compact mask come without a mask");
  if (compact && (!dims_ok(list_batch, B) || !(list_heads == 1 || list_heads == Hkv || list_heads == H) ||
                  !dims_ok(list_rows, Lq)))
    return bad("list_batch / list_heads / list_rows do not fit the call");
  if (compact && (key_list_rows == 0 ||
                  !uses_key_list_path(true, Lk, has_bias, has_bias ? bias.dimensions()[2] : 0, Lk)))
    return bad("key lists of a compact mask need the key-list path (key_list_rows > 0, no bias with a query dim)");
  const bool key_list_path =
      key_list_rows != 0 && (compact || uses_key_list_path(has_mask, has_mask ? mask.dimensions()[3] : 0, has_bias,
                                                      has_bias ? bias.dimensions()[2] : 0, Lk));
  if (key_list_path) {
    if (!key_list_bwd_has_rows(static_cast<int>(D), static_cast<int>(key_list_rows)))
      return bad("key_list_rows " + std::to_string(key_list_rows) + " is not built for head dim " + std::to_string(D));
    int limit = 0;
    if (auto e = max_shared_memory_optin(limit); e.failure()) return e;
    const int need = key_list_bwd_smem_bytes(static_cast<int>(D), static_cast<int>(key_list_rows));
    if (need > limit)
      return bad("the key-list backward with " + std::to_string(key_list_rows) + " rows per CTA needs " +
                 std::to_string(need) + " bytes of shared memory, this device allows " + std::to_string(limit) +
                 " (jax_dmattn chose it for a larger limit: set JAX_DMATTN_MAX_DYNAMIC_SMEM=" +
                 std::to_string(limit) + ")");
  }
  if (!key_list_path && (key_list_keys.element_count() != 0 || key_list_bits.element_count() != 0))
    return bad("key-list inputs must be zero-size off the key-list path");
  BwdFixedPoint fixed;  // deterministic key-list path: the int64 workspaces (set below)
  if (!deterministic && !key_list_path && dq_accum->element_count() != q.element_count())
    return bad("dq_accum must have q's element count unless deterministic or on the key-list path");

  p.out = out.untyped_data();
  p.dout = dout.untyped_data();
  p.lse = lse.typed_data();
  p.dlse = dlse.typed_data();
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.dq_accum = deterministic ? nullptr : dq_accum->typed_data();
  p.delta = delta->typed_data();
  if (nonfinite->element_count() != 1) return bad("nonfinite must be one u32 word");
  p.nonfinite = nonfinite->typed_data();  // read by the Hopper route only (flash_bwd.h)
  p.deterministic = deterministic;
  if (p.bounds.present() && key_list_path) return bad("row bounds are taken on the key-tile path only");

  if (bias.element_count() > 0) {
    const auto bt = bias.element_type();
    if (dbias->element_type() != bt || dbias->element_count() != bias.element_count())
      return bad("dbias must have bias's shape and dtype");
    const int64_t dims[4] = {bias_op.batch, bias_op.heads, bias_op.rows, bias_op.cols};
    p.bias_size = bias.element_count();
    p.dbias = dbias->untyped_data();
    // dbias partial sums added in fp32: into dbias itself for an f32 bias, else into the f32 workspace of bias's
    // shape (converted at the end).
    auto accumulate_in_f32 = [&](const char* where) -> ffi::Error {
      p.dbias_mode = kDbiasAccum;
      if (bt == ffi::DataType::F32) {
        p.dbias_accum = static_cast<float*>(p.dbias);
        return ffi::Error::Success();
      }
      if (dbias_accum->element_type() != ffi::DataType::F32 || dbias_accum->element_count() != bias.element_count())
        return bad(std::string("dbias_accum must be f32 of bias's element count ") + where);
      p.dbias_accum = static_cast<float*>(dbias_accum->untyped_data());
      return ffi::Error::Success();
    };
    // A bias constant along keys is cancelled by softmax: dbias is exactly 0 (zero-filled, never computed).
    if (dims[3] == 1 && Lk != 1) {
      p.dbias_mode = kDbiasNone;
    } else if (key_list_path && deterministic) {
      // Column sums of dS added as int64 fixed-point counts into a workspace converted at the end.
      p.dbias_mode = kDbiasAccum;
      if (dbias_accum->element_type() != ffi::DataType::U32 ||
          dbias_accum->size_bytes() != static_cast<size_t>(bias.element_count()) * sizeof(uint64_t))
        return bad("dbias_accum must be u32 [2 x bias's element count] on the deterministic key-list path");
      fixed.dbias = static_cast<unsigned long long*>(dbias_accum->untyped_data());
      fixed.rows_dbias = double(Lq) * double(dims[0] == 1 ? B : 1) * double(H / dims[1]);
    } else if (key_list_path) {
      // Column sums of dS added atomically: into dbias itself (f32) or an fp32 workspace converted at the end.
      if (auto e = accumulate_in_f32("on the key-list path"); e.failure()) return e;
    } else {
      // A CTA owns whole dbias columns: it spans every batch / kv head that shares one bias batch / head.
      p.batches_per_item = dims[0] == 1 ? static_cast<int>(B) : 1;
      p.kv_heads_per_item = dims[1] == 1 ? static_cast<int>(Hkv) : 1;
      // Loop order in a CTA: batch, kv head, query tile, query head. A dbias tile is finished by one flush
      // unless its contributions are interleaved with other tiles' (see docs/cuda_backward.md).
      if (!dbias_tiles_get_several_flushes(dims, B, H, Hkv)) {
        p.dbias_mode = kDbiasDirect;
      } else {
        if (auto e = accumulate_in_f32("for this bias shape / dtype"); e.failure()) return e;
      }
    }
  }

  if (mask.element_count() > 0 || compact) {
    int64_t dims[4] = {list_batch, list_heads, list_rows, Lk};  // a compact mask's list geometry
    if (!compact) {
      BroadcastOperand op;
      if (auto e = set_mask_params(kTarget, mask, s, p, op); e.failure()) return e;
      dims[0] = op.batch, dims[1] = op.heads, dims[2] = op.rows, dims[3] = op.cols;
    } else {
      p.mask_hdiv = static_cast<int>(H / dims[1]);
    }

    if (key_list_path) {
      // The lists' capacity C is read back from their sizes (jax_dmattn/_cuda_fwd.py: key_list_sizes).
      KeyListArgs ka;
      if (auto e = key_list_capacity_from_sizes(kTarget, dims, key_list_keys.element_count(),
                                                key_list_bits.element_count(), ka);
          e.failure())
        return e;
      // The accumulators hold the dK / dV of one pass's Hs kv heads; the caller chose Hs (kernel_facts.h:
      // key_list_bwd_accum_kv_heads) and sized dkv_accum for it, and any divisor of Hkv works.
      const int64_t stats_bytes = deterministic ? kFixedStatsWords * int64_t(sizeof(uint32_t)) : 0;
      const int64_t head_bytes = 2 * B * Lk * D * (deterministic ? 8 : 4);  // dK + dV of one kv head
      const int64_t accum_bytes = static_cast<int64_t>(dkv_accum->size_bytes()) - stats_bytes;
      const int64_t accum_heads = head_bytes == 0 ? std::max<int64_t>(Hkv, 1) : accum_bytes / head_bytes;
      if (dkv_accum->element_type() != (deterministic ? ffi::DataType::U32 : ffi::DataType::F32) ||
          accum_bytes < 0 || (head_bytes != 0 && accum_bytes % head_bytes != 0) || accum_heads < 1 ||
          Hkv % accum_heads != 0)
        return bad(deterministic
                       ? "dkv_accum must be u32 [4 * B * Lk * Hs * D + 8] (int64 dK, dV counts of Hs kv heads, Hs "
                         "dividing Hkv, then the stats words) on the deterministic key-list path"
                       : "dkv_accum must be f32 [2, B, Lk, Hs, D] (dK, dV of Hs kv heads, Hs dividing Hkv) on the "
                         "key-list path");
      const int64_t pass_elems = B * Lk * accum_heads * D;

      // The kernel also reads the mask itself (sp.base.mask, set above) for units marked dense; compact lists
      // have none.
      BwdKeyListParams sp;
      sp.base = p;
      sp.rows_per_cta = static_cast<int>(key_list_rows);
      sp.accum_kv_heads = static_cast<int>(accum_heads);
      sp.lists.keys = key_list_keys.typed_data();
      sp.lists.bits = reinterpret_cast<const uint64_t*>(key_list_bits.typed_data());
      sp.lists.unit_head_stride = ka.m_tiles();
      sp.lists.unit_batch_stride = dims[0] == 1 ? 0 : dims[1] * ka.m_tiles();
      sp.lists.mask_hdiv = static_cast<int>(H / dims[1]);
      sp.lists.rows_full = dims[2] != 1;
      sp.lists.keys_stride = ka.keys_stride();
      sp.lists.chunks = ka.chunks();
      sp.lists.rows_per_unit = ka.rows_per_unit();
      if (deterministic) {
        fixed.dk = static_cast<unsigned long long*>(dkv_accum->untyped_data());
        fixed.dv = fixed.dk + pass_elems;
        fixed.stats = reinterpret_cast<uint32_t*>(fixed.dv + pass_elems);
        fixed.rows_kv = double(Lq) * double(H / Hkv);
        sp.fixed = fixed;
      } else {
        sp.dk_accum = static_cast<float*>(dkv_accum->untyped_data());
        sp.dv_accum = sp.dk_accum + pass_elems;
      }
      return cuda_error(launch_flash_bwd_key_list(sp, stream), "flash_bwd_key_list");
    }

    if (auto e = set_tile_class_params(kTarget, mask, dims, kBwdBlockM, kBwdBlockN, *classes, stream, p);
        e.failure())
      return e;
  }
  return cuda_error(launch_flash_bwd(p, stream), "flash_bwd");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFlashBwdCuda, flash_bwd_impl,
                              bind_attention_operands()
                                  .Arg<ffi::AnyBuffer>()          // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::AnyBuffer>()          // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dlse
                                  .Arg<ffi::Buffer<ffi::S32>>()   // key-list keys (key-list path; else zero-size)
                                  .Arg<ffi::Buffer<ffi::U32>>()   // key-list bit words (key-list path; else zero-size)
                                  .Arg<ffi::AnyBuffer>()          // row bounds (zero-size: none)
                                  .Arg<ffi::AnyBuffer>()          // key segment ids (zero-size: none)
                                  .Ret<ffi::AnyBuffer>()          // dq
                                  .Ret<ffi::AnyBuffer>()          // dk
                                  .Ret<ffi::AnyBuffer>()          // dv
                                  .Ret<ffi::AnyBuffer>()          // dbias (zero-size f32: none)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_accum (workspace)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // delta (workspace)
                                  .Ret<ffi::Buffer<ffi::U8>>()    // mask tile classes (workspace)
                                  .Ret<ffi::AnyBuffer>()          // dbias_accum (workspace: f32, or u32 pairs)
                                  .Ret<ffi::AnyBuffer>()          // dkv_accum (key_list_path workspace: f32, or u32)
                                  .Ret<ffi::Buffer<ffi::U32>>()   // nonfinite (workspace: one word)
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("is_causal")
                                  .Attr<bool>("deterministic")
                                  .Attr<int64_t>("key_list_rows")
                                  .Attr<int64_t>("list_batch")  // unit geometry of compact lists (0: none)
                                  .Attr<int64_t>("list_heads")
                                  .Attr<int64_t>("list_rows"),
                              {ffi::Traits::kCmdBufferCompatible});

std::vector<FfiTarget> cuda_bwd_targets() {
  return {
      {"dmattn_bwd_cuda", reinterpret_cast<void*>(kFlashBwdCuda)},
  };
}

}  // namespace dmattn
