// Views of wgmma accumulators by (row, column), shared by the Hopper key-list kernels: the element-wise passes
// (logits, masks, softmax, dS) index a fragment as the sm80 kernels do.
#pragma once

#include <cute/tensor.hpp>

namespace dmattn::sm90 {

// A wgmma accumulator ((2 cols, 2 row halves, N / 8 col groups), MMA_M, MMA_N) viewed as (rows, cols).
template <class L>
__device__ __forceinline__ auto gmma_rowcol_layout(L l) {
  using namespace cute;
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

}  // namespace dmattn::sm90
