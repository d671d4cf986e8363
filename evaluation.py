"""A trainer's evaluations (``loss_eval``, ``sample_eval``, ``reward_eval``: collective, what
``Trainer.evaluate`` logs), and task accuracy: of an exported model by greedy decoding with HF
``generate`` (single-process and unsharded: ``<run_dir>/LATEST`` or a random-init config, what the
demo prints before and after each stage), and during training of the completions the colocated
sampler gives (collective), each checked by the datasets' verifier.
"""

from __future__ import annotations

import logging
import math

import torch

import distributed
from data.tokenize import IGNORE, prompt_ids
from metrics_log import means
from rollout import Rollout
from sampler import SamplingParams, rollout_of, sampling_params

log = logging.getLogger("train")


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    model.eval()
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, ids))
        # left padding, so every prompt ends where generation starts
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def task_scores(model, tokenizer, rows: list[dict], reward_fn, max_new_tokens: int = 16) -> list[float]:
    """The verifier's score of the model's greedy completion of each row's prompt."""
    completions = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    return [reward_fn(r["prompt"], c) for r, c in zip(rows, completions)]


def episode_scores(model, tokenizer, rows: list[dict], env: str, max_turns: int, max_length: int, timeout_s: float,
                   max_new_tokens: int = 16) -> tuple[list[float], dict]:
    """Greedy episodes of ``env`` on ``rows`` (prompt rows) with HF ``generate``, an environment
    call slower than ``timeout_s`` failing its episode (as ``env_timeout_s`` in training): each episode's
    0/1 score (the environment's ``info["solved"]``), and its ``info`` values and turns averaged
    over all episodes (``info``) and over the solved ones (``info_when_solved``)."""
    from types import SimpleNamespace

    from data.tokenize import tokenize_prompts
    from data.toy_env import ENVIRONMENTS
    from environments import EpisodeRunner, load_environment
    from rollout import info_means
    from sampler import HFSampler

    limits = SimpleNamespace(max_length=max_length, max_prompt_length=max_length - max_new_tokens)
    examples, _ = tokenize_prompts(rows, tokenizer, limits, env)
    runner = EpisodeRunner(load_environment(env, ENVIRONMENTS), tokenizer, max_turns, max_length,
                           limits.max_prompt_length, timeout_s)
    rollout = runner.rollout(HFSampler(model, tokenizer), examples, 1,
                             SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    solved = [float(bool(e.info.get("solved"))) for e in rollout.episodes]

    def averaged(episodes) -> dict:
        out = {k: v for k, v in info_means(episodes).items() if k != "solved"}
        return {**out, "turns": sum(e.turns for e in episodes) / max(len(episodes), 1)}

    won = [e for e, s in zip(rollout.episodes, solved) if s]
    return solved, {"info": averaged(rollout.episodes), "info_when_solved": averaged(won)}


def task_accuracy(model, tokenizer, rows: list[dict], reward_fn, max_new_tokens: int = 16) -> float:
    scores = task_scores(model, tokenizer, rows, reward_fn, max_new_tokens)
    return sum(scores) / len(scores)


def verifier(datasets: list[str]):
    """The reward function that checks completions of every one of ``datasets`` (a toy task's
    three datasets share one: ``data.toy.VERIFIERS``), or None: no task accuracy to report."""
    from data.toy import VERIFIERS

    found = {VERIFIERS.get(name) for name in datasets}
    return found.pop() if len(found) == 1 else None


def sample_completions(sampler, prompts: list[list[int]], params) -> list[str]:
    """Collective: one completion of each of ``prompts`` (token lists, the same on every rank);
    each rank samples a share, every rank gets them all, in order."""
    outs = sampler.generate(distributed.share(prompts), params)
    return distributed.gather([o[0].text for o in outs])


def verified_fraction(datasets: list[str], prompts: list[list[dict]], completions: list[str],
                      rows: list[dict] | None = None) -> float | None:
    """The fraction of ``completions`` (of ``prompts``, with their dataset ``rows``' other fields)
    the datasets' verifier accepts; None when there is no verifier or nothing to check."""
    verify = verifier(datasets)
    if verify is None or not completions:
        return None
    rows = rows if rows is not None else [{}] * len(completions)
    return sum(verify(p, c, **row) for p, c, row in zip(prompts, completions, rows)) / len(completions)


def paired_comparison(before: list[float], after: list[float]) -> dict:
    """Two models' 0/1 scores on the same prompts: ``fixed`` counts the prompts only ``after`` gets
    right, ``broken`` those only ``before`` does, and McNemar's z = (fixed - broken) /
    sqrt(fixed + broken). It looks only at the prompts the models disagree on, so it resolves a
    gain that the two accuracies' separate standard errors would hide."""
    if len(before) != len(after):
        raise ValueError(f"paired scores need the same prompts: {len(before)} vs {len(after)}")
    fixed = sum(a > b for b, a in zip(before, after))
    broken = sum(a < b for b, a in zip(before, after))
    z = (fixed - broken) / math.sqrt(fixed + broken) if fixed + broken else 0.0
    return {"fixed": fixed, "broken": broken, "mcnemar_z": round(z, 2)}


# --- during training: what Trainer.evaluate logs -------------------------------------------------

@torch.no_grad()
def loss_eval(trainer) -> dict:
    """Collective: the loss on the eval examples (equal shares: every rank runs as many forwards)
    and, with ``sample_during_eval``, completions of the first eval prompts (``sample_eval``)."""
    world = trainer.world
    examples = trainer.eval_examples[: len(trainer.eval_examples) // world * world]
    mine, size = distributed.share(examples), max(1, trainer.cfg.eval_batch_size // world)
    sums = trainer.run_micro_batches([mine[i : i + size] for i in range(0, len(mine), size)], train=False)
    record = means(sums, "eval/{}", trainer.step, f" ({len(examples)} of {len(trainer.eval_examples)} eval examples: "
                                                  f"each of the {world} ranks evaluates as many)")
    if trainer.sampler is not None:
        record.update(sample_eval(trainer))
    return record


def sample_eval(trainer) -> dict:
    """Collective: completions of the first ``n_eval_model_samples`` eval prompts from the current
    weights, written to ``run_dir/samples/step-<N>.jsonl`` (and a wandb table); with a verifier for
    the datasets (the toy tasks), also their task accuracy."""
    record = {"timing/weight_sync": trainer.sampler.sync_weights(trainer.model)}
    examples = trainer.eval_examples[: trainer.cfg.n_eval_model_samples]
    prompts = [seq["input_ids"][: prompt_length(seq)] for seq in (trainer.sequences(ex)[0] for ex in examples)]
    params = sampling_params(trainer.cfg.eval_sampling, "eval_sampling")
    completions = sample_completions(trainer.sampler, prompts, params)
    trainer.model.eval()
    accuracy = verified_fraction(trainer.cfg.datasets, [ex["prompt"] for ex in examples], completions)
    if accuracy is not None:
        record["eval/task_accuracy"] = accuracy
    trainer.metrics.samples([{"prompt": ex["prompt"], "completion": c} for ex, c in zip(examples, completions)],
                            trainer.step)
    return record


@torch.no_grad()
def reward_eval(trainer) -> dict:
    """Collective: one completion per eval prompt with ``eval_sampling``, scored as in training:
    ``eval/reward`` and, for a toy task, ``eval/task_accuracy``; written to samples/."""
    trainer.sampler.sync_weights(trainer.model)
    world, step = trainer.world, trainer.step
    examples = trainer.eval_examples[: len(trainer.eval_examples) // world * world]
    params = sampling_params(trainer.cfg.eval_sampling, "eval_sampling")
    rollout = rollout_of(trainer.sampler, distributed.share(examples), params, trainer.tokenizer.eos_token_id,
                         trainer.env)
    trainer.rewards.score(rollout)
    rollout = Rollout.cat(distributed.gather([rollout]))
    if not len(rollout):
        if distributed.is_main():
            log.warning(f"step {step}: no eval prompt left over {world} ranks (each evaluates as many): "
                        f"eval/reward not logged")
        return {}
    trainer.rewards.check(rollout, step)  # a reward function that fails on most samples stops the run here too
    record = {"eval/reward": rollout.scores.mean().item()} if trainer.rewards.weights else {}  # (a warning at start)
    if rollout.episodes is not None:  # the environment says whether an episode solved the task
        record.update(rollout.episode_metrics("eval"))
        accuracy = sum(bool(e.info.get("solved")) for e in rollout.episodes) / max(len(rollout), 1)
    else:
        accuracy = verified_fraction(trainer.cfg.datasets, rollout.prompts, rollout.texts, rollout.rows)
    if accuracy is not None:
        record["eval/task_accuracy"] = accuracy
    trainer.metrics.samples([{"prompt": p, "completion": t, "score": s} for p, t, s in
                             zip(rollout.prompts, rollout.texts, rollout.scores.tolist())], step)
    return record


def prompt_length(seq: dict) -> int:
    """Tokens before a sequence's first label: its (possibly truncated) prompt as the model saw it."""
    return next(i for i, label in enumerate(seq["labels"]) if label != IGNORE)
