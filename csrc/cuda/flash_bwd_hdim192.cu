// Backward instantiations for head dim 192 (bf16 and fp16).
#include "cuda/flash_bwd_kernel.cuh"

DMATTN_INSTANTIATE_BWD(192)
