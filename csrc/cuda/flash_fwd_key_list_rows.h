// The forward over key lists (csrc/cuda/key_lists.h) for calls with few query rows: a decoding step, whose G packed
// query heads fill G of a key-list unit's 128 rows (jax_dmattn/_decode.py). The tile kernels (sm80
// flash_fwd_key_list_kernel.cuh, Hopper sm90/flash_fwd_key_list_sm90_kernel.cuh) run all 128 rows of the unit's
// tile and one CTA per multiprocessor; for G = 4 their per-chunk work is 32 times what the rows need, and a step's
// masked forward ran far below the bandwidth of the kept K/V rows.
//
// No tensor cores: one warp scores 32 keys at a time, one key per lane (the lane reads the key's whole K row and the
// query rows from shared memory, broadcast), runs the online softmax of its rows over them, and accumulates P V with
// each lane holding D / 32 output dims of every row (V rows read whole by the warp). The warps of a CTA take the
// unit's 32-key groups in turn and merge their (max, sum, out) at the end. Same logits (scale or softcap, bias, -inf
// bias drops a key), masks (list bits, or a dense unit's mask bytes), causal bound, NaN and non-finite V rules and
// empty-row convention as the tile kernels; P V uses fp32 P (the tile kernels round P to the input dtype).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "cuda/flash_fwd.h"

namespace dmattn {

// Whether the rows kernel takes the call: key lists, 1 <= Lq <= kKeyListRowsMax (kernel_facts.h).
bool flash_fwd_key_list_rows_serves(const FwdParams& p);

cudaError_t launch_flash_fwd_key_list_rows(const FwdParams& p, cudaStream_t stream);

// Launches so far (tests check the route).
int64_t flash_fwd_key_list_rows_launches();

}  // namespace dmattn
