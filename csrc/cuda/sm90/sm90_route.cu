#include "cuda/sm90/sm90_route.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace dmattn {

bool sm90_kernels_route_open() {
  const char* forced = std::getenv("JAX_DMATTN_CUDA_KERNELS");
  if (forced != nullptr && std::strcmp(forced, "sm80") == 0) return false;
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0;
}

}  // namespace dmattn
