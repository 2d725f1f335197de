// Head-dim / dtype dispatch of the forward (no CuTe here: the kernels live in the generated flash_fwd_hdim*.cu).
#include "cuda/flash_fwd.h"

namespace dmattn {

cudaError_t launch_flash_fwd(const FwdParams& p, cudaStream_t stream) {
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
