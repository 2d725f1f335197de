# CUTLASS/CuTe headers: CUTLASS_INCLUDE_DIR (CMake or environment variable), else the nvidia-cutlass wheel of
# the building interpreter (cutlass_library/source/include). Sets DMATTN_CUTLASS_FOUND.
if(NOT CUTLASS_INCLUDE_DIR AND DEFINED ENV{CUTLASS_INCLUDE_DIR})
  set(CUTLASS_INCLUDE_DIR "$ENV{CUTLASS_INCLUDE_DIR}")
endif()
if(NOT CUTLASS_INCLUDE_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source', 'include') if s else '')"
    OUTPUT_VARIABLE CUTLASS_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE)
endif()
if(CUTLASS_INCLUDE_DIR AND EXISTS "${CUTLASS_INCLUDE_DIR}/cute/tensor.hpp")
  set(DMATTN_CUTLASS_FOUND ON)
  message(STATUS "jax_dmattn: CUTLASS headers at ${CUTLASS_INCLUDE_DIR}")
else()
  set(DMATTN_CUTLASS_FOUND OFF)
endif()
