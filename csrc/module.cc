// The Python extension: every FFI handler as a capsule, grouped by platform, and the kernel facts (kernel_facts.h).
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>

#include <array>

#include "attention_params.h"
#include "ffi/targets.h"
#include "kernel_facts.h"
#if defined(DMATTN_WITH_CUDA)
#include "cuda/flash_fwd_key_list_rows.h"
#endif
#if defined(DMATTN_WITH_SM90)
#include "cuda/sm90/flash_bwd_sm90.h"
#include "cuda/sm90/flash_fwd_sm90.h"
#endif

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

namespace {

nb::dict kernel_facts() {
  using namespace dmattn;
  auto tuple_of = [](const auto& dims) {
    nb::list l;
    for (int d : dims) l.append(d);
    return nb::tuple(l);
  };
  nb::list key_list_bwd_rows;  // (head dim, rows per CTA) of every key-list backward build, preferred first
  for (int d : kCudaHeadDims)
    for (int rows : {128, 64})
      if (key_list_bwd_has_rows(d, rows)) key_list_bwd_rows.append(nb::make_tuple(d, rows));
  nb::dict f;
  f["fwd_block_m"] = kFwdBlockM;
  f["fwd_block_n"] = kFwdBlockN;
  f["bwd_block_m"] = kBwdBlockM;
  f["bwd_block_n"] = kBwdBlockN;
  f["cuda_head_dims"] = tuple_of(kCudaHeadDims);
  f["sm90_fwd_head_dims"] = tuple_of(kSm90FwdHeadDims);
  f["sm90_bwd_head_dims"] = tuple_of(kSm90BwdHeadDims);
#if defined(DMATTN_WITH_SM90)
  f["sm90_built"] = true;  // the Hopper forward and backward are in this build (csrc/cuda/sm90/, arch 90a)
#else
  f["sm90_built"] = false;
#endif
  f["key_list_block_m"] = kKeyListBlockM;
  f["key_list_chunk"] = kKeyListChunk;
  f["key_list_dense"] = kKeyListDense;
  f["key_list_max_keys"] = kKeyListMaxKeys;
  f["key_list_tile_min_visible"] = kKeyListTileMinVisible;
  f["key_list_rows_max"] = kKeyListRowsMax;
  f["topk_lists_max_k"] = kTopKListsMaxK;
  f["topk_bounded_group_spread"] = kTopKBoundedGroupSpread;
  f["topk_bounded_lists_max_k"] = kTopKBoundedListsMaxK;
  f["fixed_stats_words"] = kFixedStatsWords;
  f["key_list_bwd_rows"] = nb::tuple(key_list_bwd_rows);
  nb::dict mask_kinds;  // the CPU targets' mask_kind attribute
  mask_kinds["bool"] = static_cast<int>(MaskKind::kBool);
  mask_kinds["topk"] = static_cast<int>(MaskKind::kTopK);
  mask_kinds["indices"] = static_cast<int>(MaskKind::kKeyIndices);
  f["mask_kinds"] = mask_kinds;
  return f;
}

}  // namespace

NB_MODULE(_jax_dmattn_ext, m) {
  m.def("kernel_facts", &kernel_facts);
  m.def("key_list_bwd_smem_bytes", &dmattn::key_list_bwd_smem_bytes, nb::arg("head_dim"), nb::arg("rows"));
  m.def("topk_bounded_list_capacity", &dmattn::topk_bounded_list_capacity, nb::arg("k"), nb::arg("q_len"),
        nb::arg("key_segments"), nb::arg("kv_len"));
  m.def("dbias_tiles_get_several_flushes",
        [](std::array<int64_t, 4> bias_dims, int64_t batch, int64_t heads, int64_t kv_heads) {
          return dmattn::dbias_tiles_get_several_flushes(bias_dims.data(), batch, heads, kv_heads);
        });
  m.def("key_list_bwd_accum_kv_heads", &dmattn::key_list_bwd_accum_kv_heads, nb::arg("batch"), nb::arg("q_len"),
        nb::arg("heads"), nb::arg("kv_len"), nb::arg("kv_heads"), nb::arg("head_dim"), nb::arg("deterministic"));
  m.def("uses_key_list_path", &dmattn::uses_key_list_path, nb::arg("has_mask"), nb::arg("mask_cols"),
        nb::arg("has_bias"), nb::arg("bias_rows"), nb::arg("kv_len"));
  m.def("cpu_targets", [] { return as_capsules(dmattn::cpu_targets()); });
  m.def("cuda_targets", [] {
    auto targets = dmattn::cuda_fwd_targets();
    for (const auto& t : dmattn::cuda_bwd_targets()) targets.push_back(t);
    for (const auto& t : dmattn::cuda_key_lists_targets()) targets.push_back(t);
    for (const auto& t : dmattn::cuda_topk_key_lists_targets()) targets.push_back(t);
    return as_capsules(targets);
  });
  m.def("sm90_fwd_launches", [] {  // calls the Hopper forward has served (0 where it is not built)
#if defined(DMATTN_WITH_SM90)
    return dmattn::flash_fwd_sm90_launches();
#else
    return int64_t{0};
#endif
  });
  m.def("fwd_key_list_rows_launches", [] {  // calls the few-rows key-list forward has served
#if defined(DMATTN_WITH_CUDA)
    return dmattn::flash_fwd_key_list_rows_launches();
#else
    return int64_t{0};
#endif
  });
  m.def("sm90_fwd_key_list_launches", [] {  // calls the Hopper key-list forward has served
#if defined(DMATTN_WITH_SM90)
    return dmattn::flash_fwd_key_list_sm90_launches();
#else
    return int64_t{0};
#endif
  });
  m.def("sm90_fwd_tile_units_launches", [] {  // key-list calls whose tile units the Hopper forward served
#if defined(DMATTN_WITH_SM90)
    return dmattn::flash_fwd_sm90_tile_unit_launches();
#else
    return int64_t{0};
#endif
  });
  m.def("sm90_bwd_launches", [] {  // calls the Hopper backward has served (0 where it is not built)
#if defined(DMATTN_WITH_SM90)
    return dmattn::flash_bwd_sm90_launches();
#else
    return int64_t{0};
#endif
  });
  m.def("sm90_bwd_key_list_launches", [] {  // calls the Hopper key-list backward has served
#if defined(DMATTN_WITH_SM90)
    return dmattn::flash_bwd_key_list_sm90_launches();
#else
    return int64_t{0};
#endif
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
