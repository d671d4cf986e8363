#!/usr/bin/env bash
# Create .venv and install the project with what the tests and the demo need. Idempotent.
#   bash scripts/setup.sh            # CPU machine (torch CPU build where pip finds one)
#   EXTRAS=cuda bash scripts/setup.sh  # GPU machine: vllm + flash-attn
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
# PyPI has only CUDA builds of these; next to the CPU torch they break imports (vllm: torchvision::nms)
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
