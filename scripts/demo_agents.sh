#!/usr/bin/env bash
# Multi-turn RL on 2 CPU ranks, two tasks: a tool (the calculator) and feedback over turns (guess
# the number). Each: an SFT warm start, then GRPO with the environment; greedy accuracy on held-out
# games before and after, paired (scripts/eval_task.py).
#   bash scripts/demo_agents.sh [run root, default runs/demo_agents]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/demo_agents}
PY=${PY:-.venv/bin/python}
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 2"
rm -rf "$ROOT"

echo "== SFT warm start on toy_calc (the tool on a quarter of first turns)"
$TORCHRUN train.py loss=sft model=tiny datasets=[toy_calc] exp_name=demo_calc_sft batch_size=128 lr=3e-3 \
    warmup_steps=30 n_examples=25600 eval_every=12800 run_dir="$ROOT/sft"

echo "== GRPO with env=calculator, from the SFT model"
$TORCHRUN train.py loss=grpo model=tiny model.archive="$ROOT/sft/LATEST" datasets=[toy_calc_prompts] env=calculator \
    max_turns=3 exp_name=demo_calc_grpo loss.rollout_batch_size=64 loss.n_samples_per_prompt=8 loss.filter_groups=true \
    loss.sampling.max_new_tokens=16 loss.kl_coef=0.01 batch_size=64 lr=1e-4 warmup_steps=30 n_examples=2560 \
    eval_every=1280 n_eval_examples=200 eval_batch_size=256 eval_sampling.max_new_tokens=16 run_dir="$ROOT/grpo"
$PY scripts/eval_task.py --task toy_calc --n 500 --max-turns 3 --model "$ROOT/grpo/LATEST" --label after-grpo \
    --against "$ROOT/sft/LATEST"

echo "== SFT warm start on toy_guess (random guesses within the hints, leaning low)"
$TORCHRUN train.py loss=sft model=tiny datasets=[toy_guess] exp_name=demo_guess_sft batch_size=128 lr=3e-3 \
    warmup_steps=30 n_examples=25600 eval_every=12800 run_dir="$ROOT/guess_sft"

echo "== GRPO with env=guess_number, from the SFT model"
$TORCHRUN train.py loss=grpo model=tiny model.archive="$ROOT/guess_sft/LATEST" datasets=[toy_guess_prompts] \
    env=guess_number max_turns=4 exp_name=demo_guess_grpo loss.rollout_batch_size=64 loss.n_samples_per_prompt=8 \
    loss.filter_groups=true loss.sampling.max_new_tokens=4 loss.kl_coef=0.01 batch_size=64 lr=1e-4 warmup_steps=20 \
    n_examples=5120 eval_every=1280 n_eval_examples=323 eval_batch_size=323 eval_sampling.max_new_tokens=4 \
    run_dir="$ROOT/guess_grpo"
$PY scripts/eval_task.py --task toy_guess --n 323 --max-turns 4 --model "$ROOT/guess_grpo/LATEST" --label after-grpo \
    --against "$ROOT/guess_sft/LATEST"
