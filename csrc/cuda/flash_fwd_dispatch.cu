// Head-dim / dtype dispatch of the forward, and its routes to the few-rows key-list forward and the Hopper forwards
// where they serve the call (no CuTe here: the kernels live in flash_fwd_key_list_rows.cu, the generated
// flash_fwd_hdim*.cu and csrc/cuda/sm90/).
#include "cuda/flash_fwd.h"
#include "cuda/flash_fwd_key_list_rows.h"
#if defined(DMATTN_WITH_SM90)
#include "cuda/sm90/flash_fwd_sm90.h"
#endif

namespace dmattn {

cudaError_t launch_flash_fwd(const FwdParams& p, cudaStream_t stream) {
  // A few query rows over key lists (a decoding step): the tile kernels would run 128 rows for them.
  if (flash_fwd_key_list_rows_serves(p)) return launch_flash_fwd_key_list_rows(p, stream);
#if defined(DMATTN_WITH_SM90)
  if (flash_fwd_sm90_serves(p)) return launch_flash_fwd_sm90(p, stream);
  if (flash_fwd_key_list_sm90_serves(p)) return launch_flash_fwd_key_list_sm90(p, stream);
#endif
#define DMATTN_FWD_CASE(D) \
  case D:                  \
    return p.is_bf16 ? run_flash_fwd<D, true>(p, stream) : run_flash_fwd<D, false>(p, stream);
  switch (p.head_dim) {
    DMATTN_FOR_EACH_CUDA_HEAD_DIM(DMATTN_FWD_CASE)
    default:
      return cudaErrorInvalidValue;
  }
#undef DMATTN_FWD_CASE
}

}  // namespace dmattn
