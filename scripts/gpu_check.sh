#!/usr/bin/env bash
# The GPU check of scripts/gpu_check.py (its docstring says what it measures), runnable as is on a
# machine with CUDA torch and transformers but without hydra-core/omegaconf (the device tool's H200):
#   bash scripts/gpu_check.sh            # ~1B model, bf16, NCCL: under 8 minutes on one H200
#   bash scripts/gpu_check.sh --smoke    # tiny model, float32, gloo on CPU: under a minute
# Writes the tables to stdout and a JSON to $OUT/gpu_check.json ($OUT set) or runs/gpu_check/.
#
# Where hydra-core or omegaconf is missing, they are installed from .gpu_wheels/ (pure-Python
# wheels, ignored by git, carried to the machine: carry=[".gpu_wheels"]), filled beforehand on a
# machine with PyPI:
#   echo /.gpu_wheels/ >> .git/info/exclude
#   pip wheel --no-deps -w .gpu_wheels hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# (antlr4 4.9.3 is a source distribution on PyPI: `pip wheel` builds its wheel, `pip download` would not.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import hydra, omegaconf' 2>/dev/null; then
    if ! ls .gpu_wheels/*.whl >/dev/null 2>&1; then
        echo "error: hydra-core/omegaconf are not installed and .gpu_wheels/ holds no wheels (see $0)" >&2
        exit 2
    fi
    site=${TMPDIR:-/tmp}/gpu_check_site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu_wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"  # inherited by torchrun and its ranks
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py "$@"
