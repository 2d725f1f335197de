// Pieces the CUDA FFI handlers share (csrc/ffi/cuda_fwd_handler.cc, cuda_bwd_handler.cc, cuda_key_lists_handler.cc,
// cuda_topk_key_lists_handler.cc). Like them, no CuTe here: its headers break the FFI headers' warnings setup.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "attention_params.h"
#include "cuda/flash_params.h"
#include "cuda/key_lists.h"
#include "cuda/tile_classes.h"
#include "ffi/row_bounds_operands.h"
#include "ffi/targets.h"
#include "kernel_facts.h"

namespace dmattn {

// Command buffers: every CUDA handler declares ffi::Traits::kCmdBufferCompatible, so XLA may record it into a CUDA
// graph by stream capture. That stays true only while a handler enqueues nothing but kernels and memsets on XLA's
// stream, into the buffers XLA passed: no device allocation, no host sync, no stream or event query. Host-side calls
// that capture allows (cudaGetDevice, cudaDeviceGetAttribute, cudaFuncSetAttribute) are fine.
// tests/test_cuda_command_buffers.py runs every target inside a command buffer.

// Counts one host-side run of a CUDA handler, and whether its stream is being captured (cuda_handler_runs()).
// cudaStreamIsCapturing is allowed during capture and does not touch the stream's work.
void count_cuda_handler_run(cudaStream_t stream);

inline xla::ffi::Error cuda_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error(xla::ffi::ErrorCode::kInternal, std::string(what) + ": " + cudaGetErrorString(err));
}

// The most shared memory a block may opt in to on the current device: the handlers check a kernel's need against
// it, so that a call the caller sized for another device fails with a message instead of a launch error.
inline xla::ffi::Error max_shared_memory_optin(int& limit) {
  int device = 0;
  if (auto e = cuda_error(cudaGetDevice(&device), "cudaGetDevice"); e.failure()) return e;
  return cuda_error(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                    "cudaDeviceGetAttribute");
}

// A broadcastable operand dim: 1 or the full size.
inline bool dims_ok(int64_t d, int64_t full) { return d == 1 || d == full; }

// The shapes every attention handler reads first: q [B, Lq, H, D], k / v [B, Lk, Hkv, D], one dtype.
struct QkvDims {
  int64_t B = 0, Lq = 0, H = 0, D = 0, Lk = 0, Hkv = 0;
  bool is_bf16 = false;
};

// Checks q, k, v as the CUDA kernels take them (rank 4, matching shapes, H a multiple of Hkv, an instantiated
// head dim, bf16 or f16) and reads their dims; each head of q serves q_head_repeat query heads (H = q's heads times
// it), and q_heads_first says q is [B, Hq, Lq, D] instead of [B, Lq, Hq, D]. Error messages start with `target`.
inline xla::ffi::Error decode_qkv(const char* target, const xla::ffi::AnyBuffer& q, const xla::ffi::AnyBuffer& k,
                                  const xla::ffi::AnyBuffer& v, int64_t q_head_repeat, bool q_heads_first,
                                  QkvDims& s) {
  auto bad = [&](const std::string& what) {
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": " + what);
  };
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return bad("q, k, v must be rank 4");
  if (q_head_repeat < 1) return bad("q_head_repeat must be >= 1");
  s.B = qd[0], s.Lq = qd[q_heads_first ? 2 : 1], s.H = qd[q_heads_first ? 1 : 2] * q_head_repeat, s.D = qd[3];
  s.Lk = kd[1], s.Hkv = kd[2];
  if (kd[0] != s.B || kd[3] != s.D || vd[0] != s.B || vd[1] != s.Lk || vd[2] != s.Hkv || vd[3] != s.D)
    return bad("q/k/v shapes disagree");
  if (s.Hkv <= 0 || s.H % s.Hkv != 0) return bad("H % Hkv != 0");
  bool instantiated = false;
  std::string dims;
  for (int d : kCudaHeadDims) {
    instantiated = instantiated || d == s.D;
    dims += (dims.empty() ? "" : ", ") + std::to_string(d);
  }
  if (!instantiated) return bad("head dim must be one of " + dims + ", got " + std::to_string(s.D));
  const auto dt = q.element_type();
  if ((dt != xla::ffi::DataType::BF16 && dt != xla::ffi::DataType::F16) || k.element_type() != dt ||
      v.element_type() != dt)
    return bad("q, k, v must share dtype bf16 or f16");
  s.is_bf16 = dt == xla::ffi::DataType::BF16;
  return xla::ffi::Error::Success();
}

// A bias, mask or key-list geometry [Bx, Hx, Mx, Nx] of the call `s`: each dim 1 or full, heads 1, Hkv or H.
inline xla::ffi::Error check_broadcast_dims(const char* target, const char* name, const int64_t d[4],
                                            const QkvDims& s) {
  if (!dims_ok(d[0], s.B) || !(d[1] == 1 || d[1] == s.Hkv || d[1] == s.H) || !dims_ok(d[2], s.Lq) ||
      !dims_ok(d[3], s.Lk))
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": bad " + name + " shape");
  return xla::ffi::Error::Success();
}

// A rank-4 bias or mask buffer of the call `s` (check_broadcast_dims) as the kernels read it: data, dtype and
// broadcast strides.
template <typename Buffer>
xla::ffi::Error decode_broadcast(const char* target, const char* name, const Buffer& x, DType dtype,
                                 const QkvDims& s, BroadcastOperand& op) {
  const auto d = x.dimensions();
  if (d.size() != 4)
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": " + name + " must be rank 4");
  const int64_t dims[4] = {d[0], d[1], d[2], d[3]};
  if (auto e = check_broadcast_dims(target, name, dims, s); e.failure()) return e;
  op = make_broadcast_operand(x.untyped_data(), dtype, dims, s.H);
  return xla::ffi::Error::Success();
}

// The bias's dtype as the kernels tag it.
inline xla::ffi::Error bias_dtype(const char* target, xla::ffi::DataType t, DType& out) {
  switch (t) {
    case xla::ffi::DataType::F32: out = DType::kF32; return xla::ffi::Error::Success();
    case xla::ffi::DataType::BF16: out = DType::kBF16; return xla::ffi::Error::Success();
    case xla::ffi::DataType::F16: out = DType::kF16; return xla::ffi::Error::Success();
    default: return xla::ffi::Error::InvalidArgument(std::string(target) + ": bias dtype must be f32, bf16 or f16");
  }
}

// The capacity C of live-key lists built for a mask [Bm, Hm, Mm, Lk] (dmattn_key_lists_cuda), read back from
// the sizes of its two buffers: keys [units, 1 + C] int32, bits [units, C / 64, min(Mm, 128)] uint64 (as u32
// pairs). Sets `args` (shape, capacity; not the pointers) or says what does not match, prefixed with `target`.
// Zero units: both buffers must be empty and C is left 0 (nothing reads them).
inline xla::ffi::Error key_list_capacity_from_sizes(const char* target, const int64_t dims[4], size_t n_keys,
                                                    size_t n_bits_u32, KeyListArgs& args) {
  auto bad = [&](const std::string& what) {
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": " + what);
  };
  args.batch = dims[0], args.heads = dims[1], args.rows = dims[2], args.cols = dims[3];
  const int64_t units = args.units();
  if (units == 0) {
    if (n_keys != 0 || n_bits_u32 != 0) return bad("key lists must be empty for an empty mask");
    return xla::ffi::Error::Success();
  }
  const int64_t keys = static_cast<int64_t>(n_keys);
  if (keys % units != 0 || keys / units < 2)
    return bad("key lists have " + std::to_string(keys) + " elements, not units x (1 + capacity) with units = " +
               std::to_string(units));
  args.capacity = keys / units - 1;
  if (!args.capacity_ok())
    return bad("key list capacity " + std::to_string(args.capacity) +
               " is not a multiple of 64 in [64, Lk rounded up to 64]");
  if (static_cast<int64_t>(n_bits_u32) != 2 * args.bits_size())
    return bad("key bit words have " + std::to_string(n_bits_u32) + " u32 elements, expected " +
               std::to_string(2 * args.bits_size()) + " for capacity " + std::to_string(args.capacity));
  return xla::ffi::Error::Success();
}

// The part of a forward's or a backward's parameters that both handlers fill alike (CallParams, flash_params.h): q,
// k, v and their sizes (also into `s`), the logit rule, the bias (pointer, dtype, broadcast strides; `bias_op` gets
// its shape) and the row bounds. The mask is set_mask_params's, since the handlers decide when they read it.
inline xla::ffi::Error set_call_params(const char* target, const xla::ffi::AnyBuffer& q,
                                       const xla::ffi::AnyBuffer& k, const xla::ffi::AnyBuffer& v,
                                       const xla::ffi::AnyBuffer& bias, const xla::ffi::AnyBuffer& bound_rows,
                                       const xla::ffi::AnyBuffer& key_segments, float scale, float softcap,
                                       bool is_causal, QkvDims& s, CallParams& p, BroadcastOperand& bias_op,
                                       int64_t q_head_repeat = 1, bool q_heads_first = false) {
  if (auto e = decode_qkv(target, q, k, v, q_head_repeat, q_heads_first, s); e.failure()) return e;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.batch = static_cast<int>(s.B), p.heads = static_cast<int>(s.H), p.kv_heads = static_cast<int>(s.Hkv);
  p.q_len = static_cast<int>(s.Lq), p.kv_len = static_cast<int>(s.Lk), p.head_dim = static_cast<int>(s.D);
  p.group = static_cast<int>(s.H / s.Hkv);
  p.is_bf16 = s.is_bf16;
  p.scale = scale;
  p.softcap = softcap;
  p.is_causal = is_causal;
  if (bias.element_count() > 0) {
    if (auto e = bias_dtype(target, bias.element_type(), p.bias_dtype); e.failure()) return e;
    if (auto e = decode_broadcast(target, "bias", bias, p.bias_dtype, s, bias_op); e.failure()) return e;
    p.bias = bias_op.data;
    p.bias_batch_stride = bias_op.batch_stride, p.bias_head_stride = bias_op.head_stride;
    p.bias_row_stride = bias_op.row_stride, p.bias_col_stride = bias_op.col_stride;
    p.bias_hdiv = static_cast<int>(bias_op.heads_per_index);
  }
  return decode_row_bounds(bound_rows, key_segments, s.B, s.Lq, s.Lk, &p.bounds);
}

// The binding of the stream and the operands both attention targets start with, in set_call_params's order: q, k,
// v, bias (zero-size: none), mask (bool, zero-size: none). The targets add the rest.
inline auto bind_attention_operands() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
      .Arg<xla::ffi::AnyBuffer>()                 // q
      .Arg<xla::ffi::AnyBuffer>()                 // k
      .Arg<xla::ffi::AnyBuffer>()                 // v
      .Arg<xla::ffi::AnyBuffer>()                 // bias
      .Arg<xla::ffi::Buffer<xla::ffi::PRED>>();  // mask
}

// The bool mask of the call `s` into `p` (pointer, broadcast strides); `op` gets its shape.
inline xla::ffi::Error set_mask_params(const char* target, const xla::ffi::Buffer<xla::ffi::PRED>& mask,
                                       const QkvDims& s, CallParams& p, BroadcastOperand& op) {
  if (auto e = decode_broadcast(target, "mask", mask, DType::kF32, s, op); e.failure()) return e;
  p.mask = reinterpret_cast<const uint8_t*>(op.data);
  p.mask_batch_stride = op.batch_stride, p.mask_head_stride = op.head_stride;
  p.mask_row_stride = op.row_stride, p.mask_col_stride = op.col_stride;
  p.mask_hdiv = static_cast<int>(op.heads_per_index);
  return xla::ffi::Error::Success();
}

// The tile classes of the bool mask [Bm, Hm, Mm, Nm] = dims at the kernel's block_m x block_n tiles: checks that
// `classes` has the map's shape, enqueues the classification and points `p` at the map (a broadcast dim at
// stride 0).
inline xla::ffi::Error set_tile_class_params(const char* target, const xla::ffi::Buffer<xla::ffi::PRED>& mask,
                                             const int64_t dims[4], int block_m, int block_n,
                                             xla::ffi::Buffer<xla::ffi::U8>& classes, cudaStream_t stream,
                                             CallParams& p) {
  MaskTileArgs targs{mask.typed_data(), dims[0], dims[1], dims[2], dims[3], block_m, block_n, classes.typed_data()};
  const int64_t mt = targs.m_tiles(), nt = targs.n_tiles();
  const auto cd = classes.dimensions();
  if (cd.size() != 4 || cd[0] != dims[0] || cd[1] != dims[1] || cd[2] != mt || cd[3] != nt)
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": tile class output has the wrong shape");
  if (auto e = cuda_error(launch_classify_mask_tiles(targs, stream), "classify_mask_tiles"); e.failure()) return e;
  p.classes = classes.typed_data();
  p.cls_batch_stride = dims[0] == 1 ? 0 : dims[1] * mt * nt;
  p.cls_head_stride = dims[1] == 1 ? 0 : mt * nt;
  p.cls_m_stride = dims[2] == 1 ? 0 : nt;
  p.cls_n_stride = dims[3] == 1 ? 0 : 1;
  return xla::ffi::Error::Success();
}

}  // namespace dmattn
