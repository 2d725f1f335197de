#!/usr/bin/env bash
# One-call GPU check: build + install jax_dmattn with the CUDA kernels, run the GPU tests, run the benchmark.
#
#   bash benchmarks/gpu_check.sh            # everything
#   STEPS="build test" bash benchmarks/gpu_check.sh
#   PYTEST_ARGS="-k skipping" BENCH_ARGS="--cases standard --lengths 16384" bash benchmarks/gpu_check.sh
#
# Needs nvcc, jax/jaxlib (the build uses the installed jaxlib's FFI headers: --no-build-isolation) and the
# CUTLASS headers: CUTLASS_INCLUDE_DIR, or the nvidia-cutlass wheel in .whl/ (carried to machines without a
# registry), or an installed nvidia-cutlass. Logs and results go to $OUT (default ./gpu_check_out).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_check_out}
STEPS=${STEPS:-"build test bench"}
mkdir -p "$OUT"
cd "$REPO"
status=0

if [[ " $STEPS " == *" build "* ]]; then
  if [ -z "${CUTLASS_INCLUDE_DIR:-}" ] && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dmattn_cutlass \
      .whl/nvidia_cutlass-*.whl && export CUTLASS_INCLUDE_DIR=/tmp/dmattn_cutlass/cutlass_library/source/include
  fi
  export DMATTN_CUDA=${DMATTN_CUDA:-ON}
  export DMATTN_CUDA_ARCHS=${DMATTN_CUDA_ARCHS:-90a}
  # The extension target exists before enable_language(CUDA): give CMake the archs up front as well.
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=${DMATTN_CUDA_ARCHS}"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  t0=$(date +%s)
  if python3 -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
    echo "build: ok in $(( $(date +%s) - t0 )) s"
    grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | head -20 || true
  else
    echo "build: FAILED (tail of $OUT/build.log)"; grep -E "error|Error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"
    exit 1
  fi
fi

# Tests and benchmark run from outside the repo so that the installed package (with its extension) is imported.
cd /tmp
python3 -c "import jax, jax_dmattn; from jax_dmattn import _cuda; print('backend', jax.default_backend(), jax.devices()[0].device_kind, 'cuda kernels', _cuda.available())"

if [[ " $STEPS " == *" test "* ]]; then
  t0=$(date +%s)
  timeout ${TEST_TIMEOUT:-1800} python3 -m pytest -q -rfE -p no:cacheprovider "$REPO/tests/test_cuda_long.py" ${PYTEST_ARGS:-} \
    --junitxml="$OUT/test_cuda_long.xml" >"$OUT/test_cuda_long.log" 2>&1
  rc=$?; status=$((status | rc)); echo "tests/test_cuda_long.py: rc=$rc in $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/test_cuda_long.log" | cut -c1-300 | tail -25
  t0=$(date +%s)
  timeout ${SUITE_TIMEOUT:-1800} python3 -m pytest -q -rfE -p no:cacheprovider -m gpu "$REPO/tests" --ignore="$REPO/tests/test_cuda_long.py" \
    ${PYTEST_SUITE_ARGS:-} >"$OUT/test_suite_gpu.log" 2>&1
  rc=$?; [ $rc -eq 5 ] && rc=0  # no tests collected
  status=$((status | rc)); echo "suite -m gpu: rc=$rc in $(( $(date +%s) - t0 )) s"; grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/test_suite_gpu.log" | cut -c1-300 | tail -25
fi

if [[ " $STEPS " == *" bench "* ]]; then
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 python3 "$REPO/benchmarks/bench_attention.py" --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^WARNING"
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
exit $status
