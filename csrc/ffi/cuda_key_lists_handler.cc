// The live-key list pre-pass (csrc/cuda/key_lists.h) as its own FFI call, "dmattn_key_lists_cuda".
//
// Its results are inputs of dmattn_fwd_cuda and dmattn_bwd_cuda rather than something each of them builds: the
// call has no side effects, so XLA's CSE merges identical calls. In a jitted forward + backward, the backward
// then reuses the forward's lists (the mask is read once), and layers that share one mask share one pre-pass.
// For that the Python side (jax_dmattn/_cuda_fwd.py: build_key_lists) must emit the same operand and attributes
// from both passes.
//
// No CuTe includes here (see csrc/ffi/cuda_fwd_handler.cc). The handler never allocates and never synchronises.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "cuda/key_lists.h"
#include "ffi/cuda_handler_common.h"
#include "ffi/targets.h"

namespace ffi = xla::ffi;

namespace dmattn {
namespace {

ffi::Error bad(const std::string& what) {
  return ffi::Error::InvalidArgument("dmattn_key_lists_cuda: " + what);
}

// mask [Bm, Hm, Mm, Lk] bool (the attention call's mask in its own broadcast shape; the key dim is full).
// keys: KeyListArgs::keys_size() int32; bits: 2 * KeyListArgs::bits_size() uint32 (the uint64 bit words as
// uint32 pairs, so that callers need no x64 mode). q_len is the attention call's query length: the causal cut
// applies only when the mask has a row per query (Mm == q_len), with the bottom-right offset Lk - q_len. parts:
// the key ranges listed apart (KeyListArgs::parts; 1 for a prompt's lists).
ffi::Error key_lists_impl(cudaStream_t stream, ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::S32> keys,
                          ffi::ResultBuffer<ffi::U32> bits, bool is_causal, int64_t q_len, int64_t capacity,
                          int64_t parts) {
  count_cuda_handler_run(stream);
  const auto md = mask.dimensions();
  if (md.size() != 4) return bad("mask must be rank 4 [Bm, Hm, Mm, Lk]");
  if (q_len < 0) return bad("q_len must be >= 0");
  KeyListArgs args;
  args.mask = reinterpret_cast<const uint8_t*>(mask.typed_data());
  args.batch = md[0], args.heads = md[1], args.rows = md[2], args.cols = md[3];
  args.is_causal = is_causal;
  args.q_len = q_len;
  args.causal_offset = args.cols - q_len;
  args.capacity = capacity;
  args.parts = parts;
  if (!args.parts_ok())
    return bad("parts " + std::to_string(parts) + " must be >= 1 and divide the key dim " + std::to_string(args.cols));
  if (!args.capacity_ok())
    return bad("capacity " + std::to_string(capacity) + " must be a positive multiple of 64 and at most " +
               std::to_string((args.part_cols() + kKeyListChunk - 1) / kKeyListChunk * kKeyListChunk) +
               " (a part's keys rounded up to 64)");
  if (static_cast<int64_t>(keys->element_count()) != args.keys_size())
    return bad("keys must have " + std::to_string(args.keys_size()) + " elements (units x (1 + capacity)), got " +
               std::to_string(keys->element_count()));
  if (static_cast<int64_t>(bits->element_count()) != 2 * args.bits_size())
    return bad("bits must have " + std::to_string(2 * args.bits_size()) +
               " uint32 elements (2 x units x capacity / 64 x rows per unit), got " +
               std::to_string(bits->element_count()));
  // Zero units (an empty mask): nothing to list, and the launcher must not see an empty grid.
  if (args.units() == 0) return ffi::Error::Success();
  args.keys = keys->typed_data();
  args.bits = reinterpret_cast<uint64_t*>(bits->typed_data());
  return cuda_error(launch_build_key_lists(args, stream), "build_key_lists");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kKeyListsCuda, key_lists_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [Bm, Hm, Mm, Lk]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // keys [units * (1 + capacity)]
                                  .Ret<ffi::Buffer<ffi::U32>>()   // bits [2 * units * capacity / 64 * rows]
                                  .Attr<bool>("is_causal")
                                  .Attr<int64_t>("q_len")
                                  .Attr<int64_t>("capacity")
                                  .Attr<int64_t>("parts"),
                              {ffi::Traits::kCmdBufferCompatible});

std::vector<FfiTarget> cuda_key_lists_targets() {
  return {
      {"dmattn_key_lists_cuda", reinterpret_cast<void*>(kKeyListsCuda)},
  };
}

}  // namespace dmattn
