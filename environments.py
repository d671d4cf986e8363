"""Multi-turn RL: an environment replies to the policy, the policy acts again, for several turns.

An environment is a class a user writes in a few lines (``env=`` in config.yaml names one of
``ENVIRONMENTS``, ``module:Class`` or ``path/to/file.py:Class``); one instance plays one episode::

    class Guess(Environment):
        def reset(self, prompt, **row):           # the dataset row: its conversation and other fields
            self.secret = row["secret"]           # (return messages to open with instead of ``prompt``)
        def step(self, reply: str) -> Step:       # the policy's reply, decoded
            if int(reply) == self.secret:
                return Step(reward=1.0, done=True)
            return Step(messages=[{"role": "user", "content": "higher" if int(reply) < self.secret else "lower"}])

A tool is a kind of environment: a reply holding a tool call gets the tool's output as the next
observation (a ``tool`` message); any other reply ends the episode (data/toy_env.py's calculator).

``EpisodeRunner.rollout`` plays the episodes of this rank's prompts on the colocated sampler:
all active episodes advance together, one batched ``generate`` per turn; an episode ends when the
environment says ``done`` (finish "stop"), after ``max_turns`` replies (finish "turns"), when a
reply is cut at ``loss.sampling.max_new_tokens`` (finish "length": the cut reply is trained on,
the environment never sees it), when an observation leaves no room for a whole reply of
``max_new_tokens`` within ``max_length`` (finish "length", the observation dropped), or when the
environment fails (finish "error").

Token-in, token-out: an episode's tokens are the prompt's, then each reply's tokens as the
sampler produced them, then each observation's tokens as the chat template renders them after an
assistant turn (``ChatPieces``); the conversation is never re-tokenized. The training sequence
is exactly those tokens, ``mask`` 1 on the replies and 0 on the observations, ``sampler_logps``
the sampler's own log-probs on the replies. ``Episode.drift`` reports whether a re-render of the
final conversation through the chat template gives other tokens (``rollout/template_drift``).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

import torch

import distributed
import rewards
from rollout import Rollout, padded


@dataclass
class Step:
    """The environment's answer to one reply."""
    messages: list[dict] = field(default_factory=list)  # the observation: messages the policy reads next
    reward: float = 0.0                                  # this step's reward (an episode's rewards are summed)
    done: bool = False                                   # the episode ends here (``messages`` unused)
    info: dict = field(default_factory=dict)             # numbers to log (``env/<key>``: the episode's last value,
                                                         # 0 where missing; ``solved``: the task accuracy)


class Environment:
    """One episode. ``reset`` gets the dataset row (``prompt`` and its other fields) and may return
    the opening messages (None: the row's ``prompt``); ``step`` gets each reply's text."""

    def reset(self, prompt: list[dict], **row) -> list[dict] | None:
        return None

    def step(self, reply: str) -> Step:
        raise NotImplementedError


@dataclass
class Episode:
    """What an episode was beyond its tokens (``Rollout.episodes``)."""
    conversation: list[dict]      # the opening messages, then each reply and observation
    reward: float | None          # the environment's rewards summed; None: it failed
    turns: int                    # the policy's replies
    info: dict
    error: str | None             # why the environment failed (the sample scores reward.invalid_score)
    drift: bool | None            # the re-rendered conversation differs from the tokens; None: not checked


def load_environment(spec: str, known: dict[str, type]) -> type:
    """The class ``env=spec`` names: one of ``known`` (the caller's names, e.g. data/toy_env.py's
    ``ENVIRONMENTS``), ``module:Class`` or ``path/to/file.py:Class``."""
    cls = known[spec] if spec in known else rewards.load_object(spec, "environment", known)
    if not isinstance(cls, type):
        raise ValueError(f"env={spec}: {cls!r} is not a class")
    return cls


class ChatPieces:
    """The chat template's tokens around an observation, taken from the template itself: render a
    fixed conversation ending with an assistant turn, render it again with the observation and the
    next assistant turn's opening, and keep the difference. What follows the EOS of the assistant
    turn in the first render (e.g. Qwen's newline) comes first, as the policy does not generate it."""

    BASE = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if not tokenizer.chat_template:
            raise ValueError("env= needs a tokenizer with a chat template: its pieces frame the observations")
        self.base, eos = self.render(self.BASE), tokenizer.eos_token_id
        if eos not in self.base:
            raise ValueError(f"env=: the chat template does not end an assistant turn with the EOS token "
                             f"{tokenizer.eos_token!r}, which ends the policy's replies")
        self.after_reply = self.base[len(self.base) - self.base[::-1].index(eos):]

    def render(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                       tokenize=True, return_dict=False))

    def observation(self, messages: list[dict]) -> list[int]:
        """The tokens after a reply's EOS up to where the next reply starts."""
        full = self.render(self.BASE + messages, generation_prompt=True)
        if full[: len(self.base)] != self.base:
            raise ValueError("the chat template renders the turns before an observation differently once it "
                             "follows: its pieces cannot be appended turn by turn")
        return self.after_reply + full[len(self.base):]


def call_all(calls: list, timeout_s: float) -> list[tuple[object, str | None]]:
    """Run ``calls`` (no-argument functions) each in its own daemon thread, all at once, and wait
    at most ``timeout_s`` in all: ``(result, None)`` or ``(None, why)`` for each. A call still
    running then is abandoned (a daemon thread never keeps the process alive)."""
    results = [(None, f"timed out after {timeout_s:g} s")] * len(calls)

    def run(i, fn):
        try:
            results[i] = (fn(), None)
        except Exception as e:  # a user's environment: one episode's failure must not stop the run
            results[i] = (None, f"raised {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return list(results)


def _checked_messages(messages, what: str) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise TypeError(f"{what} must be a list of {{'role': str, 'content': str}} messages, got {messages!r:.80}")
    return messages


def _checked_step(step) -> Step:
    if not isinstance(step, Step):
        raise TypeError(f"step returned {step!r:.60}, not an environments.Step")
    if not step.done:
        _checked_messages(step.messages, "Step.messages")
        if not step.messages:
            raise TypeError("step returned no messages and done=False: the policy has nothing to answer")
    if not math.isfinite(float(step.reward)):
        raise TypeError(f"step returned reward {step.reward}")
    return step


class _Play:
    """One episode in progress."""

    def __init__(self, example: dict):
        self.example, self.env = example, None
        self.conversation = list(example["prompt"])
        self.prompt_ids = example["prompt_ids"]
        self.tokens, self.mask, self.logps = [], [], []
        self.reward, self.turns, self.info, self.error = 0.0, 0, {}, None
        self.finish, self.last_reply = None, ""

    def add(self, ids: list[int], logps: list[float], policy: bool):
        self.tokens += ids
        self.logps += logps
        self.mask += [1.0 if policy else 0.0] * len(ids)

    def fail(self, why: str):
        self.error, self.finish = f"environment {why} (turn {self.turns})", "error"


class EpisodeRunner:
    """Plays episodes of an environment on a sampler (see the module's docstring)."""

    def __init__(self, env_cls: type, tokenizer, max_turns: int, max_length: int, max_prompt_length: int,
                 timeout_s: float):
        self.env_cls = env_cls
        self.tokenizer, self.pieces = tokenizer, ChatPieces(tokenizer)
        self.max_turns, self.max_length, self.max_prompt_length = max_turns, max_length, max_prompt_length
        self.timeout_s = timeout_s

    def rollout(self, sampler, examples: list[dict], n: int, params):
        """Collective (the sampler's ``generate`` is, under HF and FSDP): ``n`` episodes of each of
        this rank's prompt ``examples``, a prompt's episodes adjacent, as a ``rollout.Rollout`` whose
        ``episodes`` say what happened. ``params`` (``sampler.SamplingParams``) are each turn's, its
        ``seed`` (with the turn) seeding the turn's sampling."""
        plays = [_Play(ex) for ex in examples for _ in range(n)]
        self._reset(plays)
        for turn in range(self.max_turns):
            active = [p for p in plays if p.finish is None]
            # every rank generates as often as the busiest one (HF under FSDP generates in lockstep)
            if int(distributed.all_max([len(active)], distributed.device())[0]) == 0:
                break
            seed = None if params.seed is None else params.seed + 7919 * turn
            outs = sampler.generate([p.prompt_ids + p.tokens for p in active],
                                    dataclasses.replace(params, n=1, seed=seed))
            self._reply(active, [group[0] for group in outs])
            self._step([p for p in active if p.finish is None], params.max_new_tokens, last=turn == self.max_turns - 1)
        for p in plays:
            if p.finish is None:
                p.finish = "turns"
        return self._as_rollout(plays)

    def _reset(self, plays: list[_Play]):
        def reset(p):
            p.env = self.env_cls()
            return p.env.reset(list(p.example["prompt"]), **p.example["row"])

        for p, (opening, error) in zip(plays, call_all([lambda p=p: reset(p) for p in plays], self.timeout_s)):
            if error is None and opening is not None:
                try:
                    p.conversation = list(_checked_messages(opening, "reset's opening messages"))
                    p.prompt_ids = self.pieces.render(p.conversation, generation_prompt=True)
                except Exception as e:
                    error = f"raised {type(e).__name__}: {e}"
                else:
                    if len(p.prompt_ids) > self.max_prompt_length:
                        error = (f"reset opened with {len(p.prompt_ids)} tokens, over "
                                 f"max_prompt_length={self.max_prompt_length}")
            if error is not None:
                p.fail(f"reset {error}")
                p.add([self.tokenizer.eos_token_id], [math.nan], policy=True)  # a sequence needs a token

    def _reply(self, active: list[_Play], samples: list):
        eos = self.tokenizer.eos_token_id
        for p, s in zip(active, samples):
            ids, logps = (list(s.token_ids), list(s.logprobs)) if s.token_ids else ([eos], [math.nan])
            p.add(ids, logps, policy=True)
            p.turns += 1
            p.last_reply = s.text
            p.conversation.append({"role": "assistant", "content": s.text})
            if s.finish_reason == "length":
                p.finish = "length"

    def _step(self, plays: list[_Play], max_new_tokens: int, last: bool):
        for p, (step, error) in zip(plays, call_all([lambda p=p: _checked_step(p.env.step(p.last_reply))
                                                    for p in plays], self.timeout_s)):
            if error is not None:
                p.fail(f"step {error}")
                continue
            p.reward += float(step.reward)
            p.info.update(step.info)
            if step.done:
                p.finish = "stop"
                continue
            if last:  # the observation would only be answered by a reply past max_turns
                p.finish = "turns"
                continue
            obs = self.pieces.observation(step.messages)
            if len(p.prompt_ids) + len(p.tokens) + len(obs) + max_new_tokens > self.max_length:  # no room to reply
                p.finish = "length"  # the conversation ends at the last reply: the policy never sees this observation
                continue
            p.conversation += step.messages
            p.add(obs, [math.nan] * len(obs), policy=False)

    def _as_rollout(self, plays: list[_Play]):
        episodes = [Episode(p.conversation, None if p.error else p.reward, p.turns, p.info, p.error, self._drift(p))
                    for p in plays]
        lengths = torch.tensor([len(p.tokens) for p in plays], dtype=torch.long)
        mask = padded([p.mask for p in plays], torch.float32)
        return Rollout(prompt_ids=[p.prompt_ids for p in plays], tokens=padded([p.tokens for p in plays], torch.long),
                       lengths=lengths, mask=mask,
                       sampler_logps=padded([p.logps for p in plays], torch.float32),
                       texts=[p.last_reply for p in plays], finish_reasons=[p.finish for p in plays],
                       # reward functions read the conversation up to the last reply, and that reply
                       prompts=[p.conversation[:-1] if p.turns else p.conversation for p in plays],
                       rows=[p.example["row"] for p in plays], episodes=episodes)

    def _drift(self, p: _Play) -> bool | None:
        """Whether the chat template renders the final conversation as other tokens than the
        episode's; not checked for an episode cut short (its last reply has no end)."""
        if p.finish not in ("stop", "turns") or p.error:
            return None
        return self.pieces.render(p.conversation) != p.prompt_ids + p.tokens + self.pieces.after_reply
