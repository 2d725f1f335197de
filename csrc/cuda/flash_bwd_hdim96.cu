// Backward instantiations for head dim 96 (bf16 and fp16).
#include "cuda/flash_bwd_kernel.cuh"

DMATTN_INSTANTIATE_BWD(96)
