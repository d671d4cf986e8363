#!/usr/bin/env bash
# The RL objectives on the real model with the real-model demo's GRPO recipe (scripts/demo_real.sh):
# SmolLM2-135M-Instruct as released, 12 iterations of 16 prompts x 8 samples from the colocated
# vLLM engine, rewarded by scripts/arithmetic.py:reward; then greedy accuracy on the 500 held-out
# prompts and McNemar's paired test against the released model, one line per objective.
# distill and distill_jsd (loss=distill with each divergence) distil the real demo's GRPO model
# (TEACHER, default runs/demo_real/grpo/LATEST: run scripts/demo_real.sh first) into the released
# model, on the same prompts with the same budget and no reward.
#   bash scripts/compare_objectives_real.sh [run root, default runs/objectives_real] [objectives, default "gspo cispo sapo"]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/objectives_real}
OBJECTIVES=${2:-gspo cispo sapo}
PY=${PY:-.venv/bin/python}
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 2"
MODEL=.cache/SmolLM2-135M-Instruct
REWARD=scripts/arithmetic.py:reward
PROMPTS="$ROOT/prompts.jsonl"
TRAIN="model=smollm2_135m model.fsdp_policy_mp=float32 fsdp_shard_ranks=1 eval_at_start=false eval_at_end=false eval_every=null wandb.enabled=false"
mkdir -p "$ROOT"
[ -f "$MODEL/config.json" ] || $PY scripts/get_real_model.py
$PY scripts/arithmetic.py --out "$PROMPTS"

greedy() {  # the model's greedy replies (at most 16 tokens) to the held-out prompts
    $TORCHRUN scripts/generate.py --model "$1" --dataset "$PROMPTS" --split test --k 1 --temperature 0 \
        --max-new-tokens 16 --out "$2" | tail -n 1
}
[ -f "$ROOT/released.jsonl" ] || greedy $MODEL "$ROOT/released.jsonl"
for objective in $OBJECTIVES; do
    rm -rf "${ROOT:?}/$objective"
    case $objective in
        distill|distill_jsd)
            TEACHER=${TEACHER:-runs/demo_real/grpo/LATEST}
            [ -f "$TEACHER/config.json" ] || { echo "no teacher at $TEACHER: run scripts/demo_real.sh first, or set TEACHER"; exit 1; }
            divergence=$([ "$objective" = distill ] && echo sampled_reverse_kl || echo jsd)
            ARGS="loss=distill loss.teacher=$TEACHER loss.divergence=$divergence" ;;
        *) ARGS="loss=$objective loss.filter_groups=true" ;;
    esac
    $TORCHRUN train.py $ARGS $TRAIN datasets=["$PROMPTS"] reward.functions=[$REWARD] sampler=vllm \
        loss.rollout_batch_size=16 loss.n_samples_per_prompt=8 loss.kl_coef=0 \
        loss.sampling.max_new_tokens=16 loss.sampling.temperature=0.7 batch_size=16 lr=2e-5 warmup_steps=2 \
        n_examples=192 exp_name="objectives_real_$objective" run_dir="$ROOT/$objective"
    greedy "$ROOT/$objective/LATEST" "$ROOT/after-$objective.jsonl"
    $PY scripts/score_samples.py --reward $REWARD --samples "$ROOT/after-$objective.jsonl" --label "after-$objective" \
        --show 0 --against "$ROOT/released.jsonl"
done
