// Which keys a query row may see in the Hopper kernels without a mask (the forward's and the backward's mainloops
// are instantiated per rule).
#pragma once

namespace dmattn::sm90 {

// All keys; the bottom-right causal prefix (row i sees key j iff j <= i + Lk - Lq); or the row's bounds
// (row_bounds.h: segment ids, a window, sequence lengths, with causality folded in).
enum class KeyRule { kAll, kCausal, kBounded };

}  // namespace dmattn::sm90
