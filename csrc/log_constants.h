// The softmax's change of base, for the CPU and CUDA kernels alike: exp(x) = 2^(x log2 e), ln(y) = ln 2 log2(y).
#pragma once

namespace dmattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace dmattn
