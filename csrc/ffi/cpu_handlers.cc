// CPU FFI handlers: decode the canonical buffers (docs/design.md) into AttentionParams and run the kernels.
#include <string>

#include "xla/ffi/api/ffi.h"

#include "attention_params.h"
#include "cpu/flash_bwd_cpu.h"
#include "cpu/flash_fwd_cpu.h"
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

// Fills params from q, k, v and the optional (zero-size = absent) bias and mask; checks what Python promised.
ffi::Error make_params(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                       const ffi::AnyBuffer& bias, const ffi::AnyBuffer& mask, float scale, float softcap,
                       bool is_causal, AttentionParams* p) {
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
  return broadcast(mask, true, &p->mask);
}

ffi::Error fwd_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                    ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale,
                    float softcap, bool is_causal) {
  AttentionParams p;
  if (auto err = make_params(q, k, v, bias, mask, scale, softcap, is_causal, &p); err.failure()) return err;
  cpu::flash_fwd(p, q.untyped_data(), k.untyped_data(), v.untyped_data(), out->untyped_data(), lse->typed_data());
  return ffi::Error::Success();
}

ffi::Error bwd_impl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::AnyBuffer mask,
                    ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> dlse,
                    ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> dbias, float scale, float softcap, bool is_causal,
                    bool /*deterministic: the CPU backward always is*/) {
  AttentionParams p;
  if (auto err = make_params(q, k, v, bias, mask, scale, softcap, is_causal, &p); err.failure()) return err;
  cpu::flash_bwd(p, q.untyped_data(), k.untyped_data(), v.untyped_data(), out.untyped_data(), lse.typed_data(),
                 dout.untyped_data(), dlse.typed_data(), dq->untyped_data(), dk->untyped_data(), dv->untyped_data(),
                 p.bias.present() ? dbias->untyped_data() : nullptr);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDmattnFwdCpu, fwd_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<bool>("is_causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kDmattnBwdCpu, bwd_impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // mask
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
                                  .Attr<bool>("deterministic"));

std::vector<FfiTarget> cpu_targets() {
  return {
      {"dmattn_fwd", reinterpret_cast<void*>(kDmattnFwdCpu)},
      {"dmattn_bwd", reinterpret_cast<void*>(kDmattnBwdCpu)},
  };
}

}  // namespace dmattn
