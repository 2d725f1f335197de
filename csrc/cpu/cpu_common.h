// Building blocks of the CPU kernels: dtype conversion, a fixed-shape GEMM micro-kernel, a vectorisable exp2,
// tile-class lookup and a small parallel-for. Everything is float32 inside.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "attention_params.h"

namespace dmattn::cpu {

// Query x key tile. Both are multiples of the micro-kernel's 4 x 16 tile; the tile-class map uses them too.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---------------------------------------------------------------------------------------- conversions
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
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
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
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
// 2^x for x <= 0 (softmax arguments), rel. error ~2e-7; x < -126 (incl. -inf) gives exactly 0. Branch-free so
// the compiler vectorises loops over it, which std::exp does not allow without -ffast-math.
inline float exp2_nonpositive(float x) {
  const bool underflow = !(x >= -126.f);
  x = underflow ? -126.f : x;
  const float n = std::floor(x);
  const float f = x - n;  // [0, 1)
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6182985e-3f;
  p = p * f + 5.5503406e-2f;
  p = p * f + 2.4022657e-1f;
  p = p * f + 6.9314706e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return underflow ? 0.f : p * scale;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

// C[M x N] += A[M x K] * B[K x N]; M % 4 == 0, N % 16 == 0; row-major with leading dims. The 4 x 16
// accumulator block stays in registers across the K loop.
inline void gemm_acc(int64_t M, int64_t N, int64_t K, const float* __restrict A, int64_t lda,
                     const float* __restrict B, int64_t ldb, float* __restrict C, int64_t ldc) {
  for (int64_t i = 0; i < M; i += 4) {
    for (int64_t j = 0; j < N; j += 16) {
      float acc[4][16];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 16; ++c) acc[r][c] = C[(i + r) * ldc + j + c];
      for (int64_t k = 0; k < K; ++k) {
        const float* b = B + k * ldb + j;
        for (int r = 0; r < 4; ++r) {
          const float a = A[(i + r) * lda + k];
#pragma GCC unroll 16
          for (int c = 0; c < 16; ++c) acc[r][c] += a * b[c];
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 16; ++c) C[(i + r) * ldc + j + c] = acc[r][c];
    }
  }
}

// dst[c][r] = src[r][c] for an R x C block.
inline void transpose(int64_t R, int64_t Cn, const float* src, int64_t lds, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < Cn; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// ---------------------------------------------------------------------------------------- tile classes
enum TileClass : uint8_t { kEmpty = 0, kPartial = 1, kFull = 2 };

// Classes of every (mask batch, mask head, query tile, key tile) in the mask's own broadcast shape.
class MaskTileMap {
 public:
  MaskTileMap() = default;
  explicit MaskTileMap(const BroadcastOperand& mask);
  // Class of query tile mt x key tile nt for (batch b, query head h); kFull when there is no mask.
  TileClass at(int64_t b, int64_t h, int64_t mt, int64_t nt) const {
    if (classes_.empty()) return kFull;
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
