// Building blocks of the CPU kernels: dtype conversion, a fixed-shape GEMM micro-kernel, a vectorisable exp2,
// tile-class lookup and a small parallel-for. Everything is float32 inside.
#pragma once
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "attention_params.h"
#include "kernel_facts.h"
#include "log_constants.h"

namespace dmattn::cpu {

// Query x key tile. Both are multiples of the micro-kernel's 4 x 16 tile; the tile-class map uses them too.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// The scratch arrays of one work item, of the given float counts, carved in order out of one buffer that each thread
// keeps between items (and calls), so that a kernel allocates once per thread, not once per tile. The arrays are
// valid until the calling thread's next call with as many arrays.
template <size_t N>
std::array<float*, N> thread_scratch(const int64_t (&sizes)[N]) {
  thread_local std::vector<float> buf;
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  buf.resize(total);
  std::array<float*, N> arrays;
  float* at = buf.data();
  for (size_t i = 0; i < N; ++i) {
    arrays[i] = at;
    at += sizes[i];
  }
  return arrays;
}

// ---------------------------------------------------------------------------------------- conversions
// A float's bits and back. C++17 has no std::bit_cast; memcpy is the defined way, and compiles to a register move.
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  return f32_from_bits(u);
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;             // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;            // overflow (incl. inf) after rounding
  if (abs < 0x38800000u) {                                  // subnormal or zero in half
    if (abs < 0x33000000u) return sign;                     // rounds to zero
    const uint32_t e = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                         // 14..24
    uint32_t half_mant = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;
    return sign | static_cast<uint16_t>(half_mant);
  }
  uint32_t r = abs - 0x38000000u;                           // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);                           // round to nearest even
  return sign | static_cast<uint16_t>(r >> 13);
}

inline float load_f32(const void* base, DType t, int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(base)[i];
    case DType::kBF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
}

// n contiguous elements starting at base[offset] -> dst (float32).
inline void load_row(const void* base, DType t, int64_t offset, int64_t n, float* dst) {
  switch (t) {
    case DType::kF32: std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float)); break;
    case DType::kBF16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(p[i]);
      break;
    }
    default: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(p[i]);
    }
  }
}

inline void store_row(void* base, DType t, int64_t offset, int64_t n, const float* src) {
  switch (t) {
    case DType::kF32: std::memcpy(static_cast<float*>(base) + offset, src, n * sizeof(float)); break;
    case DType::kBF16: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_bf16(src[i]);
      break;
    }
    default: {
      uint16_t* p = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = f32_to_f16(src[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------- math
// 2^x for x <= 0 (softmax arguments), rel. error ~1e-7; x < -126 (incl. -inf) gives exactly 0. Branch-free so
// the compiler vectorises loops over it, which std::exp does not allow without -ffast-math. The polynomial is a
// degree-6 Chebyshev fit of 2^f on [0, 1].
inline float exp2_nonpositive(float x) {
  const float xc = x < -126.f ? -126.f : x;
  const float n = std::floor(xc);
  const float f = xc - n;
  float p = 2.187750476e-04f;
  p = p * f + 1.238782153e-03f;
  p = p * f + 9.684580452e-03f;
  p = p * f + 5.548042628e-02f;
  p = p * f + 2.402305022e-01f;
  p = p * f + 6.931469286e-01f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, 4);
  return x < -126.f ? 0.f : p * pow2n;
}

constexpr float kNegInf = -INFINITY;

// C[M x N] += A[M x K] * B[K x N]; M % 4 == 0, N % 16 == 0; row-major with leading dims. A 4 x 16
// accumulator block stays in registers across the K loop (8 AVX2 registers where available).
inline void gemm_acc(int64_t M, int64_t N, int64_t K, const float* __restrict A, int64_t lda,
                     const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc) {
  for (int64_t i = 0; i < M; i += 4) {
    const float* a0 = A + i * lda;
    for (int64_t j = 0; j < N; j += 16) {
      float* c0 = C + i * ldc + j;
#if defined(__AVX2__) && defined(__FMA__)
      __m256 acc[4][2];
      for (int r = 0; r < 4; ++r) {
        acc[r][0] = _mm256_loadu_ps(c0 + r * ldc);
        acc[r][1] = _mm256_loadu_ps(c0 + r * ldc + 8);
      }
      for (int64_t k = 0; k < K; ++k) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb + j);
        const __m256 b1 = _mm256_loadu_ps(B + k * ldb + j + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 a = _mm256_broadcast_ss(a0 + r * lda + k);
          acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(c0 + r * ldc, acc[r][0]);
        _mm256_storeu_ps(c0 + r * ldc + 8, acc[r][1]);
      }
#else
      float acc[4][16];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 16; ++c) acc[r][c] = c0[r * ldc + c];
      for (int64_t k = 0; k < K; ++k) {
        const float* b = B + k * ldb + j;
        for (int r = 0; r < 4; ++r) {
          const float a = a0[r * lda + k];
          for (int c = 0; c < 16; ++c) acc[r][c] += a * b[c];
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 16; ++c) c0[r * ldc + c] = acc[r][c];
#endif
    }
  }
}

// gemm_acc over kept pairs only: C[i][j] += sum of A[i][k] * B[k][j] over the k with keep[i * keep_i + k * keep_k]
// set. A dropped pair adds nothing even where B holds NaN or inf, where gemm_acc would add 0 * NaN = NaN. A plain
// loop: it serves the rare tiles that hold a non-finite value. keep == nullptr keeps every pair (gemm_acc).
inline void gemm_acc_kept(int64_t M, int64_t N, int64_t K, const float* __restrict A, int64_t lda,
                          const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc,
                          const uint8_t* keep, int64_t keep_i, int64_t keep_k) {
  if (keep == nullptr) return gemm_acc(M, N, K, A, lda, B, ldb, C, ldc);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t k = 0; k < K; ++k) {
      if (!keep[i * keep_i + k * keep_k]) continue;
      const float a = A[i * lda + k];
      const float* b = B + k * ldb;
      float* c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// max(a, b), but NaN if either is NaN (std::max and the max instructions drop a NaN depending on its position).
inline float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// Reductions in 8 independent lanes, so they vectorise under strict IEEE semantics.
inline float lane_max(const float* x, int64_t n) {  // n % 8 == 0; NaN if any x is NaN
  float m[8];
  int nan[8];  // a flag beside the max, since a NaN-propagating select does not vectorise
  for (int l = 0; l < 8; ++l) {
    m[l] = x[l];
    nan[l] = x[l] != x[l];
  }
  for (int64_t c = 8; c < n; c += 8) {
    for (int l = 0; l < 8; ++l) {
      m[l] = x[c + l] > m[l] ? x[c + l] : m[l];
      nan[l] |= x[c + l] != x[c + l];
    }
  }
  float r = m[0];
  int any_nan = nan[0];
  for (int l = 1; l < 8; ++l) {
    r = m[l] > r ? m[l] : r;
    any_nan |= nan[l];
  }
  return any_nan ? NAN : r;
}

inline float lane_sum(const float* x, int64_t n) {  // n % 8 == 0
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t c = 0; c < n; c += 8)
    for (int l = 0; l < 8; ++l) s[l] += x[c + l];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

inline bool all_finite(const float* x, int64_t n) {
  uint32_t non_finite = 0;  // exponent bits all set: inf or NaN; integer ops, so the loop vectorises
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    non_finite |= (~u & 0x7f800000u) == 0;
  }
  return non_finite == 0;
}

// dst[c][r] = src[r][c] for an R x C block.
inline void transpose(int64_t R, int64_t Cn, const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cn; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// ---------------------------------------------------------------------------------------- tile classes

class MaskSource;  // cpu/mask_source.h: it includes this header (TileClass: kernel_facts.h)

// Classes of every (mask batch, mask head, query tile, key tile) in the mask's own broadcast shape
// (MaskSource::extent()).
class MaskTileMap {
 public:
  MaskTileMap() = default;
  explicit MaskTileMap(const MaskSource& mask);
  // Class of query tile mt x key tile nt for (batch b, query head h); kTileFull when there is no mask.
  TileClass at(int64_t b, int64_t h, int64_t mt, int64_t nt) const {
    if (classes_.empty()) return kTileFull;
    const int64_t mb = batch_ == 1 ? 0 : b;
    const int64_t mh = h / heads_per_index_;
    const int64_t m = rows_ == 1 ? 0 : mt;
    const int64_t n = cols_ == 1 ? 0 : nt;
    return static_cast<TileClass>(classes_[((mb * heads_ + mh) * m_tiles_ + m) * n_tiles_ + n]);
  }

 private:
  std::vector<uint8_t> classes_;
  int64_t batch_ = 1, heads_ = 1, rows_ = 1, cols_ = 1, heads_per_index_ = 1, m_tiles_ = 1, n_tiles_ = 1;
};

// ---------------------------------------------------------------------------------------- threads
int num_threads();
// Runs fn(item, thread) for item in [0, n). Static: item i runs on thread i % T in increasing order, so any
// per-thread accumulation is reproducible; otherwise items are handed out dynamically.
void parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn, bool static_schedule = false);

}  // namespace dmattn::cpu
