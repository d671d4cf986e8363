#!/usr/bin/env bash
# The RL objectives side by side on the toy task, with the demo's GRPO budget (scripts/demo.sh):
# from the demo's toy_sort SFT model, 80 iterations of 64 prompts x 8 samples each, the same lr,
# warmup, KL and filter; then greedy accuracy on the 2,000 held-out prompts and McNemar's paired
# test against the SFT model, one line per objective (docs/rl.md "What RL does on the toy task").
#   bash scripts/compare_objectives.sh [run root, default runs/objectives] [objectives, default "grpo gspo cispo sapo"]
# EXTRA="seed=1" (any train.py overrides) changes every objective's run, as docs/rl.md's seeds and
# CISPO variants: EXTRA="batch_size=256" bash scripts/compare_objectives.sh runs/cispo_bs256 cispo
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/objectives}
OBJECTIVES=${2:-grpo gspo cispo sapo}
PY=${PY:-.venv/bin/python}
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 2"
mkdir -p "$ROOT"

if [ ! -e "$ROOT/sft/LATEST/config.json" ]; then  # the demo's SFT stage, as scripts/demo.sh runs it
    $TORCHRUN train.py loss=sft model=tiny datasets=[toy_sort] exp_name=objectives_sft \
        batch_size=128 lr=3e-3 warmup_steps=30 n_examples=25600 eval_every=12800 run_dir="$ROOT/sft"
fi
for objective in $OBJECTIVES; do
    rm -rf "${ROOT:?}/$objective"
    $TORCHRUN train.py loss="$objective" model=tiny model.archive="$ROOT/sft/LATEST" datasets=[toy_sort_prompts] \
        reward.functions=[toy_sort] exp_name="objectives_$objective" loss.rollout_batch_size=64 \
        loss.n_samples_per_prompt=8 loss.filter_groups=true loss.sampling.max_new_tokens=16 loss.kl_coef=0.01 \
        batch_size=64 lr=1e-4 warmup_steps=30 n_examples=5120 eval_every=2560 n_eval_examples=200 \
        eval_batch_size=256 run_dir="$ROOT/$objective" ${EXTRA:-}
    $PY scripts/eval_task.py --task toy_sort --n 2000 --model "$ROOT/$objective/LATEST" --label "$objective" \
        --against "$ROOT/sft/LATEST"
done
