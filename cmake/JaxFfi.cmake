# Locate the XLA FFI headers shipped with the jaxlib of the building interpreter.
if(NOT JAX_FFI_INCLUDE_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import jax; print(jax.ffi.include_dir())"
    OUTPUT_VARIABLE JAX_FFI_INCLUDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _jax_ffi_rc)
  if(NOT _jax_ffi_rc EQUAL 0 OR NOT EXISTS "${JAX_FFI_INCLUDE_DIR}/xla/ffi/api/ffi.h")
    message(FATAL_ERROR "jax_dmattn: could not find the XLA FFI headers via jax.ffi.include_dir(); "
                        "install jax and jaxlib in the building environment")
  endif()
endif()
message(STATUS "jax_dmattn: XLA FFI headers at ${JAX_FFI_INCLUDE_DIR}")
