// Pieces the CUDA FFI handlers share (csrc/ffi/cuda_fwd_handler.cc, cuda_bwd_handler.cc,
// cuda_key_lists_handler.cc). Like them, no CuTe here: its headers break the FFI headers' warnings setup.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "cuda/key_lists.h"
#include "ffi/targets.h"

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

// A broadcastable operand dim: 1 or the full size.
inline bool dims_ok(int64_t d, int64_t full) { return d == 1 || d == full; }

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

}  // namespace dmattn
