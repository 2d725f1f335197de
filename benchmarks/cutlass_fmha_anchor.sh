#!/usr/bin/env bash
# Same-card anchor: CUTLASS's own Hopper FMHA (example 88_hopper_fmha, shipped as source in the nvidia-cutlass
# wheel this project builds against), built and timed at the standard case's shape. It runs float16 without GQA,
# so compare it with our bf16 rows as "what a TMA + wgmma warp-specialised kernel reaches on this card".
#
#   bash benchmarks/cutlass_fmha_anchor.sh build   # nvcc -> /tmp/dmattn_fmha88 (several minutes on one core)
#   bash benchmarks/cutlass_fmha_anchor.sh run     # waits for the build, then times fwd and bwd, causal
#
# Shape: FMHA88_ARGS (default --b=1 --h=16 --q=16384 --k=16384). Needs an sm_90 GPU for "run".
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
BIN=/tmp/dmattn_fmha88
SRC=${CUTLASS_SOURCE_DIR:-}
if [ -z "$SRC" ]; then
  if ls "$REPO"/.whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dmattn_cutlass_src \
      "$REPO"/.whl/nvidia_cutlass-*.whl >/dev/null 2>&1
    SRC=/tmp/dmattn_cutlass_src/cutlass_library/source
  else
    SRC=$(python3 -c "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))")
  fi
fi
case "${1:-run}" in
  build)
    t0=$(date +%s)
    nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
      -I"$SRC/include" -I"$SRC/tools/util/include" -I"$SRC/examples/common" -I"$SRC/examples/88_hopper_fmha" \
      "$SRC/examples/88_hopper_fmha/88_hopper_fmha.cu" -o "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
    echo "fmha88 build rc=$? in $(( $(date +%s) - t0 )) s";;
  run)
    for _ in $(seq 1 "${WAIT_S:-300}"); do [ -x "$BIN" ] && break; sleep 1; done
    [ -x "$BIN" ] || { echo "fmha88: no binary"; exit 1; }
    args=${FMHA88_ARGS:-"--b=1 --h=16 --q=16384 --k=16384"}
    for d in 64 128; do
      echo "== fwd causal d=$d $args"; "$BIN" $args --d=$d --mask=causal --iterations=20 --verbose
      echo "== bwd causal d=$d $args"; "$BIN" $args --d=$d --mask=causal --iterations=20 --verbose --bwd
    done;;
esac
