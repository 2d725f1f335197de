// Forward instantiations for head dim 128 (bf16 and fp16).
#include "cuda/flash_fwd_launch.cuh"

DMATTN_INSTANTIATE_FWD(128)
