// Sparse (key-list) backward instantiations for head dim 64 (bf16 and fp16).
#include "cuda/flash_bwd_sparse_kernel.cuh"

DMATTN_INSTANTIATE_BWD_SPARSE(64)
