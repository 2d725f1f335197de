// Forward instantiations for head dim 32 (bf16 and fp16).
#include "cuda/flash_fwd_launch.cuh"

DMATTN_INSTANTIATE_FWD(32)
