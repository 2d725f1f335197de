// CUDA FFI handlers. This translation unit must not include CuTe (its headers break the FFI headers' warnings
// setup, see TOOLCHAIN.md): kernels are reached through the plain launch functions in csrc/cuda/*.h.
// Handlers never allocate and never synchronise, so they run inside CUDA graphs / command buffers.
#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

#include "cuda/tile_classes.h"
#include "ffi/targets.h"

namespace ffi = xla::ffi;

namespace dmattn {
namespace {

ffi::Error cuda_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(what) + ": " + cudaGetErrorString(err));
}

// mask [B, H, M, N] bool -> classes [B, H, ceil(M / block_m), ceil(N / block_n)] uint8.
ffi::Error mask_tile_classes_impl(cudaStream_t stream, ffi::Buffer<ffi::PRED> mask,
                                  ffi::ResultBuffer<ffi::U8> classes, int64_t block_m, int64_t block_n) {
  const auto dims = mask.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("mask must be rank 4");
  MaskTileArgs args{mask.typed_data(), dims[0], dims[1], dims[2], dims[3],
                    static_cast<int>(block_m), static_cast<int>(block_n), classes->typed_data()};
  const auto cdims = classes->dimensions();
  if (cdims.size() != 4 || cdims[2] != args.m_tiles() || cdims[3] != args.n_tiles())
    return ffi::Error::InvalidArgument("tile class map has the wrong shape");
  return cuda_error(launch_classify_mask_tiles(args, stream), "classify_mask_tiles");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kMaskTileClassesCuda, mask_tile_classes_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<int64_t>("block_m")
                                  .Attr<int64_t>("block_n"));

std::vector<FfiTarget> cuda_targets() {
  return {
      {"dmattn_mask_tile_classes_cuda", reinterpret_cast<void*>(kMaskTileClassesCuda)},
  };
}

}  // namespace dmattn
