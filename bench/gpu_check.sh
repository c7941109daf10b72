#!/usr/bin/env bash
# The one command to run on a GPU machine: build, test and measure retro_kernels on the GPU it
# finds within 8 minutes, leaving 6 files in OUT_DIR; docs/benchmarks.md ("GPU check") has the
# stages, their budgets and what each file holds. Installs nothing, needs no network.
#   bash bench/gpu_check.sh [--dry-run] OUT_DIR   (--dry-run: the same stages on a CPU, tiny shapes)
#   python -m bench import OUT_DIR                 (afterwards, here: file the numbers)
# Environment: PYTHON (default python3); GPU_CHECK_SECONDS (the deadline, default 480, 420 for
# --dry-run); TORCH_CUDA_ARCH_LIST, MAX_JOBS (default: from the GPU, nproc).
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
if [ -e "$OUT" ] && [ ! -d "$OUT" ]; then usage "OUT_DIR $OUT exists and is not a folder"; fi
mkdir -p "$OUT" || usage "cannot create OUT_DIR $OUT"
OUT="$(cd "$OUT" && pwd)"
if [ -n "$(ls -A "$OUT")" ]; then
  [ "$(head -n 1 "$OUT/summary.md" 2>/dev/null)" = "<!-- written by bench/gpu_check.sh -->" ] \
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
  TOTAL="${GPU_CHECK_SECONDS:-420}" PY_DRY="--dry-run" KERNEL_ARGS="--configs default" TEST_TIMEOUT=60
  #        build env kernels tests cca neighbour model flex
  BUDGETS=(300   60  60      150   60  60        60    60)
else
  TOTAL="${GPU_CHECK_SECONDS:-480}" PY_DRY="" KERNEL_ARGS="--jobs $NPROC" TEST_TIMEOUT=150
  BUDGETS=(300   60  45      200   75  75        60    120)
fi
START="$(date +%s)"
DEADLINE=$((START + TOTAL))
RESERVE=15  # seconds kept for the last stage to stop after SIGINT (10 s grace) and the last summary

echo "== $PROG$([ "$DRY" = 1 ] && echo " --dry-run") run $BENCH_RUN_ID, $BENCH_RUN_DATE, deadline ${TOTAL}s"
echo "   commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $NPROC CPUs, $PYTHON = $("$PYTHON" --version 2>&1)"

summarize() { "$PYTHON" -m bench.gpu_check summary "$OUT" --stages "$STAGES" || echo "!! summary.md not written"; }
record() {  # name status seconds budget note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$STAGES"
  echo "== stage $1: $2 (${3}s of ${4}s)${5:+: $5}"
  summarize
}
budget_for() { local left=$((DEADLINE - $(date +%s) - RESERVE)); echo $(($1 < left ? $1 : left)); }
outcome() {  # exit status of `timeout ...` -> status word
  case "$1" in 0) echo ok ;; 124) echo "timed out" ;; 137) echo "killed at its budget" ;; *) echo "failed (exit $1)" ;; esac
}
run_stage() {  # name own-budget note command...
  local name="$1" budget t0 rc note="$3"
  budget="$(budget_for "$2")"
  shift 3
  if [ "$budget" -lt 5 ]; then record "$name" skipped 0 "$budget" "no time left before the ${TOTAL}s deadline"; return; fi
  echo "== stage $name (budget ${budget}s)"
  t0="$(date +%s)"
  # SIGINT first: pytest then still writes junit.xml, a benchmark keeps the rows it appended
  timeout -s INT -k 10 "$budget" "$@"
  rc=$?
  record "$name" "$(outcome "$rc")" $(($(date +%s) - t0)) "$budget" "$note"
}

# -- build (background): the native kernels for the GPU found here
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
) > "$WORK/build.log" 2>&1 &
BUILD_PID=$!
# a TERM or INT ends the run after the stage in progress, and the build with it (timeout passes the signal on)
trap 'kill "$BUILD_PID" 2> /dev/null; rm -rf "$WORK"' EXIT
trap 'exit 143' TERM INT HUP

run_stage env "${BUDGETS[1]}" "env.json" "$PYTHON" -m bench.gpu_check env "$OUT" $PY_DRY
# kernels is CPU-bound and overlaps the build. Every autotuning config on a GPU machine, NPROC at a
# time; the dry run compiles each launch's default config only (all of them take ~80 s on one core).
run_stage kernels "${BUDGETS[2]}" "kernels.txt" sh -c "\"\$0\" -m bench kernels \$2 > \"\$1/kernels.txt\" 2>&1" "$PYTHON" "$OUT" "$KERNEL_ARGS"

wait "$BUILD_PID"
BUILD_RC=$?
echo "-- build log (last 40 lines of $(wc -l < "$WORK/build.log"))"
tail -n 40 "$WORK/build.log"
BUILT="$(cd retro_kernels && ls _C_*.so 2>/dev/null | tr '\n' ' ')"
record build "$(outcome "$BUILD_RC")" $(($(date +%s) - BUILD_T0)) "$BUILD_BUDGET" "built: ${BUILT:-nothing}"

# -- tests: the files whose tests run on CUDA tensors and need nothing the GPU image lacks
TEST_FILES=()
for f in tests/test_chunked_cross_attention.py tests/test_neighbour_self_attention.py \
         tests/test_neighbour_cross_attention.py tests/test_neighbour_encoder.py tests/test_nn_*.py \
         tests/test_native_*.py tests/test_triton_*.py tests/test_cuda_kernels.py tests/test_cuda_support.py \
         tests/test_bench_peers.py tests/test_model.py; do
  [ -f "$f" ] && TEST_FILES+=("$f")
done
PYTEST_ARGS=(-p no:cacheprovider -q -rfE --tb=short --junitxml="$OUT/junit.xml" --continue-on-collection-errors)
TEST_ENV=(env)
if "$PYTHON" -c "import xdist" 2> /dev/null && [ "$NPROC" -ge 4 ]; then
  # one worker per CPU: two OpenMP threads each, inductor compiling in-process
  PYTEST_ARGS+=(-n "$NPROC") TEST_ENV+=(OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=1)
fi
if "$PYTHON" -c "import pytest_timeout" 2> /dev/null; then
  PYTEST_ARGS+=(--timeout "$TEST_TIMEOUT" --timeout-method thread)
fi
if [ "$DRY" = 1 ]; then
  # Under the Triton interpreter the whole selection takes tens of minutes: a sample
  # that passes, skips (the GPU tests) and fails nothing, to exercise the stage.
  PYTEST_ARGS+=(-k "gpu or bad or explain or reference_follows or reference_matches or compile_for_gpus")
fi
run_stage tests "${BUDGETS[3]}" "junit.xml; see Tests below" \
  "${TEST_ENV[@]}" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" "${TEST_FILES[@]}"

# -- bench, most valuable first
bench_part() { run_stage "bench-$1" "${BUDGETS[$2]}" "$3" "$PYTHON" -m bench.gpu_check bench "$1" "$OUT" $PY_DRY; }
bench_part cca 4 "ours vs reference, pad+SDPA, repeat+SDPA"
bench_part neighbour 5 "self- and cross-attention vs their peers"
bench_part model 6 "training step, fused vs reference"
bench_part flex 7 "CCA vs FlexAttention (compiles per shape)"

# -- what comes back: every file well under 16 MiB (log.txt cut in the middle past 12 MiB)
if [ "$(stat -c %s "$OUT/log.txt")" -gt $((12 << 20)) ]; then
  { head -c $((2 << 20)) "$OUT/log.txt"; printf '\n[... log.txt cut to 10 MiB ...]\n'; tail -c $((8 << 20)) "$OUT/log.txt"; } > "$WORK/log.cut"
  cat "$WORK/log.cut" > "$OUT/log.txt"
fi
summarize
FAILED="$(cut -f2 "$STAGES" | grep -cv -e '^ok$' -e '^skipped$')"
echo "== done in $(($(date +%s) - START))s: $(wc -l < "$STAGES") stages, $FAILED not ok; $OUT/summary.md"
exec >&- 2>&-
wait "$TEE_PID" 2> /dev/null  # log.txt complete before the folder is collected
[ "$FAILED" = 0 ]
