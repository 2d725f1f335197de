// The Python extension: exports every FFI handler as a capsule, grouped by platform.
#include <nanobind/nanobind.h>

#include "ffi/targets.h"

namespace nb = nanobind;

namespace {

nb::dict as_capsules(const std::vector<dmattn::FfiTarget>& targets) {
  nb::dict out;
  for (const auto& [name, handler] : targets) out[name] = nb::capsule(handler);
  return out;
}

}  // namespace

namespace dmattn {
#ifndef DMATTN_WITH_CUDA
std::vector<FfiTarget> cuda_fwd_targets() { return {}; }
std::vector<FfiTarget> cuda_bwd_targets() { return {}; }
std::vector<FfiTarget> cuda_key_lists_targets() { return {}; }
std::vector<FfiTarget> cuda_topk_key_lists_targets() { return {}; }
CudaHandlerRuns cuda_handler_runs() { return {}; }
#endif
}  // namespace dmattn

NB_MODULE(_jax_dmattn_ext, m) {
  m.def("cpu_targets", [] { return as_capsules(dmattn::cpu_targets()); });
  m.def("cuda_targets", [] {
    auto targets = dmattn::cuda_fwd_targets();
    for (const auto& t : dmattn::cuda_bwd_targets()) targets.push_back(t);
    for (const auto& t : dmattn::cuda_key_lists_targets()) targets.push_back(t);
    for (const auto& t : dmattn::cuda_topk_key_lists_targets()) targets.push_back(t);
    return as_capsules(targets);
  });
  m.def("cuda_handler_runs", [] {
    const auto r = dmattn::cuda_handler_runs();
    return nb::make_tuple(r.runs, r.captured);
  });
#ifdef DMATTN_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
