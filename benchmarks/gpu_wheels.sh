#!/usr/bin/env bash
# Command: bash benchmarks/gpu_wheels.sh [DIR]
#
# Wheels of the dependencies a bare GPU machine (python3 with torch, transformers, lightning, peft,
# sentencepiece) lacks, for a machine without network: copy DIR (default .gpu-wheels, git-ignored)
# there and run `GPU_WHEELS=DIR bash benchmarks/gpu_check.sh`. Compiled wheels (cffi,
# pydantic-core) match this machine's Python; DeepSpeed is built without its C++ ops
# (DS_BUILD_OPS=0), which it JIT-builds when a run needs one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.gpu-wheels}"
PIP="${PIP:-$( [[ -x "$ROOT/.venv/bin/pip" ]] && echo "$ROOT/.venv/bin/pip" || echo "python3 -m pip" )}"
mkdir -p "$DIR"
$PIP wheel --quiet --no-deps -w "$DIR" \
  webdataset braceexpand jsonargparse docstring-parser typeshed-client diffusers importlib-metadata \
  fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection \
  soundfile cffi pycparser hjson
DS_BUILD_OPS=0 $PIP wheel --quiet --no-deps --no-build-isolation -w "$DIR" deepspeed
ls "$DIR"
