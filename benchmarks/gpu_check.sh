#!/usr/bin/env bash
# Command: bash benchmarks/gpu_check.sh [--dry-run]
#
# Every check that needs a GPU, in one command (about 8 minutes on one H100/H200):
#   1. the `gpu` tests (flex vs dense forward and backward in bf16, a bf16 step of each family's
#      --tiny recipe, 20 steps against the CPU's fp32 loss, CUDA vs CPU decoding, ZeRO-2/3 on one
#      GPU); a skipped `gpu` test fails the check, since on a CUDA machine none may skip;
#   2. the `xformers` tests, when xformers is installed;
#   3. benchmarks/train_step.py on the 0.9B model at 4096 x 4 (with the Transfusion recipe) and
#      at 8192 x 2;
#   4. benchmarks/data_pipeline.py on the digits mix with this machine's cores: the data module's
#      feed where a GPU's loader runs (a 2-core CPU gave 3x the step's 60k tokens/s; the goal is 10x).
# Figures go to stdout and to $OUT/gpu_check.log (default benchmarks/; a dry run's, a scratch directory).
#
# It runs from the source tree (PYTHONPATH), so a machine needs only the dependencies. Where
# some are missing and there is no network, put their wheels in a folder (benchmarks/gpu_wheels.sh
# builds one) and set GPU_WHEELS to it: they are unpacked into a temporary site directory,
# nothing is installed.
#
# --dry-run exercises the whole script on a CPU: the gpu tests are collected (and skip), the
# benchmark runs its tiny model for a few steps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-$( [[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# unimodal's data (the built-in worlds) is built into a scratch home, not into the checkout
export UNIMODAL_DATA_HOME="${UNIMODAL_DATA_HOME:-$(mktemp -d)}"
if [[ -n "${GPU_WHEELS:-}" ]]; then
  SITE="$(mktemp -d)"
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$GPU_WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
# a dry run's figures are not GPU figures: they go to a scratch directory unless OUT is set
LOG="${OUT:-$( ((DRY_RUN)) && mktemp -d || echo "$ROOT/benchmarks")}/gpu_check.log"
mkdir -p "$(dirname "$LOG")"
: > "$LOG"
cd "$ROOT"

step() { echo "== $*" | tee -a "$LOG"; }

has_cuda="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [[ "$has_cuda" != 1 && "$DRY_RUN" != 1 ]]; then
  echo "gpu_check: no CUDA device here; use --dry-run to exercise the script on a CPU" >&2
  exit 1
fi
"$PYTHON" -c 'import torch, transformers, lightning; print(f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}, cuda {torch.version.cuda}")' | tee -a "$LOG"

step "gpu tests"
set +e
"$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider tests 2>&1 | tee -a "$LOG.pytest"
status=${PIPESTATUS[0]}
set -e
cat "$LOG.pytest" >> "$LOG" && rm -f "$LOG.pytest"
skipped="$(grep -c '^SKIPPED' "$LOG" || true)"
if [[ "$status" != 0 ]]; then  # 5: no gpu test collected, which checks nothing
  echo "gpu_check: gpu tests failed (pytest exit status $status)" | tee -a "$LOG" >&2
  exit 1
fi
if [[ "$DRY_RUN" != 1 && "$skipped" != 0 ]]; then
  echo "gpu_check: $skipped gpu test(s) skipped on a CUDA machine" | tee -a "$LOG" >&2
  exit 1
fi

if "$PYTHON" -c 'import xformers' 2>/dev/null && [[ "$has_cuda" == 1 ]]; then
  step "xformers tests"
  "$PYTHON" -m pytest -q -m xformers -p no:cacheprovider tests 2>&1 | tee -a "$LOG"
else
  step "xformers tests: skipped (xformers not installed or no CUDA)"
fi

if [[ "$DRY_RUN" == 1 ]]; then
  SIZES=("512 2 --family" "1024 1")
  MODEL=(--model tiny --device cpu --steps 4 --warmup 2)
else
  SIZES=("4096 4 --family" "8192 2")
  MODEL=(--model 0.9b --device cuda --steps 25 --warmup 5)
fi
for size in "${SIZES[@]}"; do
  read -r seq batch extra <<< "$size"
  step "train_step.py ${MODEL[*]} --seq-len $seq --batch $batch ${extra:-}"
  "$PYTHON" benchmarks/train_step.py "${MODEL[@]}" --seq-len "$seq" --batch "$batch" ${extra:-} 2>&1 \
    | grep -v -E "Warning|warn\(|^\s*$" | tee -a "$LOG"
done
# the digits mix decodes and encodes its media per document, so its feed grows with the workers
cores="$(nproc)"
if [[ "$DRY_RUN" == 1 ]]; then
  DATA=(--mix digits --workers 0 --batches 10)
else
  DATA=(--mix digits --workers "0,8,$((cores > 10 ? cores - 2 : 4))" --batches 200)
fi
step "data_pipeline.py ${DATA[*]} ($cores cores)"
"$PYTHON" benchmarks/data_pipeline.py "${DATA[@]}" 2>&1 | grep -v -E "Warning|warn\(|litlogger|^\s*$" | tee -a "$LOG"
step "done: figures in $LOG"
