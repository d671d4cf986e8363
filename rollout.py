"""A rollout: completions the policy sampled for a batch of prompts, scored, as ``[N, T]`` tensors.

``N`` samples (prompts x ``n_samples_per_prompt``, a prompt's samples adjacent, in prompt order),
``T`` the longest completion. A completion is every token after the prompt; ``mask`` marks the
ones the policy chose and is trained on: all of them up to ``lengths`` for one reply; a multi-turn
episode (environments.py) puts the environment's tokens between the policy's replies with
``mask`` 0 on them, and ``episodes`` says what happened in each. Per-token fields are 0 right of
``lengths`` (``sampler_logps``: NaN where the sampler gave none, e.g. the end-of-turn token an
empty completion trains on, and an environment's tokens).

Each rank builds the rollout of its share of the prompts (``Rollout.of``), scores it (``rewards.Rewards``),
and the shares are concatenated in rank order on every rank (``Rollout.cat``); the trainer then
fills ``old_logps`` ... ``is_weight`` and trains on subsets (``select``) packed by ``sequence``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from data.tokenize import IGNORE

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
    teacher_logps: torch.Tensor | None = None  # [N, T]: on-policy distillation's teacher
    episodes: list | None = None              # multi-turn: what each episode was (environments.Episode)
    versions: torch.Tensor | None = None      # [N] long: the updates done when the weights that sampled it synced

    @staticmethod
    def of(examples: list[dict], completions: list[list], eos_id: int) -> Rollout:
        """From the sampler's completions (``sampler.Sample``s) of each prompt example. A
        completion with no token at all trains on the end-of-turn token alone."""
        flat = [(ex, out) for ex, group in zip(examples, completions) for out in group]
        ids = [list(out.token_ids) or [eos_id] for _, out in flat]
        logps = [list(out.logprobs) if out.token_ids else [math.nan] for _, out in flat]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
        return Rollout(prompt_ids=[ex["prompt_ids"] for ex, _ in flat], tokens=padded(ids, torch.long),
                       lengths=lengths, mask=_mask(lengths), sampler_logps=padded(logps, torch.float32),
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
            if self.versions is not None:
                row["policy_version"] = int(self.versions[i])
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

    def episode_metrics(self, prefix: str = "rollout") -> dict:
        """A multi-turn rollout's episodes: turns, template drift, finish reasons and the environment's
        ``info`` values."""
        episodes, n = self.episodes, max(len(self), 1)
        checked = [e.drift for e in episodes if e.drift is not None]
        record = {f"{prefix}/turns": sum(e.turns for e in episodes) / n,
                  f"{prefix}/policy_tokens": self.mask.sum().item() / n,
                  f"{prefix}/turn_limit_fraction": sum(r == "turns" for r in self.finish_reasons) / n,
                  f"{prefix}/env_error_fraction": sum(e.error is not None for e in episodes) / n}
        if checked:  # drift is measured where an observation followed a reply; none: no mean
            record[f"{prefix}/template_drift"] = sum(checked) / len(checked)
        record.update({f"{prefix}/env/{k}": v for k, v in info_means(episodes).items()})
        return record


def padded(rows: list[list], dtype) -> torch.Tensor:
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


def info_means(episodes: list) -> dict:
    """Each numeric ``info`` key's mean over ``episodes``; an episode cut short has not reported
    what it will: a missing value counts 0."""
    keys = sorted({k for e in episodes for k, v in e.info.items() if isinstance(v, (int, float))})
    return {k: sum(float(e.info.get(k, 0)) for e in episodes) / max(len(episodes), 1) for k in keys}
