#!/usr/bin/env bash
# One-call GPU check: build + install jax_dmattn with the CUDA kernels, run the GPU tests, run the benchmarks.
#
#   bash benchmarks/gpu_check.sh                                  # every step
#   STEPS="build fwd bwd" bash benchmarks/gpu_check.sh            # build, then the forward and backward tests
#   STEPS="build bench" BENCH_ARGS="--cases standard --lengths 16384 --passes fwd" bash benchmarks/gpu_check.sh
#
# Steps: build | fwd (tests/test_cuda_fwd.py) | bwd (tests/test_cuda_bwd.py) | suite (the shared suite's gpu-marked
# cases, implementation="cuda") | bench (benchmarks/bench_attention.py). PYTEST_FWD / PYTEST_BWD / PYTEST_SUITE add
# pytest arguments to a step; *_TIMEOUT bound it in seconds. GPU_TEST_WORKERS=N runs each test step on N pytest-xdist
# workers sharing the GPU (memory is not preallocated): tests/test_cuda_fwd.py alone takes ~8-9 minutes on one
# worker when other test steps share the card, which does not fit a 10-minute device call with the build.
# Needs nvcc, jax/jaxlib (the build uses the installed jaxlib's FFI headers: --no-build-isolation) and the
# CUTLASS headers: CUTLASS_INCLUDE_DIR, or the nvidia-cutlass wheel in .whl/ (carried to machines without a
# registry), or an installed nvidia-cutlass. A machine that gets a copy of the tree without its own git history
# must be told the commit for the benchmark rows: DMATTN_BENCH_COMMIT=<sha>. Logs, junit XML and benchmark JSON
# go to $OUT (default ./gpu_check_out).
#
# Same-run A/B: BASE_TREE=<dir> holds a copy of the sources to compare with (e.g. `git archive main | tar -x -C
# _ab/base`, in a folder git ignores, named in the call's carry). The build step then also builds it, at the same
# time as this tree, into /tmp/dmattn_base_site, and the bench step times the two alternately BENCH_ROUNDS times
# (default 2), the base's rows labelled BASE_COMMIT (default "base"), this tree's DMATTN_BENCH_COMMIT: drift of the
# card between runs then shows in both. Both use this tree's benchmark code; tests always run on this tree.
#
# Wheels built elsewhere (a CPU machine with nvcc, while no GPU is held: `pip wheel --no-build-isolation --no-deps`
# with DMATTN_CUDA=ON, DMATTN_CUDA_ARCHS=90a, CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90a -DDMATTN_NATIVE=OFF" and
# CUTLASS_INCLUDE_DIR, under the Python and jaxlib versions of the machine that loads them; docs/building.md):
# WHEEL=<file> installs that wheel as this tree's build, BASE_WHEEL=<file> as the A/B base (instead of BASE_TREE), so
# that a device call compiles nothing; each runs its own Python files, as built. Keep pip's file name (the installer
# reads its tags) and carry them in a git-ignored folder. A wheel that does not install (another Python's tag) is
# reported and the sources are compiled instead: this tree's, and BASE_TREE's when it is given beside BASE_WHEEL.
#
# A fresh machine need not compile again what an earlier one built from the same sources. SAVE_PREBUILT=1 writes the
# built wheel to $OUT/prebuilt/ (in parts of at most 15 MiB, beside the key it was built for: a hash of csrc/,
# CMakeLists.txt, pyproject.toml, the archs and the installed jaxlib's version). Put those files in
# build/prebuilt/ of the tree that travels (it is git-ignored: carry it) and the build step installs that wheel
# when its key matches, then lays the tree's own jax_dmattn/*.py over it, so Python changes need no rebuild.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_check_out}
STEPS=${STEPS:-"build fwd bwd suite bench"}
mkdir -p "$OUT"
cd "$REPO"
status=0
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

# The A/B base: BASE_WHEEL, or BASE_TREE compiled beside this tree's build (each with half the cores when both
# compile), installed into /tmp/dmattn_base_site; the build step waits for it.
build_base() {
  [ -n "${BASE_WHEEL:-}${BASE_TREE:-}" ] || return 0
  local t0=$(date +%s) wheel=${BASE_WHEEL:-}
  rm -rf /tmp/dmattn_base_wheel /tmp/dmattn_base_site
  : >"$OUT/build_base.log"
  install_base() {
    python3 -m pip install -q --no-deps --no-compile --target /tmp/dmattn_base_site "$1" >>"$OUT/build_base.log" 2>&1
  }
  if [ -n "$wheel" ] && ! install_base "$wheel"; then
    echo "build: base wheel $wheel did not install${BASE_TREE:+, compiling $BASE_TREE}"; tail -5 "$OUT/build_base.log"
    wheel=""
    [ -n "${BASE_TREE:-}" ] || return 0
  elif [ -n "$wheel" ]; then
    echo "build: base $wheel ok in $(( $(date +%s) - t0 )) s"; return 0
  fi
  if (cd "$BASE_TREE" && python3 -m pip wheel --no-build-isolation --no-deps -v -w /tmp/dmattn_base_wheel . \
        >>"$OUT/build_base.log" 2>&1) && install_base "$(ls /tmp/dmattn_base_wheel/jax_dmattn-*.whl)"; then
    echo "build: base $BASE_TREE ok in $(( $(date +%s) - t0 )) s"
  else
    echo "build: base ($BASE_TREE) FAILED (tail of $OUT/build_base.log)"; tail -20 "$OUT/build_base.log"
  fi
}

if has_step build; then
  if [ -z "${CUTLASS_INCLUDE_DIR:-}" ] && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dmattn_cutlass \
      .whl/nvidia_cutlass-*.whl && export CUTLASS_INCLUDE_DIR=/tmp/dmattn_cutlass/cutlass_library/source/include
  fi
  export DMATTN_CUDA=${DMATTN_CUDA:-ON}
  export DMATTN_CUDA_ARCHS=${DMATTN_CUDA_ARCHS:-90a}
  # The extension target exists before enable_language(CUDA): give CMake the archs up front as well.
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=${DMATTN_CUDA_ARCHS}"
  t0=$(date +%s)
  # A wheel to install instead of compiling: WHEEL, or build/prebuilt/'s when its key matches these sources (that
  # one gets this tree's Python files laid over it).
  prebuilt=$REPO/build/prebuilt
  wheel=${WHEEL:-} key=""
  overlay=0
  if [ -z "$wheel" ]; then
    key=$( (find csrc CMakeLists.txt pyproject.toml -type f | LC_ALL=C sort | xargs sha256sum
            echo "archs=$DMATTN_CUDA_ARCHS"; python3 -c "import jaxlib; print('jaxlib', jaxlib.__version__)") | sha256sum | cut -c1-16)
    if [ -f "$prebuilt/key" ] && [ "$(cat "$prebuilt/key")" = "$key" ] && [ -f "$prebuilt/wheel_name" ]; then
      wheel=/tmp/$(cat "$prebuilt/wheel_name")
      cat "$prebuilt"/wheel.part* > "$wheel"
      overlay=1
    fi
  fi
  jobs=$(nproc)  # halved when the base compiles beside this tree
  [ -n "${BASE_TREE:-}" ] && [ -z "${BASE_WHEEL:-}" ] && [ -z "$wheel" ] && jobs=$(( (jobs + 1) / 2 ))
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs}
  build_base &
  if [ -n "$wheel" ]; then
    site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    if python3 -m pip install -q --no-deps --force-reinstall "$wheel" >"$OUT/build.log" 2>&1 \
        && { [ $overlay = 0 ] || cp "$REPO"/jax_dmattn/*.py "$site/jax_dmattn/"; }; then
      echo "build: installed $wheel${key:+ (key $key)} in $(( $(date +%s) - t0 )) s"
    else
      # A wheel for another Python (its tag) or a broken file must not cost the call: compile instead.
      echo "build: $wheel did not install, compiling instead"; tail -5 "$OUT/build.log"; wheel=""
    fi
  fi
  if [ -z "$wheel" ]; then
    [ -z "${WHEEL:-}" ] && [ -d "$prebuilt" ] && echo "build: build/prebuilt/ is for other sources (key $(cat "$prebuilt/key" 2>/dev/null)," \
      "these are $key): compiling"
    rm -rf /tmp/dmattn_wheel
    if python3 -m pip wheel --no-build-isolation --no-deps -v -w /tmp/dmattn_wheel . >"$OUT/build.log" 2>&1 \
        && python3 -m pip install -q --no-deps --force-reinstall /tmp/dmattn_wheel/jax_dmattn-*.whl >>"$OUT/build.log" 2>&1; then
      echo "build: ok in $(( $(date +%s) - t0 )) s"
      grep -E "spill|registers" "$OUT/build.log" | sort | uniq -c | head -30 || true
      if [ "${SAVE_PREBUILT:-0}" = 1 ]; then
        mkdir -p "$OUT/prebuilt"
        wheel=$(ls /tmp/dmattn_wheel/jax_dmattn-*.whl)
        basename "$wheel" > "$OUT/prebuilt/wheel_name"
        echo "$key" > "$OUT/prebuilt/key"
        split -b 15M -d "$wheel" "$OUT/prebuilt/wheel.part"
        echo "build: saved the wheel to $OUT/prebuilt/ (key $key, $(ls "$OUT/prebuilt" | grep -c part) parts)"
      fi
    else
      echo "build: FAILED (tail of $OUT/build.log)"; grep -E "error|Error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"
      exit 1
    fi
  fi
  wait  # the base's build
fi

# Tests and benchmark run from outside the repo so that the installed package (with its extension) is imported.
cd /tmp
python3 -c "import jax; from jax_dmattn import _ffi; print('backend', jax.default_backend(), jax.devices()[0].device_kind, 'cuda kernels', _ffi.has_cuda_kernels())"

export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
workers=()
if [ "${GPU_TEST_WORKERS:-1}" -gt 1 ] && python3 -c "import xdist" 2>/dev/null; then workers=(-n "$GPU_TEST_WORKERS"); fi

run_pytest() {  # name, timeout, extra args (one string, shell-quoted: '-m "not slow"'), pytest args...
  local name=$1 limit=$2; eval "local extra=($3 ${workers[*]})"; shift 3
  local t0=$(date +%s)
  timeout "$limit" python3 -m pytest -q -rfE -p no:cacheprovider "$@" "${extra[@]}" --junitxml="$OUT/$name.xml" \
    >"$OUT/$name.log" 2>&1
  local rc=$?; [ $rc -eq 5 ] && rc=0  # nothing collected
  status=$((status | rc))
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s"
  grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/$name.log" | cut -c1-300 | tail -25
}

has_step fwd && run_pytest test_cuda_fwd "${FWD_TIMEOUT:-900}" "${PYTEST_FWD:-}" "$REPO/tests/test_cuda_fwd.py"
has_step bwd && run_pytest test_cuda_bwd "${BWD_TIMEOUT:-900}" "${PYTEST_BWD:-}" "$REPO/tests/test_cuda_bwd.py"
has_step suite && run_pytest test_suite_gpu "${SUITE_TIMEOUT:-1800}" "${PYTEST_SUITE:-}" -m gpu "$REPO/tests" \
  --ignore="$REPO/tests/test_cuda_fwd.py" --ignore="$REPO/tests/test_cuda_bwd.py"

if has_step bench; then
  t0=$(date +%s)
  rm -f "$OUT/bench.json" "$OUT/bench.log"  # the results writer appends: this file holds this call's rows only
  bench_once() {  # extra environment (VAR=value ...) for one run of bench_attention.py
    env "$@" PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-1800}" python3 "$REPO/benchmarks/bench_attention.py" \
      --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log" | grep -v "^WARNING"
  }
  if [ -n "${BASE_TREE:-}${BASE_WHEEL:-}" ]; then
    for round in $(seq "${BENCH_ROUNDS:-2}"); do
      echo "bench: round $round, base"
      bench_once PYTHONPATH=/tmp/dmattn_base_site DMATTN_BENCH_COMMIT="${BASE_COMMIT:-base}"
      echo "bench: round $round, this tree"
      bench_once
    done
  else
    bench_once
  fi
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
exit $status
