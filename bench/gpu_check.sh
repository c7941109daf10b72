#!/usr/bin/env bash
# The one command to run on a GPU machine: build, check and measure retro_kernels on
# the GPU it finds, inside 8 minutes of wall time, and leave every result in
# OUT_DIR (at most 6 files, each well under 16 MiB):
#
#   bash bench/gpu_check.sh OUT_DIR             # on a GPU machine, from a fresh checkout
#   bash bench/gpu_check.sh --dry-run OUT_DIR   # the same stages on a CPU, tiny shapes (CI)
#   python -m bench import OUT_DIR              # afterwards, here: file the numbers (one commit)
#
# It installs nothing and needs no network. Stages, in order of value, each
# under its own time budget (`timeout`), all under one deadline; a stage that
# fails or runs out of time is recorded and the next one runs:
#   build    python setup.py build_ext --inplace (_C_cpu, _C_cuda for this GPU's
#            arch), in the background from the start
#   env      nvidia-smi, versions, measured copy bandwidth and matmul rates -> env.json
#   kernels  python -m bench kernels -> kernels.txt (when bench/kernels.py exists)
#   tests    the op, nn, native and peer tests on CUDA tensors, in parallel, a
#            timeout per test -> junit.xml
#   bench    the paper's shapes in bf16: CCA, neighbour self/cross-attention, the
#            model's training step, CCA's FlexAttention peer -> results.jsonl
#            (each row appended as it is measured)
# After every stage summary.md is rewritten, so a killed run still leaves one.
# log.txt holds everything printed. docs/benchmarks.md ("GPU check") has the
# budgets and what each file holds.
#
# Environment: PYTHON (default python3); GPU_CHECK_SECONDS (the deadline, default
# 480; 420 for --dry-run); TORCH_CUDA_ARCH_LIST, MAX_JOBS (default: from the GPU, nproc).
set -uo pipefail  # no -e: one stage failing must not end the run
cd "$(dirname "$0")/.." || exit 2
PROG="bench/gpu_check.sh"
usage() { echo "$PROG: error: $1; usage: bash $PROG [--dry-run] OUT_DIR" >&2; exit 2; }

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 1 ] || usage "expected one OUT_DIR, got $# arguments"
case "$1" in -*) usage "unknown option $1" ;; esac
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" > /dev/null || usage "PYTHON=$PYTHON is not a command"
if [ "$DRY" = 0 ] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2> /dev/null; then
  usage "$PYTHON's torch sees no CUDA GPU here (--dry-run runs the stages on a CPU)"
fi

# -- OUT_DIR: new, empty, or an earlier run of this script (whose files alone it replaces)
OUT="$1"
OWN_FILES="summary.md results.jsonl junit.xml log.txt env.json kernels.txt"
MARKER="<!-- written by bench/gpu_check.sh -->"
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then usage "OUT_DIR $OUT exists and is not a folder"; fi
mkdir -p "$OUT" || usage "cannot create OUT_DIR $OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -n "$(ls -A "$OUT")" ]; then
  [ "$(head -n 1 "$OUT/summary.md" 2>/dev/null)" = "$MARKER" ] \
    || usage "OUT_DIR $OUT is not empty and holds no summary.md of this script: give a new or empty folder"
  for entry in "$OUT"/* "$OUT"/.[!.]*; do
    [ -e "$entry" ] || continue
    case " $OWN_FILES " in *" $(basename "$entry") "*) ;; *)
      usage "OUT_DIR $OUT holds $(basename "$entry"), which this script did not write: give a new or empty folder" ;;
    esac
  done
  for f in $OWN_FILES; do rm -f "$OUT/$f"; done
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 1
trap 'rm -rf "$WORK"' EXIT
STAGES="$WORK/stages.tsv"
: > "$STAGES"
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export BENCH_RUN_ID="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
export BENCH_RUN_DATE="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
NPROC="$(nproc 2>/dev/null || echo 2)"
if [ "$DRY" = 1 ]; then
  # one CPU thread: on a shared CI machine more OpenMP threads than free cores stall in spin-waits
  export BENCH_DRY_RUN=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  TOTAL="${GPU_CHECK_SECONDS:-420}"
  PY_DRY="--dry-run"
  #        build env kernels tests cca neighbour model flex
  BUDGETS=(300   60  60      150   60  60        60    60)
else
  TOTAL="${GPU_CHECK_SECONDS:-480}"
  PY_DRY=""
  BUDGETS=(300   60  45      200   75  75        60    120)
fi
START="$(date +%s)"
DEADLINE=$((START + TOTAL))
RESERVE=15  # seconds kept for the last stage to stop after SIGINT (10 s grace) and the last summary

echo "== $PROG$([ "$DRY" = 1 ] && echo " --dry-run") run $BENCH_RUN_ID, $BENCH_RUN_DATE, deadline ${TOTAL}s"
echo "   commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $NPROC CPUs, $PYTHON = $("$PYTHON" --version 2>&1)"

summarize() { "$PYTHON" -m bench.gpu_report summary "$OUT" --stages "$STAGES" || echo "!! summary.md not written"; }
record() {  # name status seconds budget note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGES"
  echo "== stage $1: $2 (${3}s of ${4}s)${5:+: $5}"
  summarize
}
budget_for() {  # the smaller of a stage's own budget and what is left before the deadline
  local left=$((DEADLINE - $(date +%s) - RESERVE))
  echo $(($1 < left ? $1 : left))
}
outcome() {  # exit status of `timeout ...` -> status word
  case "$1" in 0) echo ok ;; 124) echo "timed out" ;; 137) echo "killed at its budget" ;; *) echo "failed (exit $1)" ;; esac
}
run_stage() {  # name own-budget note command...
  local name="$1" want="$2" note="$3" budget t0 rc
  shift 3
  budget="$(budget_for "$want")"
  if [ "$budget" -lt 5 ]; then
    record "$name" skipped 0 "$want" "no time left before the ${TOTAL}s deadline"
    return
  fi
  echo "== stage $name (budget ${budget}s)"
  t0="$(date +%s)"
  # SIGINT first: pytest then still writes junit.xml, a benchmark keeps the rows it appended
  timeout -s INT -k 10 "$budget" "$@"
  rc=$?
  record "$name" "$(outcome "$rc")" $(($(date +%s) - t0)) "$budget" "$note"
}

# -- build (background): the native kernels for the GPU found here
BUILD_LOG="$WORK/build.log"
ARCH="${TORCH_CUDA_ARCH_LIST:-}"
if [ -z "$ARCH" ] && [ "$DRY" = 0 ]; then
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
  [ -n "$ARCH" ] || ARCH="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
  [ "$ARCH" = "9.0" ] && ARCH="9.0a"  # Hopper's own instructions (wgmma, TMA), as CI compiles
fi
BUILD_BUDGET="$(budget_for "${BUDGETS[0]}")"
BUILD_T0="$(date +%s)"
echo "== stage build (background, budget ${BUILD_BUDGET}s): TORCH_CUDA_ARCH_LIST=${ARCH:-none} MAX_JOBS=${MAX_JOBS:-$NPROC}"
(
  [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST="$ARCH"
  export MAX_JOBS="${MAX_JOBS:-$NPROC}"
  exec timeout -k 10 "$BUILD_BUDGET" "$PYTHON" setup.py build_ext --inplace
) > "$BUILD_LOG" 2>&1 &
BUILD_PID=$!
# a TERM or INT ends the run after the stage in progress, and the build with it (timeout passes the signal on)
trap 'kill "$BUILD_PID" 2> /dev/null; rm -rf "$WORK"' EXIT
trap 'exit 143' TERM INT HUP

# -- env
run_stage env "${BUDGETS[1]}" "env.json" "$PYTHON" -m bench.gpu_check env "$OUT" $PY_DRY

# -- kernels (CPU-bound: it overlaps the build). Every autotuning config on a GPU machine, NPROC
# compiles at a time; the dry run compiles each launch's default config only (125 configs take
# ~80 s on one CI core, too close to the budget on a loaded machine).
if [ "$DRY" = 1 ]; then KERNEL_ARGS="--configs default"; else KERNEL_ARGS="--jobs $NPROC"; fi
if [ -f bench/kernels.py ]; then
  run_stage kernels "${BUDGETS[2]}" "kernels.txt" sh -c "\"\$0\" -m bench kernels \$2 > \"\$1/kernels.txt\" 2>&1" "$PYTHON" "$OUT" "$KERNEL_ARGS"
else
  record kernels skipped 0 "${BUDGETS[2]}" "bench/kernels.py is not in this checkout"
fi

wait "$BUILD_PID"
BUILD_RC=$?
echo "-- build log (last 40 lines of $(wc -l < "$BUILD_LOG"))"
tail -n 40 "$BUILD_LOG"
BUILT="$(cd retro_kernels && ls _C_*.so 2>/dev/null | tr '\n' ' ')"
record build "$(outcome "$BUILD_RC")" $(($(date +%s) - BUILD_T0)) "$BUILD_BUDGET" "built: ${BUILT:-nothing}"

# -- tests: the files whose tests run on CUDA tensors and need nothing the GPU image lacks
TEST_FILES=()
for f in tests/test_chunked_cross_attention.py tests/test_neighbour_self_attention.py \
         tests/test_neighbour_cross_attention.py tests/test_neighbour_encoder.py tests/test_nn_*.py \
         tests/test_native_*.py tests/test_triton_*.py tests/test_cuda_kernels.py tests/test_cuda_support.py tests/test_bench_peers.py \
         tests/test_model.py; do
  [ -f "$f" ] && TEST_FILES+=("$f")
done
PYTEST_ARGS=(-p no:cacheprovider -q -rfE --tb=short --junitxml="$OUT/junit.xml" --continue-on-collection-errors)
TEST_ENV=(env)
if ! "$PYTHON" -c "import xdist" 2> /dev/null; then
  echo "(pytest-xdist is not installed: the tests run in one process)"
elif [ "$NPROC" -ge 4 ]; then
  PYTEST_ARGS+=(-n "$NPROC")
  # one worker per CPU: two OpenMP threads each, and inductor compiling in-process rather
  # than each worker starting a pool of nproc compile processes
  TEST_ENV+=(OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1)
fi
if "$PYTHON" -c "import pytest_timeout" 2> /dev/null; then
  PYTEST_ARGS+=(--timeout "$([ "$DRY" = 1 ] && echo 60 || echo 150)" --timeout-method thread)
else
  echo "(pytest-timeout is not installed: only the stage's budget bounds the tests)"
fi
if [ "$DRY" = 1 ]; then
  # Under the Triton interpreter the whole selection takes tens of minutes: a sample
  # that passes, skips (the GPU tests) and fails nothing, to exercise the stage.
  PYTEST_ARGS+=(-k "gpu or bad or explain or reference_follows or reference_matches or compile_for_gpus")
fi
run_stage tests "${BUDGETS[3]}" "junit.xml; see Tests below" \
  "${TEST_ENV[@]}" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" "${TEST_FILES[@]}"

# -- bench, most valuable first
run_stage bench-cca "${BUDGETS[4]}" "ours vs reference, pad+SDPA, repeat+SDPA" \
  "$PYTHON" -m bench.gpu_check bench cca "$OUT" $PY_DRY
run_stage bench-neighbour "${BUDGETS[5]}" "self- and cross-attention vs their peers" \
  "$PYTHON" -m bench.gpu_check bench neighbour "$OUT" $PY_DRY
run_stage bench-model "${BUDGETS[6]}" "training step, fused vs reference" \
  "$PYTHON" -m bench.gpu_check bench model "$OUT" $PY_DRY
run_stage bench-flex "${BUDGETS[7]}" "CCA vs FlexAttention (compiles per shape)" \
  "$PYTHON" -m bench.gpu_check bench flex "$OUT" $PY_DRY

# -- what comes back: every file well under 16 MiB
for f in $OWN_FILES; do
  if [ -f "$OUT/$f" ] && [ "$(stat -c %s "$OUT/$f")" -gt $((12 << 20)) ]; then
    if [ "$f" = log.txt ]; then
      { head -c $((2 << 20)) "$OUT/$f"; printf '\n[... log.txt cut to 10 MiB ...]\n'; tail -c $((8 << 20)) "$OUT/$f"; } > "$WORK/log.cut"
      cat "$WORK/log.cut" > "$OUT/$f"
    else
      echo "!! $f is over 12 MiB"
    fi
  fi
done
summarize
FAILED="$(cut -f2 "$STAGES" | grep -cv -e '^ok$' -e '^skipped$')"
echo "== done in $(($(date +%s) - START))s: $(wc -l < "$STAGES") stages, $FAILED not ok; $OUT/summary.md"
exec >&- 2>&-
wait "$TEE_PID" 2> /dev/null  # log.txt complete before the folder is collected
[ "$FAILED" = 0 ]
