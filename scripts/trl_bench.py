"""TRL 1.16 on ``bench_real.py``'s work, for a side-by-side speed on the real model.

Runs in a separate environment with TRL (``../shared/bench-peers/setup.sh`` makes /tmp/peers-venv).
It imports nothing of this project but two data makers: ``bench_sft.synthetic_chat`` (the SFT and
DPO rows) and ``arithmetic.py`` (GRPO's prompts and reward).

    OMP_NUM_THREADS=2 /tmp/peers-venv/bin/python scripts/trl_bench.py --stage sft --model .cache/SmolLM2-135M-Instruct
    OMP_NUM_THREADS=1 /tmp/peers-venv/bin/torchrun --nproc_per_node 2 scripts/trl_bench.py --stage dpo --model ...

The same work as bench_real.py's rows at its defaults, fp32, gradient checkpointing off, a constant lr:

- ``sft``: the same synthetic chat rows (prompt -> one assistant reply, the chat template's own
  system turn included, as this trainer's template does), 8 a step, at most 256 tokens;
  ``--padding-free`` is TRL's fastest SFT layout on one process (``padding_free=True``; else padded).
- ``dpo``: the same synthetic pairs, 8 a step, at most 256 tokens, the reference resident (TRL's
  default), padded (TRL's DPOTrainer on CPU).
- ``grpo``: 16 prompts x 8 samples of the arithmetic task (temperature 1, at most 16 new tokens,
  Hugging Face generate: TRL's vLLM path needs CUDA or a server), no reference model (beta 0),
  one pass in 2 updates of 64 samples (``steps_per_generation=2``).

Tokens are real (non-padding) tokens through the policy, prompt and reply (DPO: chosen and
rejected), summed over ranks, as bench_real.py counts them. SFT and DPO print the median of the
per-step tokens/s after the first step (bench_real's statistic); GRPO prints the mean seconds an
iteration after the first. One JSON line on stdout.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

import arithmetic  # noqa: E402
from bench_sft import synthetic_chat  # noqa: E402

WARMUP = 1  # steps (SFT, DPO) or iterations (GRPO) not timed, as in bench_real.py
PROMPTS, SAMPLES, UPDATES = 16, 8, 2  # GRPO: an iteration is UPDATES optimizer steps


class StepTimes(TrainerCallback):
    def __init__(self):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())


def real_tokens(inputs) -> int:
    """Non-padding tokens in a collated batch: its attention mask, or a padding-free row's length."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    if "chosen_attention_mask" in inputs:
        return int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
    return inputs["input_ids"].numel()


def chat_rows(stage: str, n: int, max_length: int) -> Dataset:
    """bench_real.py's rows (bench_sft.synthetic_chat with its arguments), in TRL's conversational layout."""
    path = Path(tempfile.mkdtemp(prefix="trl-rows-")) / "rows.jsonl"
    synthetic_chat(path, n=n, max_chars=max_length * 2, pairs=stage == "dpo")
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = []
    for r in map(json.loads, path.read_text().splitlines()):
        if stage == "sft":
            rows.append({"prompt": user(r["prompt"]), "completion": reply(r["response"])})
        else:
            rows.append({"prompt": user(r["prompt"]), "chosen": reply(r["chosen"]), "rejected": reply(r["rejected"])})
    return Dataset.from_list(rows)


def grpo_reward(completions, answer, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [arithmetic.reward([], t, a) for t, a in zip(texts, answer)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["sft", "dpo", "grpo"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=6, help="SFT/DPO optimizer steps (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8, help="SFT rows / DPO pairs per step, over all ranks")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--padding-free", action="store_true", help="SFT: TRL's padding_free=True")
    p.add_argument("--iterations", type=int, default=4, help="GRPO iterations timed (after one not timed)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-bench-"), learning_rate=1e-6, lr_scheduler_type="constant",
                  use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
                  logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
                  model_init_kwargs={"dtype": torch.float32})
    tokenizer, timer = AutoTokenizer.from_pretrained(a.model), StepTimes()
    with contextlib.redirect_stdout(sys.stderr):  # stdout keeps the one JSON line
        if a.stage == "grpo":
            rows = [{"prompt": r["prompt"], "answer": r["answer"]}
                    for r in arithmetic.rows("train", PROMPTS * (a.iterations + WARMUP + 1))]
            cfg = GRPOConfig(**common, max_steps=UPDATES * (a.iterations + WARMUP),
                             per_device_train_batch_size=PROMPTS * SAMPLES // UPDATES // world,
                             steps_per_generation=UPDATES, num_generations=SAMPLES,
                             max_completion_length=a.max_new_tokens, temperature=1.0, beta=0.0, num_iterations=1,
                             use_vllm=False, shuffle_dataset=False)
            trainer = GRPOTrainer(model=a.model, args=cfg, reward_funcs=grpo_reward, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, callbacks=[timer])
        else:
            n = a.batch_size * (a.steps + 2) + 40  # bench_real.py's row count, so the same rows
            per_rank = dict(max_steps=a.steps, per_device_train_batch_size=a.batch_size // world)
            if a.stage == "sft":
                # TRL refuses a max_length with padding_free and no packing; no row here is longer
                cfg = SFTConfig(**common, **per_rank, padding_free=a.padding_free,
                                max_length=None if a.padding_free else a.max_length)
                trainer = SFTTrainer(model=a.model, args=cfg, train_dataset=chat_rows("sft", n, a.max_length),
                                     processing_class=tokenizer, callbacks=[timer])
            else:
                cfg = DPOConfig(**common, **per_rank, max_length=a.max_length)
                trainer = DPOTrainer(model=a.model, args=cfg, train_dataset=chat_rows("dpo", n, a.max_length),
                                     processing_class=tokenizer, callbacks=[timer])
        tokens, inner = [], trainer.training_step

        def counted(model, inputs, *args, **kwargs):
            if a.stage != "grpo":  # GRPOTrainer's steps get the raw rows: it generates inside
                tokens.append(real_tokens(inputs))
            return inner(model, inputs, *args, **kwargs)

        trainer.training_step = counted
        trainer.train()
    seconds = torch.tensor([b - a for a, b in zip(timer.marks, timer.marks[1:])], dtype=torch.float64)
    step_tokens = trainer.accelerator.reduce(torch.tensor(tokens or [0.0], dtype=torch.float64), reduction="sum")
    if not trainer.accelerator.is_main_process:
        return
    out = {"trainer": f"trl {trl.__version__} {type(trainer).__name__}", "stage": a.stage, "world_size": world,
           "threads": torch.get_num_threads()}
    if a.stage == "grpo":
        per_iteration = seconds.view(-1, UPDATES).sum(1)[WARMUP:]
        out.update({"iterations": len(per_iteration), "iteration_s": round(per_iteration.mean().item(), 2)})
    else:
        rates = (step_tokens / seconds)[WARMUP:].tolist()
        out.update({"steps": len(rates), "padding_free": a.padding_free, "tokens_per_step": step_tokens[WARMUP:].mean().item(),
                    "tokens_per_s": round(statistics.median(rates), 1)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
