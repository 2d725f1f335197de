// Shared-memory tiles as the sm80 kernels (forward, backward, key-list backward) use them: filled from global
// memory with row predicates (copy_rows), multiplied from shared memory (gemm_ss), the product's accumulator seen
// as (rows, cols) (rowcol_layout). One definition, so the kernels' load and MMA loops stay the same instruction
// sequence.
#pragma once

#include <cute/tensor.hpp>

namespace dmattn {

// Scores are kept in the log2 domain (exp2f): natural-log quantities are scaled by log2(e) once.
constexpr float kLog2e = 1.4426950408889634f;

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
