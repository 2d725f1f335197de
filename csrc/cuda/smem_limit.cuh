// Raising a kernel's dynamic shared-memory limit above 48 KiB, shared by every launcher (forward, key-tile
// backward, key-list backward).
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

namespace dmattn {

// Dynamic shared memory a block may use on sm_90 (227 KiB), the bound every kernel's shared storage is checked against
// at compile time.
constexpr int kMaxSmemPerBlockSm90 = 227 * 1024;
// Shared memory of one sm_90 multiprocessor (228 KiB), which the CTAs resident on it share (each also reserving 1 KiB
// for the system).
constexpr int kSmemPerSmSm90 = 228 * 1024;

// The limit is a per-device function attribute, so it is raised once per (kernel, device): a process that drives
// several GPUs (pmap, shard_map) must configure each of them. `configured` is a bit set of device ordinals, one
// static per kernel instantiation at the call site; racing threads set the same attribute, which is harmless.
// Devices >= 64 are configured on every call (correct, just not cached).
template <class Kernel>
cudaError_t raise_smem_limit_once(Kernel kernel, int smem, std::atomic<uint64_t>& configured) {
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
  if (bit != 0 && (configured.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) configured.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

}  // namespace dmattn
