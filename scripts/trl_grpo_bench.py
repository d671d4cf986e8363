"""TRL's GRPOTrainer on the work of ``bench_real.py``'s GRPO row, for a side-by-side iteration time.
Runs in a separate environment with TRL (``../shared/bench-peers/setup.sh`` makes /tmp/peers-venv);
it imports nothing of this project but ``scripts/arithmetic.py`` (the prompts and the reward).

    OMP_NUM_THREADS=2 /tmp/peers-venv/bin/python scripts/trl_grpo_bench.py --model .cache/SmolLM2-135M-Instruct
    OMP_NUM_THREADS=1 /tmp/peers-venv/bin/torchrun --nproc_per_node 2 scripts/trl_grpo_bench.py --model ...

The same work per iteration as ``bench_real.py``: 16 prompts x 8 samples (temperature 1, at most 16
new tokens, Hugging Face generate: TRL's vLLM path needs CUDA or a server), fp32, no reference
model (beta 0), one pass in 2 updates of 64 samples (``steps_per_generation=2``), gradient
checkpointing off. An iteration is two optimizer steps; timed from the end of the first iteration
to the end of the last. Prints one JSON line.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import arithmetic  # noqa: E402

PROMPTS, SAMPLES, UPDATES = 16, 8, 2


class IterationTimer(TrainerCallback):
    def __init__(self):
        self.marks = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % UPDATES == 0:
            self.marks.append(time.perf_counter())


def reward(completions, answer, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [arithmetic.reward([], t, a) for t, a in zip(texts, answer)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--iterations", type=int, default=3, help="timed, after one that is not")
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in arithmetic.rows("train", PROMPTS * (a.iterations + 2))]
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), max_steps=UPDATES * (a.iterations + 1),
        per_device_train_batch_size=PROMPTS * SAMPLES // UPDATES // world, steps_per_generation=UPDATES,
        num_generations=SAMPLES, max_completion_length=a.max_new_tokens, temperature=1.0, beta=0.0,
        num_iterations=1, learning_rate=1e-6, lr_scheduler_type="constant", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", logging_strategy="no", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, model_init_kwargs={"dtype": torch.float32}, use_vllm=False, shuffle_dataset=False,
    )
    timer = IterationTimer()
    with contextlib.redirect_stdout(sys.stderr):
        trainer = GRPOTrainer(model=a.model, args=cfg, reward_funcs=reward, train_dataset=Dataset.from_list(rows),
                              processing_class=AutoTokenizer.from_pretrained(a.model), callbacks=[timer])
        trainer.train()
    if trainer.accelerator.is_main_process:
        seconds = (timer.marks[-1] - timer.marks[0]) / (len(timer.marks) - 1)
        print(json.dumps({"trainer": f"trl {trl.__version__} GRPOTrainer", "world_size": world,
                          "threads": torch.get_num_threads(), "iterations": len(timer.marks) - 1,
                          "iteration_s": round(seconds, 2), "samples_per_s": round(PROMPTS * SAMPLES / seconds, 2)}))


if __name__ == "__main__":
    main()
