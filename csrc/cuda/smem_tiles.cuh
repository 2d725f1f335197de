// Shared-memory tiles as the sm80 kernels (forward, backward, key-list backward) use them: filled from global
// memory with row predicates (copy_rows), multiplied from shared memory (gemm_ss), the product's accumulator seen
// as (rows, cols) (rowcol_layout). One definition, so the kernels' load and MMA loops stay the same instruction
// sequence.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <type_traits>

#include "log_constants.h"

namespace dmattn {

// The sm80 kernels' exponents take log2-domain arguments (kLog2e). Scores stay in natural units and a difference is
// scaled after the subtraction, (s - m) * log2(e): s - m is exact near the max, so the top term is exactly 1 at any
// magnitude (a fused s * log2(e) - m * log2(e) is off by the rounding of m * log2(e), which is huge for logits of
// 1e9), and the backward recomputes P = exp(s - lse) from the very same s.

// max that propagates NaN (max.NaN, sm_80+): fmaxf drops a NaN operand, but a NaN logit of a kept key must make
// its row NaN.
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ bool is_nonfinite(float x) { return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u; }

// Non-finite detection on raw 16-bit elements (bf16 / f16), two per 32-bit word. Adding one to a half's exponent
// field carries into its sign bit only when the field is all ones (inf or NaN); the lower half cannot carry into
// the upper one. OR the results of many words and test kNonfiniteBits once: three integer ops a word, so the
// kernels can afford to scan every tile they load.
template <class Elem>
__device__ __forceinline__ uint32_t nonfinite_halves(uint32_t w) {
  constexpr bool kBF16 = std::is_same_v<Elem, cutlass::bfloat16_t> || std::is_same_v<Elem, __nv_bfloat16>;
  constexpr uint32_t kExp = kBF16 ? 0x7f807f80u : 0x7c007c00u;
  constexpr uint32_t kOne = kBF16 ? 0x00800080u : 0x04000400u;
  return (w & kExp) + kOne;
}
constexpr uint32_t kNonfiniteBits = 0x80008000u;

// nonfinite_halves of a 16-byte piece (8 elements) in shared memory.
template <class Elem>
__device__ __forceinline__ uint32_t piece_nonfinite_bits(const void* piece) {
  const uint4 w = *reinterpret_cast<const uint4*>(piece);
  return nonfinite_halves<Elem>(w.x) | nonfinite_halves<Elem>(w.y) | nonfinite_halves<Elem>(w.z) |
         nonfinite_halves<Elem>(w.w);
}

// piece_nonfinite_bits of a piece at a shared-memory byte address.
template <class Elem>
__device__ __forceinline__ uint32_t shared_piece_nonfinite_bits(uint32_t addr) {
  uint32_t w0, w1, w2, w3;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(w0), "=r"(w1), "=r"(w2), "=r"(w3) : "r"(addr));
  return nonfinite_halves<Elem>(w0) | nonfinite_halves<Elem>(w1) | nonfinite_halves<Elem>(w2) |
         nonfinite_halves<Elem>(w3);
}

// Whether any 16-byte piece of a thread's partition of a tiled cp.async copy (CPY, CPY_M, CPY_K; CPY = 8 contiguous
// elements) holds an inf or NaN. Called after cp_async_wait by the thread that issued the copies, whose own writes
// are visible to it without a barrier.
template <class Elem, class T>
__device__ __forceinline__ bool own_pieces_nonfinite(T const& t) {
  uint32_t bits = 0;
  CUTE_UNROLL
  for (int m = 0; m < cute::size<1>(t); ++m) {
    CUTE_UNROLL
    for (int k = 0; k < cute::size<2>(t); ++k) bits |= piece_nonfinite_bits<Elem>(&t(0, m, k));
  }
  return (bits & kNonfiniteBits) != 0;
}

// Zeroes the inf / NaN elements of a 16-byte piece in shared memory; true if there were any.
template <class Elem>
__device__ __forceinline__ bool zero_nonfinite_piece(void* piece) {
  uint4 w = *reinterpret_cast<uint4*>(piece);
  uint32_t* x = reinterpret_cast<uint32_t*>(&w);
  bool any = false;
  CUTE_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t f = nonfinite_halves<Elem>(x[i]);
    const uint32_t keep = ((f & 0x8000u) ? 0u : 0x0000ffffu) | ((f & 0x80000000u) ? 0u : 0xffff0000u);
    any |= keep != 0xffffffffu;
    x[i] &= keep;
  }
  if (any) *reinterpret_cast<uint4*>(piece) = w;
  return any;
}

// Accumulator layout ((2 cols, 2 row halves), MMA_M, MMA_N) viewed as (rows, cols).
template <class L>
__device__ __forceinline__ auto rowcol_layout(L l) {
  return cute::make_layout(cute::make_layout(cute::get<0, 1>(l), cute::get<1>(l)),
                           cute::make_layout(cute::get<0, 0>(l), cute::get<2>(l)));
}

// Row-predicated tile copy (gmem -> smem); rows at or past max_rows are zero-filled.
template <class TiledCopy, class S, class D, class C>
__device__ __forceinline__ void copy_rows(TiledCopy const& tc, S const& src, D& dst, C const& coord, int max_rows) {
  using cute::_;
  CUTE_UNROLL
  for (int m = 0; m < cute::size<1>(src); ++m) {
    if (cute::get<0>(coord(0, m, 0)) < max_rows) {
      cute::copy(tc, src(_, m, _), dst(_, m, _));
    } else {
      cute::clear(dst(_, m, _));
    }
  }
}

// acc += A(smem) * B(smem), with ldmatrix of the next k slice overlapping the current mma.
template <class Acc, class RA, class RB, class SA, class SB, class Mma, class CA, class TA, class CB, class TB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB, Mma const& mma,
                                        CA const& cpA, TA const& thrA, CB const& cpB, TB const& thrB) {
  using cute::_;
  auto rA_v = thrA.retile_D(rA);
  auto rB_v = thrB.retile_D(rB);
  cute::copy(cpA, sA(_, _, 0), rA_v(_, _, 0));
  cute::copy(cpB, sB(_, _, 0), rB_v(_, _, 0));
  CUTE_UNROLL
  for (int kk = 0; kk < cute::size<2>(rA); ++kk) {
    if (kk + 1 < cute::size<2>(rA)) {
      cute::copy(cpA, sA(_, _, kk + 1), rA_v(_, _, kk + 1));
      cute::copy(cpB, sB(_, _, kk + 1), rB_v(_, _, kk + 1));
    }
    cute::gemm(mma, rA(_, _, kk), rB(_, _, kk), acc);
  }
}

}  // namespace dmattn
