// The key-list pre-passes of a top-k mask given by per-key scores, as FFI calls: "dmattn_topk_key_lists_cuda",
// causal (csrc/cuda/topk_key_lists.h, lists per 128-row query tile) or shared by every row
// (csrc/cuda/topk_shared_key_lists.h, one list per (b, h)), and "dmattn_topk_bounded_key_lists_cuda", under row
// bounds (csrc/cuda/topk_bounded_key_lists.h). The same keys / bits layout as dmattn_key_lists_cuda, so the forward
// and the key-list backward take any of them, and like that call they are side-effect free, so XLA's CSE lets a
// forward and its backward share one.
//
// No CuTe includes here (see csrc/ffi/cuda_fwd_handler.cc). The handler never allocates and never synchronises.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "cuda/key_lists.h"
#include "cuda/topk_bounded_key_lists.h"
#include "cuda/topk_key_lists.h"
#include "cuda/topk_shared_key_lists.h"
#include "ffi/cuda_handler_common.h"
#include "ffi/row_bounds_operands.h"
#include "ffi/targets.h"

namespace ffi = xla::ffi;

namespace dmattn {
namespace {

ffi::Error bad(const std::string& what) {
  return ffi::Error::InvalidArgument("dmattn_topk_key_lists_cuda: " + what);
}

// scores [Bs, Hs, Lk]: causal f32, canonical (finite, no -0.0); not causal f32, bf16 or f16, any values (the kernel
// ranks their canonical form). Causal: order s32 [Bs, Hs, Lk], per (b, h) the key indices
// by (score desc, index asc), and query row i of q_len = Lq rows keeps the k best keys j <= i + Lk - Lq; the lists
// are over the layout batch = Bs, heads = Hs, rows = Lq, cols = Lk. Not causal: order is zero-size, every row keeps
// the k best keys, and the lists are over rows = 1 (q_len is not used). keys: KeyListArgs::keys_size() int32;
// bits: 2 * KeyListArgs::bits_size() uint32 (uint64 words as uint32 pairs).
ffi::Error topk_key_lists_impl(cudaStream_t stream, ffi::AnyBuffer scores, ffi::Buffer<ffi::S32> order,
                               ffi::ResultBuffer<ffi::S32> keys, ffi::ResultBuffer<ffi::U32> bits, int64_t k,
                               bool is_causal, int64_t q_len, int64_t capacity) {
  count_cuda_handler_run(stream);
  const auto sd = scores.dimensions(), od = order.dimensions();
  if (sd.size() != 3) return bad("scores must be rank 3 [Bs, Hs, Lk]");
  DType scores_dtype = DType::kF32;
  switch (scores.element_type()) {
    case ffi::DataType::F32: break;
    case ffi::DataType::BF16: scores_dtype = DType::kBF16; break;
    case ffi::DataType::F16: scores_dtype = DType::kF16; break;
    default: return bad("scores must be f32, bf16 or f16");
  }
  if (is_causal && scores_dtype != DType::kF32) return bad("the causal lists take f32 scores");
  if (is_causal && (od.size() != 3 || od[0] != sd[0] || od[1] != sd[1] || od[2] != sd[2]))
    return bad("order must have the shape of scores [Bs, Hs, Lk]");
  if (!is_causal && order.element_count() != 0) return bad("order must be zero-size without is_causal");
  if (q_len < 0) return bad("q_len must be >= 0");
  if (q_len > INT_MAX || sd[2] > INT_MAX) return bad("q_len and the key length must be below 2^31");
  if (k < 1 || k >= sd[2])
    return bad("k = " + std::to_string(k) + " must be in [1, Lk) with Lk = " + std::to_string(sd[2]) +
               " (a k >= Lk keeps every visible key: no ranking needed)");
  KeyListArgs L;
  L.batch = sd[0], L.heads = sd[1], L.cols = sd[2];
  L.rows = is_causal ? q_len : 1;
  L.is_causal = is_causal;
  L.q_len = is_causal ? q_len : 1;
  L.causal_offset = is_causal ? L.cols - q_len : 0;
  L.capacity = capacity;
  if (!L.capacity_ok())
    return bad("capacity " + std::to_string(capacity) + " must be a positive multiple of 64 and at most " +
               std::to_string((L.cols + kKeyListChunk - 1) / kKeyListChunk * kKeyListChunk) +
               " (the key dim rounded up to 64)");
  // A causal unit lists at most k keys below its diagonal plus the rows_per_unit - 1 keys on it, and at most Lk
  // keys; a shared list exactly k.
  const int64_t on_diagonal = is_causal ? L.rows_per_unit() - 1 : 0;
  const int64_t need = k + on_diagonal < L.cols ? k + on_diagonal : L.cols;
  if (capacity < need)
    return bad("capacity " + std::to_string(capacity) + " cannot hold a unit's keys: " +
               (is_causal ? "k + min(q_len, 128) - 1 = " : "k = ") + std::to_string(k + on_diagonal) +
               (is_causal ? " (or Lk = " + std::to_string(L.cols) + " if fewer)" : std::string()) + " are possible");
  if (L.units() > INT_MAX) return bad("too many units (Bs * Hs * ceil(q_len / 128) must be below 2^31)");
  if (static_cast<int64_t>(keys->element_count()) != L.keys_size())
    return bad("keys must have " + std::to_string(L.keys_size()) + " elements (units x (1 + capacity)), got " +
               std::to_string(keys->element_count()));
  if (static_cast<int64_t>(bits->element_count()) != 2 * L.bits_size())
    return bad("bits must have " + std::to_string(2 * L.bits_size()) +
               " uint32 elements (2 x units x capacity / 64 x rows per unit), got " +
               std::to_string(bits->element_count()));
  // Zero units (q_len = 0 or an empty batch): nothing to list, and the launcher must not see an empty grid.
  if (L.units() == 0) return ffi::Error::Success();
  L.keys = keys->typed_data();
  L.bits = reinterpret_cast<uint64_t*>(bits->typed_data());

  if (!is_causal) {
    TopKSharedKeyListArgs args;
    args.scores = scores.untyped_data();
    args.scores_dtype = scores_dtype;
    args.scores_batch_stride = L.heads * L.cols;
    args.k = k;
    args.lists = L;
    return cuda_error(launch_build_topk_shared_key_lists(args, stream), "build_topk_shared_key_lists");
  }
  int limit = 0;
  if (auto e = max_shared_memory_optin(limit); e.failure()) return e;
  size_t smem = 0;
  if (auto e = cuda_error(topk_key_lists_smem_bytes(k, &smem), "cudaFuncGetAttributes"); e.failure()) return e;
  if (smem > static_cast<size_t>(limit))
    return bad("k = " + std::to_string(k) + " needs " + std::to_string(smem) +
               " bytes of shared memory per block, this device allows " + std::to_string(limit));
  TopKKeyListArgs args;
  args.scores = static_cast<const float*>(scores.untyped_data());
  args.order = order.typed_data();
  args.k = k;
  args.lists = L;
  return cuda_error(launch_build_topk_key_lists(args, stream), "build_topk_key_lists");
}

ffi::Error bad_bounded(const std::string& what) {
  return ffi::Error::InvalidArgument("dmattn_topk_bounded_key_lists_cuda: " + what);
}

// scores f32 [Bs, Hs, Lk] (the kernels rank their canonical form), rows s32 [Bb, Lq, 4] and key segment ids
// s32 [Bb, Lk] or zero-size (csrc/row_bounds.h), Bs and Bb in {1, B'}, B' = max(Bs, Bb): query row i keeps the k best
// keys its bounds leave it. The lists are over batch = B', heads = Hs, rows = Lq, cols = Lk. may_overflow: a unit
// whose keys exceed the capacity is marked with count kKeyListDense (else the kernel traps). Lq = 1 without segment
// ids runs the shared-list pre-pass over each element's key range (csrc/cuda/topk_shared_key_lists.h; capacity >= k).
ffi::Error topk_bounded_key_lists_impl(cudaStream_t stream, ffi::Buffer<ffi::F32> scores, ffi::AnyBuffer rows,
                                       ffi::AnyBuffer key_segments, ffi::ResultBuffer<ffi::S32> keys,
                                       ffi::ResultBuffer<ffi::U32> bits, int64_t k, int64_t capacity,
                                       bool may_overflow) {
  count_cuda_handler_run(stream);
  const auto sd = scores.dimensions(), rd = rows.dimensions();
  if (sd.size() != 3) return bad_bounded("scores must be rank 3 [Bs, Hs, Lk]");
  if (rd.size() != 3) return bad_bounded("rows must be rank 3 [Bb, Lq, 4]");
  const int64_t batch = sd[0] > rd[0] ? sd[0] : rd[0];
  if (sd[0] != 1 && sd[0] != batch) return bad_bounded("the scores' batch must be 1 or the rows' batch");
  TopKBoundedKeyListArgs args;
  if (auto e = decode_row_bounds(rows, key_segments, batch, rd[1], sd[2], &args.bounds); e.failure()) return e;
  if (rd[1] > INT_MAX || sd[2] > INT_MAX) return bad_bounded("q_len and the key length must be below 2^31");
  if (k < 1 || k >= sd[2])
    return bad_bounded("k = " + std::to_string(k) + " must be in [1, Lk) with Lk = " + std::to_string(sd[2]));
  if (k > kTopKBoundedListsMaxK)
    return bad_bounded("k = " + std::to_string(k) + " is above the largest k of this pre-pass, " +
                       std::to_string(kTopKBoundedListsMaxK));
  KeyListArgs L;
  L.batch = batch, L.heads = sd[1], L.rows = rd[1], L.cols = sd[2];
  L.q_len = rd[1];
  L.capacity = capacity;
  if (!L.capacity_ok())
    return bad_bounded("capacity " + std::to_string(capacity) + " must be a positive multiple of 64 and at most " +
                       std::to_string((L.cols + kKeyListChunk - 1) / kKeyListChunk * kKeyListChunk) +
                       " (the key dim rounded up to 64)");
  if (L.units() > INT_MAX) return bad_bounded("too many units (B * Hs * ceil(Lq / 128) must be below 2^31)");
  if (static_cast<int64_t>(keys->element_count()) != L.keys_size())
    return bad_bounded("keys must have " + std::to_string(L.keys_size()) + " elements (units x (1 + capacity)), got " +
                       std::to_string(keys->element_count()));
  if (static_cast<int64_t>(bits->element_count()) != 2 * L.bits_size())
    return bad_bounded("bits must have " + std::to_string(2 * L.bits_size()) +
                       " uint32 elements (2 x units x capacity / 64 x rows per unit), got " +
                       std::to_string(bits->element_count()));
  if (L.units() == 0) return ffi::Error::Success();
  L.keys = keys->typed_data();
  L.bits = reinterpret_cast<uint64_t*>(bits->typed_data());
  if (topk_bounded_one_range(rd[1], args.bounds.key_segments != nullptr)) {
    // One query row per unit without segment ids (a decoding step over a ragged batch): its list is the top k of
    // one key range, which the shared-list pre-pass selects with a team of CTAs per row.
    if (capacity < k)
      return bad_bounded("capacity " + std::to_string(capacity) + " cannot hold the k = " + std::to_string(k) +
                         " keys of a one-row unit");
    TopKSharedKeyListArgs shared;
    shared.scores = scores.typed_data();
    shared.scores_batch_stride = sd[0] == 1 ? 0 : sd[1] * sd[2];
    shared.k = k;
    shared.bounds = args.bounds;
    shared.lists = L;
    return cuda_error(launch_build_topk_shared_key_lists(shared, stream), "build_topk_shared_key_lists");
  }
  int limit = 0;
  if (auto e = max_shared_memory_optin(limit); e.failure()) return e;
  const int64_t smem = topk_bounded_key_lists_smem_bytes(k, capacity);
  if (smem > limit)
    return bad_bounded("k = " + std::to_string(k) + " and capacity " + std::to_string(capacity) + " need " +
                       std::to_string(smem) + " bytes of shared memory per block, this device allows " +
                       std::to_string(limit));
  args.scores = scores.typed_data();
  args.scores_batch = sd[0];
  args.k = k;
  args.may_overflow = may_overflow;
  args.lists = L;
  return cuda_error(launch_build_topk_bounded_key_lists(args, stream), "build_topk_bounded_key_lists");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kTopKKeyListsCuda, topk_key_lists_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()         // scores [Bs, Hs, Lk]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // order [Bs, Hs, Lk] (causal), else zero-size
                                  .Ret<ffi::Buffer<ffi::S32>>()  // keys [units * (1 + capacity)]
                                  .Ret<ffi::Buffer<ffi::U32>>()  // bits [2 * units * capacity / 64 * rows]
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("is_causal")
                                  .Attr<int64_t>("q_len")
                                  .Attr<int64_t>("capacity"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(kTopKBoundedKeyListsCuda, topk_bounded_key_lists_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scores [Bs, Hs, Lk]
                                  .Arg<ffi::AnyBuffer>()         // rows [Bb, Lq, 4]
                                  .Arg<ffi::AnyBuffer>()         // key segment ids [Bb, Lk] or zero-size
                                  .Ret<ffi::Buffer<ffi::S32>>()  // keys [units * (1 + capacity)]
                                  .Ret<ffi::Buffer<ffi::U32>>()  // bits [2 * units * capacity / 64 * rows]
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("capacity")
                                  .Attr<bool>("may_overflow"),
                              {ffi::Traits::kCmdBufferCompatible});

std::vector<FfiTarget> cuda_topk_key_lists_targets() {
  return {
      {"dmattn_topk_key_lists_cuda", reinterpret_cast<void*>(kTopKKeyListsCuda)},
      {"dmattn_topk_bounded_key_lists_cuda", reinterpret_cast<void*>(kTopKBoundedKeyListsCuda)},
  };
}

}  // namespace dmattn
