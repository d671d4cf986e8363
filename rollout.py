"""A rollout: completions the policy sampled for a batch of prompts, scored, as ``[N, T]`` tensors.

``N`` samples (prompts x ``n_samples_per_prompt``, a prompt's samples adjacent, in prompt order),
``T`` the longest completion. A completion is every token after the prompt; ``mask`` marks the
ones the policy chose and is trained on: all of them up to ``lengths`` for one reply; a multi-turn
episode (environments.py) puts the environment's tokens between the policy's replies with
``mask`` 0 on them, and ``episodes`` says what happened in each. Per-token fields are 0 right of
``lengths`` (``sampler_logps``: NaN where the sampler gave none, e.g. the end-of-turn token an
empty completion trains on, and an environment's tokens).

Each rank builds the rollout of its share of the prompts (``Rollout.of``), scores it (``Rewards``),
and the shares are concatenated in rank order on every rank (``Rollout.cat``); the trainer then
fills ``old_logps`` ... ``is_weight`` and trains on subsets (``select``) packed by ``sequence``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import distributed
import environments
import models
import rewards
from data.packing import last_positions
from data.tokenize import IGNORE, end_of_turn, prompt_ids, reply_ids

log = logging.getLogger("train")

# the per-token [N, T] float fields the trainer fills and the packer lays out like the labels
TOKEN_FIELDS = ("old_logps", "ref_logps", "old_values", "advantages", "returns", "is_weight")


@dataclass
class Rollout:
    prompt_ids: list[list[int]]      # each sample's prompt tokens, as the sampler saw them
    tokens: torch.Tensor             # [N, T] long: the completion's tokens, right-padded with 0
    lengths: torch.Tensor            # [N] long: completion tokens of each sample
    mask: torch.Tensor               # [N, T] float: 1 on the tokens the policy is trained on
    sampler_logps: torch.Tensor      # [N, T] float: the sampler's log-probs of them (NaN: none given)
    texts: list[str]
    finish_reasons: list[str]        # "stop" | "length"
    prompts: list[list[dict]]        # the conversation each sample continues
    rows: list[dict]                 # the dataset row's other fields (reward functions read them)
    scores: torch.Tensor | None = None        # [N]: the weighted sum of the rewards
    reward_scores: list[dict] | None = None   # per sample {reward name: score or None}
    errors: list[str | None] | None = None    # why a sample has no valid score
    old_logps: torch.Tensor | None = None     # [N, T]: pi_old (the policy before this step's updates)
    ref_logps: torch.Tensor | None = None     # [N, T]: the frozen reference
    old_values: torch.Tensor | None = None    # [N, T]: the critic before this step's updates
    advantages: torch.Tensor | None = None    # [N, T]
    returns: torch.Tensor | None = None       # [N, T]: the critic's targets
    is_weight: torch.Tensor | None = None     # [N, T]: truncated importance weight pi_old / sampler
    kl: torch.Tensor | None = None            # [N, T]: per-token KL estimate to the reference
    episodes: list | None = None              # multi-turn: what each episode was (environments.Episode)

    @staticmethod
    def of(examples: list[dict], completions: list[list], eos_id: int) -> Rollout:
        """From the sampler's completions (``sampler.Sample``s) of each prompt example. A
        completion with no token at all trains on the end-of-turn token alone."""
        flat = [(ex, out) for ex, group in zip(examples, completions) for out in group]
        ids = [list(out.token_ids) or [eos_id] for _, out in flat]
        logps = [list(out.logprobs) if out.token_ids else [math.nan] for _, out in flat]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        return Rollout(prompt_ids=[ex["prompt_ids"] for ex, _ in flat], tokens=_padded(ids, torch.long),
                       lengths=lengths, mask=_mask(lengths), sampler_logps=_padded(logps, torch.float32),
                       texts=[out.text for _, out in flat], finish_reasons=[out.finish_reason for _, out in flat],
                       prompts=[ex["prompt"] for ex, _ in flat], rows=[ex["row"] for ex, _ in flat])

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: list[int]) -> Rollout:
        """The samples at ``indices``, in that order."""
        index = torch.tensor(indices, dtype=torch.long)
        return Rollout(**{f.name: _take(getattr(self, f.name), indices, index) for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        """The parts' samples one after the other (tensors padded to the longest)."""
        out = {}
        for f in dataclasses.fields(Rollout):
            values = [getattr(p, f.name) for p in parts]
            if values[0] is None:
                out[f.name] = None
            elif torch.is_tensor(values[0]) and values[0].dim() == 2:
                width = max(v.shape[1] for v in values)
                out[f.name] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values])
            elif torch.is_tensor(values[0]):
                out[f.name] = torch.cat(values)
            else:
                out[f.name] = [x for v in values for x in v]
        return Rollout(**out)

    def response(self, i: int) -> list[int]:
        return self.tokens[i, : self.lengths[i]].tolist()

    def sequence(self, i: int, fields: tuple[str, ...] = ()) -> dict:
        """Sample ``i`` as a training sequence for the packer: its prompt, then its completion,
        labelled where the policy is trained; each of ``fields`` a per-token tensor aligned with
        the labels (0 on the prompt)."""
        n, p = int(self.lengths[i]), len(self.prompt_ids[i])
        trained = self.mask[i, :n] > 0
        labels = torch.where(trained, self.tokens[i, :n], IGNORE).tolist()
        seq = {"input_ids": self.prompt_ids[i] + self.response(i), "labels": [IGNORE] * p + labels}
        for name in fields:
            seq[name] = torch.cat([torch.zeros(p), getattr(self, name)[i, :n].float()])
        return seq

    def sample_rows(self) -> list[dict]:
        """What a user reads of the scored samples (rollouts/, iterations/<N>/samples.jsonl)."""
        rows = []
        for i in range(len(self)):
            row = {"prompt": self.prompts[i], "text": self.texts[i], "score": self.scores[i].item(),
                   "scores": self.reward_scores[i], "finish_reason": self.finish_reasons[i]}
            if self.episodes is not None:
                row.update(conversation=self.episodes[i].conversation, turns=self.episodes[i].turns,
                           info=self.episodes[i].info)
            if self.errors[i] is not None:
                row["error"] = self.errors[i]
            rows.append(row)
        return rows

    def varied_groups(self, n: int) -> list[int]:
        """The indices of the samples of prompts (groups of ``n``) whose samples do not all score the same."""
        groups = self.scores.view(-1, n)
        return [g * n + k for g in range(len(groups)) if len(set(groups[g].tolist())) > 1 for k in range(n)]


def _padded(rows: list[list], dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=dtype).view(len(rows), width)


def _mask(lengths: torch.Tensor) -> torch.Tensor:
    width = int(lengths.max()) if len(lengths) else 0
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def _take(value, indices: list[int], index: torch.Tensor):
    if value is None:
        return None
    if torch.is_tensor(value):
        return value[index]
    return [value[i] for i in indices]


class Rewards:
    """What scores a sample (``reward:`` in config.yaml): ``functions`` (rewards.py) and ``models``
    (reward-model exports, sharded like the policy, read at the sample's last token), weighted
    and summed. A sample a function fails on gets ``invalid_score`` and an error; more than
    ``max_invalid_fraction`` of a rollout failing stops the run."""

    def __init__(self, reward_cfg, tokenizer, layout, batch_size: int, max_tokens: int, env: bool = False):
        """``layout(seqs, pad_id)``: the trainer's packer; ``batch_size``: samples per forward of a
        reward model on each rank; ``max_tokens``: the longest sequence a forward takes; ``env``:
        the samples are episodes, and the environment's rewards (summed) count as a reward "env"."""
        self.cfg, self.tokenizer = reward_cfg, tokenizer
        self.layout, self.batch_size, self.max_tokens = layout, batch_size, max_tokens
        self.functions = {spec: rewards.load_function(spec) for spec in reward_cfg.functions}
        names = list(reward_cfg.models) + list(reward_cfg.functions) + (["env"] if env else [])
        if not names:
            raise ValueError("nothing scores the samples: set reward.functions and/or reward.models")
        for path in reward_cfg.models:
            if not (Path(models.resolve(path)) / "config.json").exists():
                raise ValueError(f"reward.models: {path} is not a model directory (no config.json)")
        weights = reward_cfg.weights
        if weights is not None and len(weights) != len(names):
            raise ValueError(f"reward.weights has {len(weights)} values for {len(names)} rewards {names} "
                             f"(models first, then functions, then the environment's)")
        self.weights = dict(zip(names, weights if weights is not None else [1.0] * len(names)))
        self.models = {}  # path -> (sharded model, its tokenizer, whether the policy's tokens fit it)

    def add_model(self, path: str, model, tokenizer):
        same = (tokenizer.get_vocab() == self.tokenizer.get_vocab()
                and tokenizer.chat_template == self.tokenizer.chat_template)
        if not same:
            log.info(f"reward model {path}: its tokenizer differs from the policy's; samples are re-tokenized from text")
        self.models[path] = (model, tokenizer, same)

    def score(self, rollout: Rollout):
        """Collective (reward models): ``rollout``'s ``reward_scores``, ``scores`` and ``errors``."""
        per_model = {path: self.model_scores(*rm, rollout) for path, rm in self.models.items()}
        scores, rollout.reward_scores, rollout.errors = [], [], []
        for i in range(len(rollout)):
            by_name, error = {path: values[i] for path, values in per_model.items()}, None
            if rollout.episodes is not None:
                by_name["env"], error = rollout.episodes[i].reward, rollout.episodes[i].error
            for name, fn in self.functions.items():
                by_name[name], failed = rewards.call(fn, rollout.prompts[i], rollout.texts[i], rollout.rows[i])
                if failed is not None and error is None:
                    error = f"reward function {name} {failed} (completion {rollout.texts[i]!r:.80})"
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
        record = {"rollout/score_mean": rollout.scores.mean().item(),
                  "rollout/score_std": rollout.scores.std(unbiased=False).item(),
                  "rollout/response_length": rollout.lengths.sum().item() / n,
                  "rollout/truncated_fraction": sum(r == "length" for r in rollout.finish_reasons) / n,
                  "rollout/empty_fraction": sum(not t.strip() for t in rollout.texts) / n,
                  "rollout/invalid_fraction": sum(e is not None for e in rollout.errors) / n}
        for name in self.weights:
            valid = [s[name] for s in rollout.reward_scores if s[name] is not None]
            if valid:  # no valid score: no mean (the invalid ones are counted in rollout/invalid_fraction)
                record[f"reward/{Path(name).name if name in self.models else name}"] = sum(valid) / len(valid)
        if rollout.episodes is not None:
            record.update(environments.metrics(rollout))
        return record
