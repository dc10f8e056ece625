#!/usr/bin/env bash
# Everything this project measures on one lent GPU, in one call (docs/benchmarks.md "GPU").
#
#   bash benchmarks/device_runs.sh            # from the repository root; results under $OUT
#   bash benchmarks/device_runs.sh strategies gradvac moco ...   # smoke-train these strategies
#   bash benchmarks/device_runs.sh segnet ew dwa ...  # ATI-Net synthetic, then benchmarks/segnet.py
#   bash benchmarks/device_runs.sh segnet_bench [strategy ...]  # benchmarks/segnet.py alone:
#       the MTAN model row and every strategy (or those named), compiled concurrently;
#       SEGNET_ARG=... sets its --arg, SEGNET_FLAGS=... adds flags (e.g. a tiny CPU check:
#       SEGNET_ARG=model=mtan,dataset=synthetic,smoke SEGNET_FLAGS="--steps 1")
#
# The machine this was written for has JAX (CUDA) but none of our other dependencies and no
# network: the missing wheels travel in .whl/ (Python 3.12; see docs/benchmarks.md for the
# `pip download` line) and are installed into /tmp/site. Phase A trains the configs whose
# numbers the docs quote (all at once, one process each, each with its own data dir, so the
# GPU is shared and their *timings* mean nothing; their metrics are what counts). Phase B then
# times the benchmarks alone on the idle GPU. Every job has its own deadline, so the results
# archive ($OUT/runs.tgz: each workdir's results.json, metrics.jsonl, trivial_baseline.json,
# config.json, and every log) is always written.
set -u
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
ROOT=$(pwd)
W=${DEVICE_WORK:-/tmp/device_work}  # DEVICE_WORK, SITE: elsewhere for a local check
LOGS=$W/logs
mkdir -p "$W" "$LOGS"
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$ROOT"
PY=${PY:-python3}
DEADLINE=$(( $(date +%s) + ${BUDGET:-540} ))  # the whole script, archive included

finish() {
  (cd "$W" && find . -name results.json -o -name metrics.jsonl -o -name trivial_baseline.json \
      -o -name config.json -o -name '*.log' | grep -v /checkpoints/ |
    tar czf "$OUT/runs.tgz" -T -)
  cp "$LOGS/summary.txt" "$OUT/" 2>/dev/null
}
trap finish EXIT

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } \
  >"$LOGS/machine.log" 2>&1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl >"$LOGS/pip.log" 2>&1 || { echo "pip failed"; exit 1; }
fi
$PY -c "import jax, flax, mtl_jax.train; print(jax.__version__, flax.__version__, jax.devices())" \
  >>"$LOGS/machine.log" 2>&1 || { cat "$LOGS/machine.log"; exit 1; }
cat "$LOGS/machine.log"

mtl() { $PY -c "import sys; from mtl_jax.main import main; sys.exit(main())" "$@"; }

# ---- `bash benchmarks/device_runs.sh strategies A B ...`: each strategy trains the quickstart
# smoke config (all at once; prints "NAME rc=.. results=yes|no" per strategy) ---------------
if [ "${1:-}" = strategies ]; then
  shift
  for name in "$@"; do
    ( export TFDS_DATA_DIR="$W/data_$name" XLA_PYTHON_CLIENT_MEM_FRACTION=0.02
      timeout "${PHASE_A:-240}" bash -c "$(declare -f mtl); PY=$PY; mtl train \
          --config=configs/quickstart.py:smoke,weighting=$name --workdir=$W/smoke_$name" \
          >"$LOGS/smoke_$name.log" 2>&1
      rc=$?
      res=no; [ -f "$W/smoke_$name/results.json" ] && res=yes
      echo "$name rc=$rc results=$res" >>"$LOGS/summary.txt" ) &
  done
  wait
  cat "$LOGS/summary.txt"
  exit 0
fi

# ---- `bash benchmarks/device_runs.sh segnet [strategy ...]`: the ATI-Net synthetic training
# (staged; metrics only), then benchmarks/segnet.py alone on the GPU (model row + the named
# strategies, in that order, until the deadline) ---------------------------------------------
if [ "${1:-}" = segnet ]; then
  shift
  export JAX_COMPILATION_CACHE_DIR=$W/jax_cache
  ( export TFDS_DATA_DIR="$W/data_atinet"
    start=$(date +%s)
    timeout "${PHASE_A:-200}" bash -c "$(declare -f mtl); PY=$PY; mtl train \
        --config=configs/segnet.py:model=atinet --workdir=$W/segnet_atinet" \
        >"$LOGS/segnet_atinet.log" 2>&1
    echo "segnet_atinet rc=$? wall=$(( $(date +%s) - start ))s" >>"$LOGS/summary.txt" )
  only=$(IFS=,; echo "$*")
  left=$(( DEADLINE - $(date +%s) - 15 ))
  timeout "$left" $PY benchmarks/segnet.py --devices 1 ${only:+--only $only} \
      >"$LOGS/bench_segnet.log" 2>&1
  echo "bench segnet rc=$?" >>"$LOGS/summary.txt"
  cat "$LOGS/bench_segnet.log" "$LOGS/summary.txt"
  exit 0
fi

# ---- `bash benchmarks/device_runs.sh segnet_bench [strategy ...]`: benchmarks/segnet.py on the
# idle GPU for the whole budget (worker processes compile the variants concurrently, then each
# is timed alone; rows are printed as they are timed, and its own --deadline ends the table
# before this script's) ------------------------------------------------------------------------
if [ "${1:-}" = segnet_bench ]; then
  shift
  export JAX_COMPILATION_CACHE_DIR=$W/jax_cache
  only=$(IFS=,; echo "$*")
  start=$(date +%s) left=$(( DEADLINE - $(date +%s) - 15 ))
  # shellcheck disable=SC2086  # SEGNET_FLAGS is a list of flags
  timeout "$left" $PY benchmarks/segnet.py --devices 1 --deadline $(( left - 20 )) \
      ${SEGNET_ARG:+--arg "$SEGNET_ARG"} ${only:+--only "$only"} ${SEGNET_FLAGS:-} \
      >"$OUT/bench_segnet.md" 2>"$LOGS/bench_segnet.err"
  echo "bench segnet rc=$? wall=$(( $(date +%s) - start ))s" >>"$LOGS/summary.txt"
  # stderr without XLA's repeated source-location traces, at most 4 MB
  grep -v -e '^external/' -e 'Source Location Trace' -e '^$' "$LOGS/bench_segnet.err" |
    tail -c 4000000 >"$OUT/bench_segnet_err.log"
  cp "$OUT/bench_segnet.md" "$LOGS/"
  cat "$OUT/bench_segnet.md" "$LOGS/summary.txt"
  exit 0
fi

# ---- Phase A: trainings (in parallel; metrics only) --------------------------------------
PHASE_A=${PHASE_A:-300}
train() {  # name config-with-args
  local name=$1 cfg=$2
  mkdir -p "$W/data_$name"
  ( export TFDS_DATA_DIR="$W/data_$name" XLA_PYTHON_CLIENT_MEM_FRACTION=0.09
    start=$(date +%s)
    timeout "$PHASE_A" bash -c "$(declare -f mtl); PY=$PY; mtl train --config=$cfg \
        --workdir=$W/$name" >"$LOGS/$name.log" 2>&1
    echo "$name rc=$? wall=$(( $(date +%s) - start ))s" >>"$LOGS/summary.txt" ) &
}
train segnet_mtan configs/segnet.py
train segnet_atinet configs/segnet.py:model=atinet
train adamt_grad_magnitude configs/adamt.py:weighting=grad_magnitude
train adamt_ew configs/adamt.py:weighting=ew
train uda_false configs/densemtl_uda.py:uda=false,synthetic_small
train uda_true configs/densemtl_uda.py:uda=true,synthetic_small
train uda_oracle configs/densemtl_uda.py:oracle,synthetic_small
train quickstart configs/quickstart.py
wait
cat "$LOGS/summary.txt"

# ---- Phase B: timings on the idle GPU ------------------------------------------------------
bench() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) - 10 ))
  [ "$left" -lt "$secs" ] && secs=$left
  [ "$secs" -lt 5 ] && { echo "bench $name skipped (deadline)" >>"$LOGS/summary.txt"; return; }
  timeout "$secs" "$@" >"$LOGS/bench_$name.log" 2>&1
  echo "bench $name rc=$?" >>"$LOGS/summary.txt"
  tail -n 25 "$LOGS/bench_$name.log"
}
bench step_quickstart 60 $PY benchmarks/step_time.py --devices 1
bench step_quickstart_b64 60 $PY benchmarks/step_time.py --devices 1 --batch_size 64
bench adamt 90 $PY benchmarks/adamt.py --steps 5 --rounds 3
bench segnet 90 $PY benchmarks/segnet.py --devices 1 --no_weightings
bench weighting ${PHASE_B_WEIGHTING:-120} $PY benchmarks/weighting.py --devices 1 --steps 20
cat "$LOGS/summary.txt"
