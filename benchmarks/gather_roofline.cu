// The memory roofline of a masked decoding step's gather, as an anchor for the few-rows key-list forward
// (docs/decoding.md): B = 8, Hkv = 8 units, each 2048 sorted random keys of L = 64K, K and V [B, L, Hkv, D = 128]
// 16-bit; each key's K and V rows (256 bytes each) copied by cp.async in 16-byte pieces into a ring of S shared-memory
// stages of 64 keys (what the forward's gather does, without any compute), the units' lists cut into `parts` CTAs;
// and a plain stream copy of the same bytes. Prints the median time of 30 runs and the bytes gathered over it.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -o /tmp/gather_roofline benchmarks/gather_roofline.cu && /tmp/gather_roofline
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <random>
#include <cuda_runtime.h>
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("err %s line %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)
constexpr int D = 128, ROWB = 2 * D;  // bytes of a row
__device__ __forceinline__ void cp16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst), "l"(src));
}
template <int S>
__global__ void __launch_bounds__(256) gather(const uint8_t* k, const uint8_t* v, const int* keys, int kept, int parts,
                                              int hkv, int64_t row_stride, float* sink) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int unit = blockIdx.x / parts, part = blockIdx.x % parts;
  const int b = unit / hkv, h = unit % hkv;
  const int per = kept / parts, n_chunks = per / 64;
  const int* ks = keys + int64_t(unit) * kept + part * per;
  const int tid = threadIdx.x;
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  constexpr int kStage = 64 * (ROWB + 16) * 2;
  // 64 rows x 16 pieces = 1024 pieces of K, same of V: 4 each per thread.
  auto issue = [&](int c) {
    const uint32_t base = ring + (c % S) * kStage;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + 256 * i, row = e / 16, piece = e % 16;
      const int key = ks[c * 64 + row];
      const int64_t off = (int64_t(b) * 65536 + key) * row_stride + int64_t(h) * ROWB + piece * 16;
      cp16(base + row * (ROWB + 16) + piece * 16, k + off);
      cp16(base + 64 * (ROWB + 16) + row * (ROWB + 16) + piece * 16, v + off);
    }
  };
  for (int s = 0; s < S - 1; ++s) { if (s < n_chunks) issue(s); asm volatile("cp.async.commit_group;\n"); }
  float acc = 0.f;
  for (int c = 0; c < n_chunks; ++c) {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(S - 2));
    __syncthreads();
    if (c + S - 1 < n_chunks) issue(c + S - 1);
    asm volatile("cp.async.commit_group;\n");
    acc += reinterpret_cast<const float*>(smem + (c % S) * kStage)[tid];
  }
  if (acc == 12345.f) sink[0] = acc;
}
__global__ void stream_copy(const int4* src, int4* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) dst[i] = src[i];
}
int main() {
  const int B = 8, HKV = 8, L = 65536, KEPT = 2048;
  const int64_t row_stride = int64_t(HKV) * ROWB;  // bytes between keys
  const size_t bytes = size_t(B) * L * row_stride;
  uint8_t *k, *v; int* keys; float* sink;
  CK(cudaMalloc(&k, bytes)); CK(cudaMalloc(&v, bytes)); CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(k, 1, bytes)); CK(cudaMemset(v, 1, bytes));
  std::vector<int> hk(size_t(B) * HKV * KEPT);
  std::mt19937 rng(1);
  std::vector<int> perm(L);
  for (int u = 0; u < B * HKV; ++u) {
    for (int i = 0; i < L; ++i) perm[i] = i;
    for (int i = 0; i < KEPT; ++i) std::swap(perm[i], perm[i + rng() % (L - i)]);
    std::sort(perm.begin(), perm.begin() + KEPT);
    std::copy(perm.begin(), perm.begin() + KEPT, hk.begin() + size_t(u) * KEPT);
  }
  CK(cudaMalloc(&keys, hk.size() * 4)); CK(cudaMemcpy(keys, hk.data(), hk.size() * 4, cudaMemcpyHostToDevice));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  const double moved = double(B) * HKV * KEPT * 2 * ROWB;
  auto timeit = [&](auto launch, const char* name, double mb) {
    for (int i = 0; i < 5; ++i) launch();
    std::vector<float> t;
    for (int r = 0; r < 30; ++r) { cudaEventRecord(e0); launch(); cudaEventRecord(e1); CK(cudaEventSynchronize(e1)); float ms; cudaEventElapsedTime(&ms, e0, e1); t.push_back(ms); }
    std::sort(t.begin(), t.end());
    printf("%-36s %8.2f us  %7.0f GB/s\n", name, t[15] * 1e3, mb / (t[15] * 1e-3) / 1e9);
  };
  char name[128];
#define RUN(S) \
  for (int parts : {1, 2, 4, 8, 16}) { \
    const int smem = S * 64 * (ROWB + 16) * 2; \
    CK(cudaFuncSetAttribute(gather<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem)); \
    snprintf(name, sizeof name, "gather S=%d parts=%d ctas=%d", S, parts, B * HKV * parts); \
    timeit([&] { gather<S><<<B * HKV * parts, 256, smem>>>(k, v, keys, KEPT, parts, HKV, row_stride, sink); }, name, moved); \
    CK(cudaGetLastError()); }
  RUN(2) RUN(3) RUN(4) RUN(6)
  int4* dst; CK(cudaMalloc(&dst, 256 << 20));
  const int64_t n = (int64_t(moved) / 2) / 16;  // copy `moved` bytes total (read + write)
  timeit([&] { stream_copy<<<132 * 8, 512>>>(reinterpret_cast<const int4*>(k), dst, n); }, "stream copy (read+write)", moved);
  const int64_t n2 = int64_t(moved) / 16;
  timeit([&] { stream_copy<<<132 * 8, 512>>>(reinterpret_cast<const int4*>(k), dst, n2); }, "stream copy 2x (read+write)", 2 * moved);
  return 0;
}
