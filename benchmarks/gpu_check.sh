#!/usr/bin/env bash
# The GPU check's one-line runner: builds the wheel folder (tinkerd and what it needs
# beyond PyTorch, transformers, PEFT and Triton, for the GPU machine's CPython, default
# 3.12) and prints the one command to run on that machine, from the folder's parent.
#   benchmarks/gpu_check.sh [DIR (default dist/gpu-check)] [PYTHON_VERSION (default 3.12)]
# It needs PyPI (pip download) or a pip cache that holds those wheels; $PYTHON (default
# .venv/bin/python) is the Python with pip whose installed versions are pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
exec "$python" benchmarks/gpu_check.py --pack "${1:-dist/gpu-check}" --python-version "${2:-3.12}"
