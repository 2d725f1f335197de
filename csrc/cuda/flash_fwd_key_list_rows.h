// The forward over key lists (csrc/cuda/key_lists.h) for calls with few query rows: a decoding step, whose G packed
// query heads fill G of a key-list unit's 128 rows (jax_dmattn/_decode.py). The tile kernels (sm80
// flash_fwd_key_list_kernel.cuh, Hopper sm90/flash_fwd_key_list_sm90_kernel.cuh) run all 128 rows of the unit's
// tile and one CTA per multiprocessor; for G = 4 their per-chunk work is 32 times what the rows need, and a step's
// masked forward ran far below the bandwidth of the kept K/V rows.
//
// The CTA (8 warps) gathers each 64-key chunk's K and V rows into a ring of shared-memory stages with cp.async (whole
// rows, one or two chunks in flight ahead of the one computed), so a step's list keeps its rows streaming. The G rows
// are the first rows of mma.sync's 16-row tiles: per chunk, warp w scores keys [8w, 8w + 8) against every row (the
// query rows stay in registers as A fragments, K arrives by ldmatrix), the warps' row maxima meet in shared memory so
// that every warp runs the same online softmax, and P (in the input dtype, as the tile kernels round it) times V
// accumulates each warp's 8-dim column tiles of the output. Where a chunk's V holds an inf or NaN (a scan of the
// copied pieces) its P V takes the per-element rules instead (a kept key's inf or NaN reaches its rows, a dropped key
// adds nothing: 0 * inf in an MMA would be NaN). Same logits (scale or softcap, bias, -inf bias drops a key), masks
// (list bits, or a dense unit's mask bytes), causal bound, NaN rules and empty-row convention as the tile kernels.
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
