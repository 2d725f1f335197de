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
  set(CMAKE_CUDA_ARCHITECTURES "${DMATTN_CUDA_ARCHS}")
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  find_package(CUDAToolkit REQUIRED)

  file(GLOB DMATTN_CUDA_KERNELS CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")
  file(GLOB DMATTN_CUDA_HANDLERS CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/ffi/cuda_*.cc")
  target_sources(_jax_dmattn_ext PRIVATE ${DMATTN_CUDA_KERNELS} ${DMATTN_CUDA_HANDLERS})
  # The target exists before CUDA is enabled, so it does not pick up CMAKE_CUDA_ARCHITECTURES by itself.
  set_target_properties(_jax_dmattn_ext PROPERTIES CUDA_ARCHITECTURES "${DMATTN_CUDA_ARCHS}")
  target_compile_definitions(_jax_dmattn_ext PRIVATE DMATTN_WITH_CUDA=1)
  target_include_directories(_jax_dmattn_ext SYSTEM PRIVATE ${CUTLASS_INCLUDE_DIR} ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(_jax_dmattn_ext PRIVATE CUDA::cudart_static)
  target_compile_options(_jax_dmattn_ext PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo -O3>)
  message(STATUS "jax_dmattn: CUDA kernels ON for archs ${CMAKE_CUDA_ARCHITECTURES}")
else()
  message(STATUS "jax_dmattn: CUDA kernels OFF")
endif()
