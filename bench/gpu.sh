#!/usr/bin/env bash
# One command for a GPU machine: install retro_kernels, run the GPU tests,
# run the full benchmark suite, draw the plots. Results are appended to
# bench/results/<gpu-name>.jsonl (commit that file) and plots go to
# bench/results/plots/.
#
#   bash bench/gpu.sh            # from the repository root
#
# Environment:
#   PYTHON=python3               interpreter to use
#   INSTALL=0                    skip the pip installs (torch with CUDA must already be there)
#   FLASH_ATTN=1                 also try `pip install flash-attn` (builds from source if no
#                                wheel matches: can take an hour; the peer is skipped without it)
#   BENCH_ARGS="--dtype bf16"    extra arguments for python -m bench, e.g. "--sweeps paper,mask"
#                                to fit a time-limited session (see docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs torch with CUDA and a GPU'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true

if [ "${INSTALL:-1}" = "1" ]; then
  echo "== install (keeping the installed CUDA torch)"
  CONSTRAINTS="$(mktemp)"
  "$PYTHON" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
  "$PYTHON" -m pip install -q -c "$CONSTRAINTS" -r requirements-dev.txt
  "$PYTHON" -m pip install -q -c "$CONSTRAINTS" --no-deps retro-pytorch==0.3.9 \
    || echo "retro-pytorch not installed: its peer will be skipped with the reason"
  if [ "${FLASH_ATTN:-0}" = "1" ]; then
    "$PYTHON" -m pip install -q -c "$CONSTRAINTS" flash-attn --no-build-isolation \
      || echo "flash-attn not installed: its peer will be skipped with the reason"
  fi
  "$PYTHON" -m pip install -q -c "$CONSTRAINTS" --no-build-isolation -e .
  rm -f "$CONSTRAINTS"
fi

echo "== tests on the GPU (the whole suite: Triton runs compiled, @pytest.mark.gpu tests run)"
"$PYTHON" -m pytest -q tests || echo "!! tests failed on the GPU (see above); benchmarking anyway"

echo "== benchmarks"
# FlexAttention is compiled with autotuning, once per shape: the full suite takes a while.
status=0
# shellcheck disable=SC2086
"$PYTHON" -m bench all --device cuda ${BENCH_ARGS:-} || status=$?
"$PYTHON" -m bench report
echo "results: bench/results/*.jsonl (commit them), plots: bench/results/plots/"
[ "$status" = 0 ] || echo "!! some measurements failed (status $status): see the FAILED rows above"
exit "$status"
