# CUDA kernels: built when a CUDA toolkit and the CuTe headers are found (DMATTN_CUDA=AUTO), or required (ON).
set(DMATTN_WITH_CUDA OFF)
if(NOT DMATTN_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  include(cmake/Cutlass.cmake)
  if(CMAKE_CUDA_COMPILER AND DMATTN_CUTLASS_FOUND)
    set(DMATTN_WITH_CUDA ON)
  elseif(DMATTN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "jax_dmattn: DMATTN_CUDA=ON needs nvcc and the CuTe headers "
                        "(`pip install --no-deps nvidia-cutlass==4.2.0.0` or CUTLASS_INCLUDE_DIR)")
  elseif(CMAKE_CUDA_COMPILER)
    message(WARNING "jax_dmattn: nvcc found but no CuTe headers: building CPU kernels only. "
                    "`pip install --no-deps nvidia-cutlass==4.2.0.0` to build the CUDA kernels.")
  endif()
endif()

if(DMATTN_WITH_CUDA)
  # 90a code runs on sm_90a devices only, so its PTX could never be compiled for another device: embed its SASS alone
  # (90a-real), which keeps the PTX text out of the module. 80 keeps its PTX, from which newer devices can compile.
  list(TRANSFORM DMATTN_CUDA_ARCHS REPLACE "^90a$" "90a-real" OUTPUT_VARIABLE DMATTN_CUDA_ARCH_CODES)
  set(CMAKE_CUDA_ARCHITECTURES "${DMATTN_CUDA_ARCH_CODES}")
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  find_package(CUDAToolkit REQUIRED)

  file(GLOB DMATTN_CUDA_KERNELS CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")
  # One instantiation file per (kernel, head dim), generated from the head-dim list of csrc/kernel_facts.h, so that
  # the list lives in one place and every file compiles in parallel.
  set(_facts "${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernel_facts.h")
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${_facts}")
  function(dmattn_head_dims macro out)  # the X(D) items of `#define <macro>(X) ...` in kernel_facts.h
    file(STRINGS "${_facts}" _line REGEX "^#define ${macro}\\(X\\)")
    string(REGEX MATCHALL "X\\(([0-9]+)\\)" _items "${_line}")
    string(REGEX REPLACE "X\\(([0-9]+)\\)" "\\1" _dims "${_items}")
    if(NOT _dims)
      message(FATAL_ERROR "jax_dmattn: no head dims found in ${_facts} (${macro})")
    endif()
    set(${out} "${_dims}" PARENT_SCOPE)
  endfunction()
  dmattn_head_dims(DMATTN_FOR_EACH_CUDA_HEAD_DIM DMATTN_CUDA_HEAD_DIMS)
  set(_kernels
    "fwd|Forward|cuda/flash_fwd_launch.cuh|DMATTN_INSTANTIATE_FWD"
    "bwd|Backward|cuda/flash_bwd_launch.cuh|DMATTN_INSTANTIATE_BWD"
    "bwd_key_list|Key-list backward|cuda/flash_bwd_key_list_launch.cuh|DMATTN_INSTANTIATE_BWD_KEY_LIST")
  foreach(_kernel IN LISTS _kernels)
    string(REPLACE "|" ";" _fields "${_kernel}")
    list(GET _fields 0 _name)
    list(GET _fields 1 DMATTN_WHAT)
    list(GET _fields 2 DMATTN_HEADER)
    list(GET _fields 3 DMATTN_MACRO)
    foreach(DMATTN_D IN LISTS DMATTN_CUDA_HEAD_DIMS)
      set(_out "${CMAKE_CURRENT_BINARY_DIR}/generated/flash_${_name}_hdim${DMATTN_D}.cu")
      configure_file("${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/instantiation.cu.in" "${_out}" @ONLY)
      list(APPEND DMATTN_CUDA_KERNELS "${_out}")
    endforeach()
  endforeach()
  # The Hopper forward and backward (csrc/cuda/sm90/): built when 90a is among the archs, only for 90a (its wgmma / TMA code has
  # no sm80 form), from CUTLASS's Hopper FMHA collectives that the nvidia-cutlass wheel ships beside the headers.
  set(DMATTN_FMHA_DIR "${CUTLASS_INCLUDE_DIR}/../examples/88_hopper_fmha")
  set(DMATTN_WITH_SM90 OFF)
  if("90a" IN_LIST DMATTN_CUDA_ARCHS AND EXISTS "${DMATTN_FMHA_DIR}/collective/fmha_common.hpp")
    set(DMATTN_WITH_SM90 ON)
    dmattn_head_dims(DMATTN_FOR_EACH_SM90_HEAD_DIM DMATTN_SM90_HEAD_DIMS)
    dmattn_head_dims(DMATTN_FOR_EACH_SM90_BWD_HEAD_DIM DMATTN_SM90_BWD_HEAD_DIMS)
    set(_sm90_sources "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm90/sm90_route.cu"
                      "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm90/flash_fwd_sm90_dispatch.cu"
                      "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm90/flash_fwd_exact_rows.cu"
                      "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/sm90/flash_bwd_sm90_dispatch.cu")
    set(_sm90_kernels
      "fwd_sm90|Hopper forward|cuda/sm90/flash_fwd_sm90_launch.cuh|DMATTN_INSTANTIATE_FWD_SM90|DMATTN_SM90_HEAD_DIMS"
      "fwd_key_list_sm90|Hopper key-list forward|cuda/sm90/flash_fwd_key_list_sm90_kernel.cuh|DMATTN_INSTANTIATE_FWD_KEY_LIST_SM90|DMATTN_SM90_HEAD_DIMS"
      "bwd_sm90|Hopper backward|cuda/sm90/flash_bwd_sm90_launch.cuh|DMATTN_INSTANTIATE_BWD_SM90|DMATTN_SM90_BWD_HEAD_DIMS"
      "bwd_key_list_sm90|Hopper key-list backward|cuda/sm90/flash_bwd_key_list_sm90_kernel.cuh|DMATTN_INSTANTIATE_BWD_KEY_LIST_SM90|DMATTN_SM90_BWD_HEAD_DIMS")
    foreach(_kernel IN LISTS _sm90_kernels)
      string(REPLACE "|" ";" _fields "${_kernel}")
      list(GET _fields 0 _name)
      list(GET _fields 1 DMATTN_WHAT)
      list(GET _fields 2 DMATTN_HEADER)
      list(GET _fields 3 DMATTN_MACRO)
      list(GET _fields 4 _dims)
      foreach(DMATTN_D IN LISTS ${_dims})
        set(_out "${CMAKE_CURRENT_BINARY_DIR}/generated/flash_${_name}_hdim${DMATTN_D}.cu")
        configure_file("${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/instantiation.cu.in" "${_out}" @ONLY)
        list(APPEND _sm90_sources "${_out}")
      endforeach()
    endforeach()
    add_library(dmattn_sm90 OBJECT ${_sm90_sources})
    set_target_properties(dmattn_sm90 PROPERTIES CUDA_ARCHITECTURES 90a-real POSITION_INDEPENDENT_CODE ON)
    target_include_directories(dmattn_sm90 PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
    target_include_directories(dmattn_sm90 SYSTEM PRIVATE ${CUTLASS_INCLUDE_DIR} "${DMATTN_FMHA_DIR}"
                               ${CUDAToolkit_INCLUDE_DIRS})
    # NDEBUG whatever the build type: CuTe's device asserts are function calls, and a call between wgmma issue and
    # wait serialises the tensor-core pipeline (ptxas C7510).
    target_compile_definitions(dmattn_sm90 PRIVATE DMATTN_WITH_CUDA=1 DMATTN_WITH_SM90=1 NDEBUG)
    target_compile_options(dmattn_sm90 PRIVATE --expt-relaxed-constexpr -lineinfo -O3)
    target_sources(_jax_dmattn_ext PRIVATE $<TARGET_OBJECTS:dmattn_sm90>)
    target_compile_definitions(_jax_dmattn_ext PRIVATE DMATTN_WITH_SM90=1)
  elseif("90a" IN_LIST DMATTN_CUDA_ARCHS)
    message(WARNING "jax_dmattn: no CUTLASS Hopper FMHA collectives at ${DMATTN_FMHA_DIR}: "
                    "building without the Hopper kernels (sm80 kernels on every device)")
  endif()
  file(GLOB DMATTN_CUDA_HANDLERS CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ffi/cuda_*.cc")
  target_sources(_jax_dmattn_ext PRIVATE ${DMATTN_CUDA_KERNELS} ${DMATTN_CUDA_HANDLERS})
  # The target exists before CUDA is enabled, so it does not pick up CMAKE_CUDA_ARCHITECTURES by itself.
  set_target_properties(_jax_dmattn_ext PROPERTIES CUDA_ARCHITECTURES "${DMATTN_CUDA_ARCH_CODES}")
  target_compile_definitions(_jax_dmattn_ext PRIVATE DMATTN_WITH_CUDA=1)
  target_include_directories(_jax_dmattn_ext SYSTEM PRIVATE ${CUTLASS_INCLUDE_DIR} ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(_jax_dmattn_ext PRIVATE CUDA::cudart_static)
  target_compile_options(_jax_dmattn_ext PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo -O3>)
  message(STATUS "jax_dmattn: CUDA kernels ON for archs ${CMAKE_CUDA_ARCHITECTURES}; Hopper kernels ${DMATTN_WITH_SM90}")
else()
  message(STATUS "jax_dmattn: CUDA kernels OFF")
endif()
