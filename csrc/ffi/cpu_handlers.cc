// CPU FFI handlers: decode the canonical buffers (docs/design.md) into AttentionParams and run the kernels.
#include <string>

#include "xla/ffi/api/ffi.h"

#include "attention_params.h"
#include "cpu/flash_bwd_cpu.h"
#include "cpu/flash_fwd_cpu.h"
#include "ffi/row_bounds_operands.h"
#include "ffi/targets.h"

namespace ffi = xla::ffi;

namespace dmattn {
namespace {

bool to_dtype(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F32: *out = DType::kF32; return true;
    case ffi::DataType::BF16: *out = DType::kBF16; return true;
    case ffi::DataType::F16: *out = DType::kF16; return true;
    default: return false;
  }
}

// "f32 [2, 4, 1, 70]": what a rejected operand was, for the error message.
std::string describe(const ffi::AnyBuffer& x) {
  std::string s;
  switch (x.element_type()) {
    case ffi::DataType::PRED: s = "bool"; break;
    case ffi::DataType::F32: s = "f32"; break;
    case ffi::DataType::BF16: s = "bf16"; break;
    case ffi::DataType::F16: s = "f16"; break;
    case ffi::DataType::S32: s = "s32"; break;
    case ffi::DataType::S64: s = "s64"; break;
    default: s = "dtype #" + std::to_string(static_cast<int>(x.element_type()));
  }
  s += " [";
  bool first = true;
  for (const int64_t d : x.dimensions()) {
    s += (first ? "" : ", ") + std::to_string(d);
    first = false;
  }
  return s + "]";
}

// The compact masks (mask_kind 1 and 2): `mask` and the top-k thresholds must have exactly the shapes the kind
// promises, since the kernels index them without further checks. Zero-size buffers are legal only where the
// promised shape is empty (no rows or keys at all, or key index rows of length 0). The operands' DType is left
// at kF32 even for the s32 ones: MaskSource reads each by the kind, not by DType.
ffi::Error compact_mask(const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_threshold,
                        const ffi::AnyBuffer& row_threshold_key, MaskKind kind, AttentionParams* p) {
  const auto d = mask.dimensions();
  const auto batch_ok = [&](int64_t x) { return x == 1 || x == p->batch; };
  const auto heads_ok = [&](int64_t x) { return x == 1 || x == p->kv_heads || x == p->heads; };
  if (kind == MaskKind::kTopK) {
    if (mask.element_type() != ffi::DataType::F32 || d.size() != 4 || !batch_ok(d[0]) || !heads_ok(d[1]) ||
        d[2] != 1 || d[3] != p->kv_len)
      return ffi::Error::InvalidArgument(
          "dmattn: a top-k mask (mask_kind 1) must be f32 scores [Bs, Hs, 1, Lk] with Bs in {1, B}, Hs in "
          "{1, Hkv, H}; got " + describe(mask));
    const std::string want = "[" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " +
                             std::to_string(p->q_len) + "]";
    const auto matches = [&](const ffi::AnyBuffer& x) {
      const auto xd = x.dimensions();
      return xd.size() == 3 && xd[0] == d[0] && xd[1] == d[1] && xd[2] == p->q_len;
    };
    if (row_threshold.element_type() != ffi::DataType::F32 || !matches(row_threshold))
      return ffi::Error::InvalidArgument("dmattn: row_threshold must be f32 " + want + " (the scores' batch and "
                                         "heads, Lq); got " + describe(row_threshold));
    if (row_threshold_key.element_type() != ffi::DataType::S32 || !matches(row_threshold_key))
      return ffi::Error::InvalidArgument("dmattn: row_threshold_key must be s32 " + want + " (the scores' batch "
                                         "and heads, Lq); got " + describe(row_threshold_key));
    const int64_t dims[4] = {d[0], d[1], d[2], d[3]};
    p->mask = make_broadcast_operand(mask.untyped_data(), DType::kF32, dims, p->heads);
    const int64_t row_dims[4] = {d[0], d[1], p->q_len, 1};
    p->row_threshold = make_broadcast_operand(row_threshold.untyped_data(), DType::kF32, row_dims, p->heads);
    p->row_threshold_key = make_broadcast_operand(row_threshold_key.untyped_data(), DType::kF32, row_dims,
                                                  p->heads);
  } else {
    if (mask.element_type() != ffi::DataType::S32 || d.size() != 4 || !batch_ok(d[0]) || !heads_ok(d[1]) ||
        (d[2] != 1 && d[2] != p->q_len))
      return ffi::Error::InvalidArgument(
          "dmattn: a key-index mask (mask_kind 2) must be s32 [Bm, Hm, Mq, K] with Bm in {1, B}, Hm in "
          "{1, Hkv, H}, Mq in {1, Lq}; got " + describe(mask));
    if (row_threshold.element_count() != 0 || row_threshold_key.element_count() != 0)
      return ffi::Error::InvalidArgument("dmattn: row_threshold and row_threshold_key must be zero-size unless "
                                         "mask_kind == 1");
    const int64_t dims[4] = {d[0], d[1], d[2], d[3]};
    p->mask = make_broadcast_operand(mask.untyped_data(), DType::kF32, dims, p->heads);
  }
  p->mask_kind = kind;
  return ffi::Error::Success();
}

// Fills params from q, k, v, the optional (zero-size = absent) bias, the mask in the form mask_kind says
// (attention_params.h, MaskKind) and the optional row bounds; checks what Python promised.
ffi::Error make_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                       const ffi::AnyBuffer& bias, const ffi::AnyBuffer& mask, const ffi::AnyBuffer& row_threshold,
                       const ffi::AnyBuffer& row_threshold_key, const ffi::AnyBuffer& bound_rows,
                       const ffi::AnyBuffer& key_segments, float scale, float softcap, bool is_causal,
                       int64_t mask_kind, AttentionParams* p) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("dmattn: query, key and value must be rank 4");
  if (!to_dtype(q.element_type(), &p->dtype) || k.element_type() != q.element_type() ||
      v.element_type() != q.element_type())
    return ffi::Error::InvalidArgument("dmattn: query/key/value must share dtype f32, bf16 or f16");
  p->batch = qd[0];
  p->q_len = qd[1];
  p->heads = qd[2];
  p->head_dim = qd[3];
  p->kv_len = kd[1];
  p->kv_heads = kd[2];
  if (kd[0] != p->batch || kd[3] != p->head_dim || p->kv_heads == 0 || p->heads % p->kv_heads != 0 ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3])
    return ffi::Error::InvalidArgument("dmattn: inconsistent query/key/value shapes");
  p->scale = scale;
  p->softcap = softcap;
  p->is_causal = is_causal;
  const int64_t full[4] = {p->batch, p->heads, p->q_len, p->kv_len};
  auto broadcast = [&](const ffi::AnyBuffer& x, bool is_mask, BroadcastOperand* op) -> ffi::Error {
    if (x.element_count() == 0) return ffi::Error::Success();
    const auto d = x.dimensions();
    if (d.size() != 4) return ffi::Error::InvalidArgument("dmattn: bias/mask must be rank 4");
    for (int i = 0; i < 4; ++i) {
      const bool ok = d[i] == 1 || d[i] == full[i] || (i == 1 && d[i] == p->kv_heads);
      if (!ok) return ffi::Error::InvalidArgument("dmattn: bias/mask dim " + std::to_string(i) + " not broadcastable");
    }
    DType t = DType::kF32;
    if (is_mask) {
      if (x.element_type() != ffi::DataType::PRED) return ffi::Error::InvalidArgument("dmattn: mask must be bool");
    } else if (!to_dtype(x.element_type(), &t)) {
      return ffi::Error::InvalidArgument("dmattn: bias must be f32, bf16 or f16");
    }
    const int64_t dims[4] = {d[0], d[1], d[2], d[3]};
    *op = make_broadcast_operand(x.untyped_data(), t, dims, p->heads);
    return ffi::Error::Success();
  };
  if (auto err = broadcast(bias, false, &p->bias); err.failure()) return err;
  ffi::Error err;
  switch (mask_kind) {
    case static_cast<int64_t>(MaskKind::kBool):
      if (row_threshold.element_count() != 0 || row_threshold_key.element_count() != 0)
        return ffi::Error::InvalidArgument("dmattn: row_threshold and row_threshold_key must be zero-size unless "
                                           "mask_kind == 1");
      err = broadcast(mask, true, &p->mask);
      break;
    case static_cast<int64_t>(MaskKind::kTopK):
    case static_cast<int64_t>(MaskKind::kKeyIndices):
      err = compact_mask(mask, row_threshold, row_threshold_key, static_cast<MaskKind>(mask_kind), p);
      break;
    default:
      return ffi::Error::InvalidArgument("dmattn: mask_kind must be 0 (bool), 1 (top-k) or 2 (key indices); got " +
                                         std::to_string(mask_kind));
  }
  if (err.failure()) return err;
  return decode_row_bounds(bound_rows, key_segments, p->batch, p->q_len, p->kv_len, &p->bounds);
}

// The operands both targets start with, in make_params's order: one list, so that the two cannot drift apart.
auto bind_attention_operands() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()  // q
      .Arg<ffi::AnyBuffer>()  // k
      .Arg<ffi::AnyBuffer>()  // v
      .Arg<ffi::AnyBuffer>()  // bias
      .Arg<ffi::AnyBuffer>()  // mask
      .Arg<ffi::AnyBuffer>()  // row_threshold
      .Arg<ffi::AnyBuffer>()  // row_threshold_key
      .Arg<ffi::AnyBuffer>()  // row bounds
      .Arg<ffi::AnyBuffer>();  // key segment ids
}

ffi::Error fwd_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                    ffi::AnyBuffer row_threshold, ffi::AnyBuffer row_threshold_key, ffi::AnyBuffer bound_rows,
                    ffi::AnyBuffer key_segments, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale, float softcap, bool is_causal,
                    int64_t mask_kind) {
  AttentionParams p;
  if (auto err = make_params(q, k, v, bias, mask, row_threshold, row_threshold_key, bound_rows, key_segments, scale,
                             softcap, is_causal, mask_kind, &p);
      err.failure())
    return err;
  cpu::flash_fwd(p, q.untyped_data(), k.untyped_data(), v.untyped_data(), out->untyped_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error bwd_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                    ffi::AnyBuffer row_threshold, ffi::AnyBuffer row_threshold_key, ffi::AnyBuffer bound_rows,
                    ffi::AnyBuffer key_segments, ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse,
                    ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> dlse,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> dbias, float scale, float softcap, bool is_causal,
                    bool /*deterministic: the CPU backward always is*/, int64_t mask_kind) {
  AttentionParams p;
  if (auto err = make_params(q, k, v, bias, mask, row_threshold, row_threshold_key, bound_rows, key_segments, scale,
                             softcap, is_causal, mask_kind, &p);
      err.failure())
    return err;
  cpu::flash_bwd(p, q.untyped_data(), k.untyped_data(), v.untyped_data(), out.untyped_data(), lse.typed_data(),
                 dout.untyped_data(), dlse.typed_data(), dq->untyped_data(), dk->untyped_data(), dv->untyped_data(),
                 p.bias.present() ? dbias->untyped_data() : nullptr);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDmattnFwdCpu, fwd_impl,
                              bind_attention_operands()
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("is_causal")
                                  .Attr<int64_t>("mask_kind"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDmattnBwdCpu, bwd_impl,
                              bind_attention_operands()
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dlse
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("is_causal")
                                  .Attr<bool>("deterministic")
                                  .Attr<int64_t>("mask_kind"));

std::vector<FfiTarget> cpu_targets() {
  return {
      {"dmattn_fwd_cpu", reinterpret_cast<void*>(kDmattnFwdCpu)},
      {"dmattn_bwd_cpu", reinterpret_cast<void*>(kDmattnBwdCpu)},
  };
}

}  // namespace dmattn
