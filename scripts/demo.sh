#!/usr/bin/env bash
# The demo: a tiny Llama learns 2-digit addition by SFT on 2 CPU ranks; task accuracy before and after.
#   bash scripts/demo.sh [run root, default runs/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
rm -rf "$ROOT"
echo "== untrained model"
$PY scripts/eval_task.py --model tiny --task toy_add --label untrained
echo "== SFT (2 ranks, FSDP2, packed batches)"
$PY -m torch.distributed.run --standalone --nproc_per_node 2 train.py loss=sft model=tiny datasets=[toy_add] \
    exp_name=demo_sft batch_size=128 lr=3e-3 warmup_steps=30 n_examples=64000 eval_every=16000 \
    run_dir="$ROOT/sft"
$PY scripts/eval_task.py --model "$ROOT/sft/LATEST" --task toy_add --label after-sft
