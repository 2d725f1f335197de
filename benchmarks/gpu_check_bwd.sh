#!/usr/bin/env bash
# One-call GPU check of the CUDA backward: build + install jax_dmattn with the CUDA kernels, run
# tests/test_cuda_bwd.py, run benchmarks/bench_backward.py.
#
#   bash benchmarks/gpu_check_bwd.sh                 # everything
#   STEPS="build test" PYTEST_ARGS="-k oracle" bash benchmarks/gpu_check_bwd.sh
#   BENCH_ARGS="--cases standard --lengths 16384" bash benchmarks/gpu_check_bwd.sh
#
# Same install steps as benchmarks/gpu_check.sh (CUTLASS headers from CUTLASS_INCLUDE_DIR or the nvidia-cutlass
# wheel in .whl/, --no-build-isolation against the installed jaxlib, one CUDA arch). Logs and results go to $OUT.
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
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=${DMATTN_CUDA_ARCHS}"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  t0=$(date +%s)
  if python3 -m pip install --no-build-isolation --no-deps -v . >"$OUT/build.log" 2>&1; then
    echo "build: ok in $(( $(date +%s) - t0 )) s"
    grep -E "bwd.*(spill|registers)|Compiling entry.*bwd" "$OUT/build.log" | head -4 || true
  else
    echo "build: FAILED (tail of $OUT/build.log)"; grep -E "error|Error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"
    exit 1
  fi
fi

# Tests and benchmark run from outside the repo so that the installed package (with its extension) is imported.
cd /tmp
python3 -c "import jax, jax_dmattn; from jax_dmattn import _cuda_bwd; print('backend', jax.default_backend(), jax.devices()[0].device_kind, 'cuda bwd', _cuda_bwd.available())"

if [[ " $STEPS " == *" test "* ]]; then
  t0=$(date +%s)
  timeout ${TEST_TIMEOUT:-900} python3 -m pytest -q -rfE -p no:cacheprovider "$REPO/tests/test_cuda_bwd.py" ${PYTEST_ARGS:-} \
    --junitxml="$OUT/test_cuda_bwd.xml" >"$OUT/test_cuda_bwd.log" 2>&1
  rc=$?; status=$((status | rc)); echo "tests/test_cuda_bwd.py: rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/test_cuda_bwd.log" | cut -c1-300 | tail -30
fi

if [[ " $STEPS " == *" bench "* ]]; then
  t0=$(date +%s)
  PYTHONUNBUFFERED=1 timeout ${BENCH_TIMEOUT:-900} python3 "$REPO/benchmarks/bench_backward.py" --out "$OUT/bench_bwd.json" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_bwd.log" | grep -v "^WARNING"
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
exit $status
