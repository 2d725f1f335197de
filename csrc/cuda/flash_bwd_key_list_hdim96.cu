// Key-list backward instantiations for head dim 96 (bf16 and fp16).
#include "cuda/flash_bwd_key_list_kernel.cuh"

DMATTN_INSTANTIATE_BWD_KEY_LIST(96)
