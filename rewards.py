"""What scores a sample: rule-based reward functions (the registry, users' own functions, called
safely), reward models, LLM judges (judges.py) and an environment's rewards.

A reward function is ``fn(prompt: list[dict], completion: str, **row) -> float``: the conversation
that was sampled from, the completion's text, and the other fields of the dataset row (a toy
prompt row carries its ``answer``). ``reward.functions`` names one from ``FUNCTIONS`` (the toy
verifiers), ``module:function`` for an importable module, or ``path/to/file.py:function``.

A function that raises, or returns something that is not a finite number, does not stop the run
on one sample: the sample's score is ``reward.invalid_score`` and the error is reported (see
``call``); the trainer stops only when more than ``reward.max_invalid_fraction`` of a rollout fails.
A judge's failure for a sample (down, too slow, a reply with no score) counts the same way.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import urllib.parse
from pathlib import Path
from typing import Callable

import torch

import distributed
import judges
import models
from data.packing import last_positions
from data.tokenize import end_of_turn, prompt_ids, reply_ids
from data.toy import REWARDS as FUNCTIONS
from rollout import Rollout

log = logging.getLogger("train")


def load_function(spec: str) -> Callable[..., float]:
    return FUNCTIONS[spec] if spec in FUNCTIONS else load_object(spec, "reward function", FUNCTIONS)


def load_object(spec: str, what: str, known: dict):
    """``module:name`` or ``path/to/file.py:name`` (a reward function, an environment class)."""
    if ":" not in spec:
        raise ValueError(f"{what} {spec!r}: not one of {sorted(known)}, nor module:name or path/to/file.py:name")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        if not Path(target).is_file():
            raise ValueError(f"{what} {spec!r}: no file {target}")
        module = _file_module(str(Path(target).resolve()), Path(target).stat().st_mtime_ns)
    else:
        module = importlib.import_module(target)
    found = getattr(module, name, None)
    if not callable(found):
        raise ValueError(f"{what} {spec!r}: {target} has no {what.split()[-1]} {name!r}")
    return found


@functools.cache
def _file_module(path: str, mtime_ns: int):
    """A .py file run as a module once (per version of the file): the config checks load what a
    run names, the trainer loads it again to use it."""
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def call(fn: Callable[..., float], prompt: list[dict], completion: str, row: dict) -> tuple[float | None, str | None]:
    """``(score, None)``, or ``(None, why)`` when the function raised or gave no finite number."""
    try:
        value = fn(prompt, completion, **row)
    except Exception as e:  # a user's function: anything may go wrong in it, and one sample must not stop the run
        return None, f"raised {type(e).__name__}: {e}"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None, f"returned {value!r:.60}, not a number"
    if not math.isfinite(value):
        return None, f"returned {value}"
    return value, None


def check_config(reward_cfg, judge_cfg, env: bool = False, required: bool = True) -> tuple[dict, dict]:
    """``reward:``'s functions (loaded: a bad name stops the run before anything is built) and the
    weight of each reward by name (models first, then functions, judges, the environment's);
    ``required``: the trainer learns from the scores, so something must score. ``judge_cfg``: how
    ``reward.judges`` (their addresses) are asked (config/judge/)."""
    functions = {spec: load_function(spec) for spec in reward_cfg.functions}
    names = list(reward_cfg.models) + list(reward_cfg.functions) + list(reward_cfg.judges) + (["env"] if env else [])
    if not names and required:
        raise ValueError("nothing scores the samples: set reward.functions, reward.models and/or reward.judges")
    for path in reward_cfg.models:
        if not (Path(models.resolve(path)) / "config.json").exists():
            raise ValueError(f"reward.models: {path} is not a model directory (no config.json)")
    for url in reward_cfg.judges:
        cfg = judges.load_config(judge_cfg, url)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward.judges: {url!r} is not a judge's address (http://host:port/v1)")
        if cfg.mode != "pointwise":
            raise ValueError(f"reward.judges score each sample: judge.mode={cfg.mode} must be pointwise")
        judges.read_template(cfg.template, cfg.mode)
    weights = reward_cfg.weights
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"reward.weights has {len(weights)} values for {len(names)} rewards {names} "
                         f"(models first, then functions, judges, the environment's)")
    return functions, dict(zip(names, weights if weights is not None else [1.0] * len(names)))


class Rewards:
    """What scores a sample (``reward:`` in config.yaml): ``functions`` (rewards.py), ``models``
    (reward-model exports, sharded like the policy, read at the sample's last token) and ``judges``
    (LLM judges at these addresses, asked as ``judge:`` says, each rank for its own samples),
    weighted and summed. A sample a function or judge fails on gets ``invalid_score`` and an error;
    more than ``max_invalid_fraction`` of a rollout failing stops the run."""

    def __init__(self, reward_cfg, judge_cfg, tokenizer, layout, batch_size: int, max_tokens: int,
                 env: bool = False, required: bool = True, judge_cache: str | None = None):
        """``layout(seqs, pad_id)``: the trainer's packer; ``batch_size``: samples per forward of a
        reward model on each rank; ``max_tokens``: the longest sequence a forward takes; ``env``:
        the samples are episodes, and the environment's rewards (summed) count as a reward "env";
        ``judge_cache``: the judges' reply cache where ``judge.cache_dir`` is null (the run's own,
        so that a resumed run is answered what the interrupted one was)."""
        self.cfg, self.tokenizer = reward_cfg, tokenizer
        self.layout, self.batch_size, self.max_tokens = layout, batch_size, max_tokens
        self.functions, self.weights = check_config(reward_cfg, judge_cfg, env, required)
        self.models = {}  # path -> (sharded model, its tokenizer, whether the policy's tokens fit it)
        if not self.weights and distributed.is_main():
            log.warning("nothing scores the samples (no reward.functions, models, judges or env): rollout/score_mean "
                        "and eval/reward are not logged")
        self.judges = {}
        for url in reward_cfg.judges:
            cfg = judges.load_config(judge_cfg, url)
            if cfg.cache_dir is None and judge_cache is not None:
                cfg.cache_dir = judge_cache
            self.judges[url] = judges.Judge(cfg)

    def add_model(self, path: str, model, tokenizer):
        same = (tokenizer.get_vocab() == self.tokenizer.get_vocab()
                and tokenizer.chat_template == self.tokenizer.chat_template)
        if not same:
            log.info(f"reward model {path}: its tokenizer differs from the policy's; samples are re-tokenized from text")
        self.models[path] = (model, tokenizer, same)

    def score(self, rollout: Rollout):
        """Collective (reward models): ``rollout``'s ``reward_scores``, ``scores`` and ``errors``."""
        per_model = {path: self.model_scores(*rm, rollout) for path, rm in self.models.items()}
        per_judge = {}
        if self.judges:
            rows = [{**rollout.rows[i], "prompt": rollout.prompts[i], "completion": rollout.texts[i]}
                    for i in range(len(rollout))]
            per_judge = {url: judge.score(rows) for url, judge in self.judges.items()}
        scores, rollout.reward_scores, rollout.errors = [], [], []
        for i in range(len(rollout)):
            by_name, error = {path: values[i] for path, values in per_model.items()}, None
            if rollout.episodes is not None:
                by_name["env"], error = rollout.episodes[i].reward, rollout.episodes[i].error
            for name, fn in self.functions.items():
                by_name[name], failed = call(fn, rollout.prompts[i], rollout.texts[i], rollout.rows[i])
                if failed is not None and error is None:
                    error = f"reward function {name} {failed} (completion {rollout.texts[i]!r:.80})"
            for url, results in per_judge.items():
                by_name[url] = results[i].value
                if results[i].error is not None and error is None:
                    error = f"judge {url}: {results[i].error}"
            valid = all(v is not None and math.isfinite(v) for v in by_name.values())
            if not valid and error is None:
                error = f"a reward model gave a non-finite score ({by_name})"
            scores.append(sum(self.weights[k] * v for k, v in by_name.items()) if valid else self.cfg.invalid_score)
            rollout.reward_scores.append(by_name)
            rollout.errors.append(error)
        rollout.scores = torch.tensor(scores, dtype=torch.float32)

    @torch.no_grad()
    def model_scores(self, model, tokenizer, same: bool, rollout: Rollout) -> list[float]:
        """A reward model's score of each sample, read at its last token, the end-of-turn token the
        model was trained to score at. A model with another tokenizer reads the text re-tokenized as
        its training pairs were (``data.tokenize.reply_ids``: its own template's rendering)."""
        eot = None if same else end_of_turn(tokenizer)

        def sequences(i: int) -> dict:
            if same:
                ids = rollout.prompt_ids[i] + rollout.response(i)
                ids += [] if ids[-1] == tokenizer.eos_token_id else [tokenizer.eos_token_id]
            else:
                ids = prompt_ids(tokenizer, rollout.prompts[i])
                ids += reply_ids(tokenizer, rollout.prompts[i], ids, rollout.texts[i], eot, f"sample {i}")
            ids = ids[-self.max_tokens :]  # a re-tokenized sample can be longer; keep its end
            return {"input_ids": ids, "labels": ids}

        def forward(chunk: list[int]) -> list[float]:
            batch = self.layout([sequences(i) for i in chunk], tokenizer.pad_token_id)
            values, _ = model(batch["input_ids"], batch["position_ids"])
            return values.float().flatten()[last_positions(batch["seq_ids"], len(chunk))].tolist()

        return distributed.lockstep(forward, list(range(len(rollout))), self.batch_size, stand_in=0, frozen=(model,))

    def check(self, rollout: Rollout, step: int):
        """Stop the run if too many of the (gathered) rollout's samples have no valid score."""
        errors = [e for e in rollout.errors if e is not None]
        if len(errors) > self.cfg.max_invalid_fraction * len(rollout):
            raise RuntimeError(f"step {step}: {len(errors)} of {len(rollout)} samples have no valid score "
                               f"(reward.max_invalid_fraction={self.cfg.max_invalid_fraction}); first: {errors[0]}")
        if errors:
            log.warning(f"step {step}: {len(errors)} of {len(rollout)} samples scored "
                        f"reward.invalid_score={self.cfg.invalid_score}; first: {errors[0]}")

    def metrics(self, rollout: Rollout) -> dict:
        n = len(rollout)
        record = {} if not self.weights else {"rollout/score_mean": rollout.scores.mean().item(),
                                              "rollout/score_std": rollout.scores.std(unbiased=False).item()}
        record |= {"rollout/response_length": rollout.lengths.sum().item() / n,
                   "rollout/truncated_fraction": sum(r == "length" for r in rollout.finish_reasons) / n,
                   "rollout/empty_fraction": sum(not t.strip() for t in rollout.texts) / n,
                   "rollout/invalid_fraction": sum(e is not None for e in rollout.errors) / n}
        for name in self.weights:
            valid = [s[name] for s in rollout.reward_scores if s[name] is not None]
            if valid:  # no valid score: no mean (the invalid ones are counted in rollout/invalid_fraction)
                record[f"reward/{self.label(name)}"] = sum(valid) / len(valid)
        if self.judges:
            record.update(self.judge_metrics())
        if rollout.episodes is not None:
            record.update(rollout.episode_metrics())
        return record

    def label(self, name: str) -> str:
        """A reward's name in the log: a model by its directory's name, a judge as judge@host:port."""
        if name in self.models:
            return Path(name).name
        return f"judge@{urllib.parse.urlparse(name).netloc}" if name in self.judges else name

    def judge_metrics(self) -> dict:
        """Collective: the judges' counts since the last call (judges.Stats), summed over ranks and
        judges, and the mean seconds per request that reached a server (omitted when none did)."""
        names = judges.Stats.COUNTS + ("latency_total_s",)
        totals = [0.0] * len(names)
        for judge in self.judges.values():
            stats = judge.stats()
            stats["judge/latency_total_s"] = stats.pop("judge/latency_s", 0.0) * stats["judge/requests"]
            totals = [t + stats[f"judge/{name}"] for t, name in zip(totals, names)]
        summed = dict(zip(names, distributed.all_sum(totals, distributed.device())))
        record = {f"judge/{name}": summed[name] for name in judges.Stats.COUNTS}
        if summed["requests"]:
            record["judge/latency_s"] = summed["latency_total_s"] / summed["requests"]
        return record
