"""LLM judges over an OpenAI-compatible chat-completions endpoint (a ``vllm serve`` of a model, or a
hosted API): rubric scores of single completions, usable as RL rewards (``mode: pointwise``), and
verdicts on pairs of responses, usable as preference labels (``mode: pairwise``).

    judge = Judge(load_config(OmegaConf.load("config/judge/default.yaml"), "http://127.0.0.1:8000/v1"))
    results = judge.score([{"prompt": messages, "completion": text, "answer": "42"}, ...])
    pairs = judge.compare([{"prompt": messages, "response_a": a, "response_b": b}, ...])
    log(judge.stats())   # judge/requests, judge/retries, judge/cache_hits, ... since the last call

The judge reads one user turn: the template file (config/judge/templates/) with ``{prompt}`` (the
conversation), ``{completion}`` or ``{response_a}`` and ``{response_b}``, and ``{reference}`` (the
row's ``reference``, else its ``answer``) filled in. A pointwise reply ends with ``Score: N``, a
number on the ``score_min..score_max`` scale, normalised to [0, 1]; with ``logprobs: true`` the
score is the expectation of N under the judge's probabilities of the score tokens at that position
instead (a smoother reward than the argmax digit). A pair is judged in both orders, since judges
favour one position: ``Verdict: A``, ``B`` or ``tie`` each time, and the pair has a winner only when
the two orders agree (``combine``).

One sample's failure (a reply with no score, a server that keeps failing or stalling) is that
sample's ``error``, never an exception: the caller gives it ``reward.invalid_score`` as rewards.py
does a failing reward function. Wrong configuration and malformed rows do raise, before any request.

Requests are retried with exponential backoff on what may pass (429, 5xx, a refused or dropped
connection, a timeout), not on what will not (any other 4xx). Each successful reply is stored in
``cache_dir`` under a hash of the request, so a resumed or repeated run gets the same replies, and
so the same scores, without asking again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import openai
from omegaconf import OmegaConf

import overrides

log = logging.getLogger("train")

MODES = ("pointwise", "pairwise")
# what each mode's template must hold; {reference} may be in either
REQUIRED = {"pointwise": ("prompt", "completion"), "pairwise": ("prompt", "response_a", "response_b")}
OPTIONAL = ("reference",)
REFERENCE_FIELDS = ("reference", "answer")  # a row's reference answer, first found
NO_KEY = "EMPTY"  # the openai client needs some key; `vllm serve` without --api-key accepts any
TOP_LOGPROBS = 20  # the most OpenAI's API returns, and vLLM's default --max-logprobs
# an environment variable's name, upper case by convention: a key pasted in its place (lower case
# letters, dashes) is refused
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
CACHE_FORMAT = 1  # in every cache key: a change in what an entry holds must not read old entries

PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
NUMBER = r"(-?\d+(?:\.\d+)?)"
SCORE_LINE = re.compile(r"\bscore\s*[:=]\s*[*\[(]*\s*" + NUMBER, re.IGNORECASE)
BARE_SCORE = re.compile(r"\s*[*\[(]*" + NUMBER + r"[*\])]*\.?\s*")
VERDICT_LINE = re.compile(r"\bverdict\s*[:=]\s*[*\[(\"']*\s*(A|B|tie)\b", re.IGNORECASE)
BARE_VERDICT = re.compile(r"\s*[*\[(\"']*(A|B|tie)[*\])\"']*\.?\s*", re.IGNORECASE)


class JudgeConfigError(ValueError):
    """A judge configuration or template that cannot work; raised before any request."""


class JudgeError(Exception):
    """One sample's failure: the reply could not be had or read. It becomes that sample's error."""


@dataclass
class JudgeConfig:
    """``config/judge/default.yaml``'s keys (the defaults live there, with what each does), and the
    judge's address: ``reward.judges`` lists addresses, ``label_preferences.py --judge`` takes one."""
    base_url: str
    model: Optional[str]  # None: the one model the server serves
    api_key_env: Optional[str]
    mode: str
    template: str
    score_min: int
    score_max: int
    max_concurrency: int
    timeout_s: float
    max_retries: int
    backoff_s: float
    cache_dir: Optional[str]
    temperature: float
    max_tokens: int
    logprobs: bool

    def __post_init__(self):
        if self.api_key_env is not None and not ENV_NAME.fullmatch(self.api_key_env):
            # not echoed: it may be the key itself
            raise JudgeConfigError("judge.api_key_env is not an environment variable's name (A-Z, 0-9, _): it names "
                                   "the variable that holds the key (e.g. OPENAI_API_KEY), never the key itself")
        if self.mode not in MODES:
            raise JudgeConfigError(f"judge.mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.score_min >= self.score_max:
            raise JudgeConfigError(f"judge.score_min={self.score_min} must be below judge.score_max={self.score_max}")
        if self.logprobs and self.mode == "pointwise" and not 0 <= self.score_min < self.score_max <= 9:
            # a score of two digits is two tokens: one position's probabilities cannot weigh it
            raise JudgeConfigError(f"judge.logprobs needs single-digit scores (0..9), not "
                                   f"{self.score_min}..{self.score_max}")
        for key in ("max_concurrency", "max_tokens"):
            if getattr(self, key) < 1:
                raise JudgeConfigError(f"judge.{key}={getattr(self, key)}: expected at least 1")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise JudgeConfigError(f"judge: timeout_s={self.timeout_s} must be positive, max_retries="
                                   f"{self.max_retries} and backoff_s={self.backoff_s} not negative")


def load_config(source, base_url: str) -> JudgeConfig:
    """A ``JudgeConfig`` from a YAML file's path, a dict or an OmegaConf node (``cfg.judge``) and the
    judge's address, its keys and types checked; every mistake is a ``JudgeConfigError`` of one line."""
    node = OmegaConf.load(source) if isinstance(source, (str, Path)) else source
    if "api_key" in node:  # a key in a config file ends up in run_dir/config.yaml and in wandb
        raise JudgeConfigError("judge.api_key: a key is never written in a config; put it in an environment "
                               "variable and name that variable in judge.api_key_env")
    given = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    try:
        return overrides.check_schema({**given, "base_url": base_url}, JudgeConfig, "judge", "an option of the judge")
    except overrides.OverrideError as e:
        raise JudgeConfigError(str(e)) from None


def served_model(base_url: str, api_key: str, timeout_s: float) -> str:
    """The one model a server serves (``GET <base_url>/models``); asked once, before any judging, so
    a wrong address or a server that is down stops the run at its start, in one line."""
    try:
        with openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=2) as client:
            names = [m.id for m in client.models.list()]
    except openai.APIError as e:
        raise JudgeConfigError(f"judge {base_url}: cannot list its models ({describe(e)}); is the server up? "
                               f"(or set judge.model to skip asking)") from None
    if len(names) != 1:
        raise JudgeConfigError(f"judge {base_url} serves {len(names)} models {names[:5]}: set judge.model to one")
    return names[0]


# --- what the judge gets back --------------------------------------------------------------------


@dataclass
class Result:
    """A pointwise judgment: ``value`` in [0, 1] and ``score`` on the template's scale, or ``error``."""
    value: Optional[float]
    score: Optional[float]
    text: Optional[str]  # the judge's reply, when there was one
    error: Optional[str]


@dataclass
class PairResult:
    """A pairwise judgment. The verdicts are as the judge wrote them: with (b, a) shown, "A" names
    response_b. ``winner``: 0 (response_a), 1 (response_b), or None (a tie, the orders disagree,
    or ``error``)."""
    winner: Optional[int]
    ab_verdict: Optional[str]  # "A" | "B" | "tie", with response_a shown first
    ba_verdict: Optional[str]  # the same, with response_b shown first
    disagreement: bool  # each order picked a different response
    texts: tuple  # the two replies (a first, b first); None where there was none
    error: Optional[str]
    prob_a: Optional[float] = None  # with logprobs: (p(A | a first) + p(B | b first)) / 2, which decides


# --- templates -----------------------------------------------------------------------------------


def read_template(path: str, mode: str) -> str:
    """The template's text, checked: the placeholders ``mode`` fills are all there, and no other
    (a misspelt one would reach the judge as literal text)."""
    found_at = next((p for p in (Path(path), Path(__file__).parent / path) if p.is_file()), None)
    if found_at is None:  # (a shipped template's path is from the repository's root, whatever the working directory)
        raise JudgeConfigError(f"judge.template: no file {path}")
    text = found_at.read_text()
    found = set(PLACEHOLDER.findall(text))
    missing = [p for p in REQUIRED[mode] if p not in found]
    unknown = sorted(found - set(REQUIRED[mode]) - set(OPTIONAL))
    if missing or unknown:
        raise JudgeConfigError(f"judge.template {path}: a {mode} template needs {{{'}, {'.join(REQUIRED[mode])}}} "
                               f"and may hold {{reference}}; missing {missing}, unknown {unknown}")
    return text


def render(template: str, fields: dict) -> str:
    """The template with its placeholders filled in one pass: a response that itself holds
    ``{response_b}`` is not filled in again, and other braces (JSON in a template) stay as they are."""
    return PLACEHOLDER.sub(lambda m: fields[m.group(1)] if m.group(1) in fields else m.group(0), template)


def conversation_text(prompt) -> str:
    """A prompt as the judge reads it: a string as is, a conversation as role-labelled turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def reference_of(row: dict) -> Optional[str]:
    for key in REFERENCE_FIELDS:
        if row.get(key) is not None:
            return str(row[key])
    return None


def check_rows(rows: list[dict], keys: tuple, what: str):
    """A malformed row is the caller's bug, not a sample's failure: stop before any request."""
    for i, row in enumerate(rows):
        bad = [k for k in keys if not isinstance(row.get(k), (str, list) if k == "prompt" else str)]
        if bad:
            raise ValueError(f"{what} {i}: {bad} missing, or not text (a prompt may be messages); it has {sorted(row)}")


# --- reading the replies -------------------------------------------------------------------------


def parse_score(text: str, lo: int, hi: int) -> tuple[float, int]:
    """(the score, where its digits start in ``text``): the last ``Score: N``, else a reply that is
    only a number."""
    matches = list(SCORE_LINE.finditer(text)) or [m for m in [BARE_SCORE.fullmatch(text)] if m]
    if not matches:
        raise JudgeError(f"no score in the judge's reply (expected 'Score: N'): {text!r:.120}")
    score = float(matches[-1].group(1))
    if not lo <= score <= hi:
        raise JudgeError(f"score {matches[-1].group(1)} outside the scale {lo}..{hi}: {text!r:.120}")
    return score, matches[-1].start(1)


def score_position(tokens: list[dict], lo: int, hi: int) -> int:
    """The index of the token that holds the score: where the text's ``Score: N`` is, else the first
    token (a judge asked for the digit alone, ``max_tokens: 1``, whose reply may not be one: a small
    model's first token is often "The" with the digits close behind)."""
    text = "".join(t["token"] for t in tokens)  # offsets in the tokens' own text, so they line up
    try:
        score, start = parse_score(text, lo, hi)
    except JudgeError:
        return 0
    offset = 0
    for i, token in enumerate(tokens):
        offset += len(token["token"])
        if offset > start:
            if token["token"].strip() != f"{score:g}":
                raise JudgeError(f"the score {score:g} is not a token of its own ({token['token']!r}): "
                                 f"its probability cannot be read")
            return i
    raise JudgeError(f"the score's position is past the reply's tokens: {text!r:.120}")


def position_probs(token: dict) -> dict[str, float]:
    """The probability of each token among one position's top log-probs (and the sampled token,
    should the top list lack it), by the token's text stripped of spaces, summed."""
    logprobs = {}
    for candidate in [*token["top_logprobs"], token]:
        logprobs.setdefault(candidate["token"], candidate["logprob"])
    probs = {}
    for text, logprob in logprobs.items():
        probs[text.strip()] = probs.get(text.strip(), 0.0) + math.exp(logprob)
    return probs


def expected_score(tokens: list[dict], lo: int, hi: int) -> float:
    """E[score] under the judge's probabilities at the score's position (``score_position``): the
    score tokens ``lo..hi`` among that position's top log-probs (with or without a leading space),
    renormalised over just those."""
    probs = position_probs(tokens[score_position(tokens, lo, hi)])
    mass = {int(t): p for t, p in probs.items() if t.isdigit() and str(int(t)) == t and lo <= int(t) <= hi}
    total = sum(mass.values())
    if not total > 0:
        raise JudgeError(f"no probability on the scores {lo}..{hi} at the score's position")
    return sum(s * p for s, p in mass.items()) / total


def first_letter_prob(tokens: list[dict]) -> float:
    """p(A) / (p(A) + p(B)) of the judge's first token: the probability that the response shown
    first is the better one, read as label_preferences.py reads a local judge (a judge asked for
    the letter alone). A ``JudgeError`` when neither letter is among the top log-probs."""
    probs = position_probs(tokens[0])
    a, b = (probs.get(label, 0.0) for label in LABELS)
    if not a + b > 0:
        raise JudgeError(f"neither A nor B among the judge's most likely first tokens {sorted(probs)[:8]}")
    return a / (a + b)


def score_reply(reply: dict, cfg: JudgeConfig) -> float:
    """The reply's score on the template's scale: the expectation when the server sent log-probs
    that were asked for, else the number in the text."""
    if cfg.logprobs and reply["logprobs"]:
        return expected_score(reply["logprobs"], cfg.score_min, cfg.score_max)
    return parse_score(reply["text"], cfg.score_min, cfg.score_max)[0]


def parse_verdict(text: str) -> str:
    """"A", "B" or "tie": the last ``Verdict: ...``, else a reply that is only the verdict."""
    matches = list(VERDICT_LINE.finditer(text)) or [m for m in [BARE_VERDICT.fullmatch(text)] if m]
    if not matches:
        raise JudgeError(f"no verdict in the judge's reply (expected 'Verdict: A', 'B' or 'tie'): {text!r:.120}")
    found = matches[-1].group(1)
    return "tie" if found.lower() == "tie" else found.upper()


def combine(ab: str, ba: str) -> tuple[Optional[int], bool]:
    """(winner, disagreement) from the verdict with a first and the one with b first. A winner
    needs both orders to pick it: a pick that flips with the order is the judge's position bias,
    not a preference, and a tie in either order is no preference either."""
    if "tie" in (ab, ba):
        return None, False
    first = 0 if ab == "A" else 1
    second = 1 if ba == "A" else 0
    return (first, False) if first == second else (None, True)


# --- a local judge: a model's next-token log-probs of "A" and "B" (label_preferences.py, online DPO's
# self-judged pairs), read through a sampler's choice_logprobs ------------------------------------

PRINCIPLE = "Choose the response that is more helpful, honest and harmless."
QUESTION = "Which response is better? Answer A or B."
LABELS = ("A", "B")


def judge_messages(principle: str, conversation: list[dict], first: str, second: str,
                   reference: str | None = None) -> list[dict]:
    """One user turn (every chat template has one; not all take a system turn)."""
    transcript = conversation_text(conversation)
    yardstick = ("" if reference is None else
                 f"[Reference answer, a yardstick: not the only right reply]\n{reference}\n\n")
    text = (f"Compare two responses of an AI assistant to the conversation below, judging them by this principle:\n"
            f"{principle}\n\n[Conversation]\n{transcript}\n\n{yardstick}[Response A]\n{first}\n\n"
            f"[Response B]\n{second}\n\n{QUESTION}")
    return [{"role": "user", "content": text}]


def choice_ids(tokenizer) -> list[int]:
    """The token ids of the answers "A" and "B" as the judge's reply would begin: right after the
    chat template's assistant header, or after the plain format's "Assistant:" (" A")."""
    ids = []
    for label in LABELS:
        text = label if tokenizer.chat_template else " " + label
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"the judge's tokenizer splits {text!r} into {len(tokens)} tokens {tokens}: "
                             f"its answer cannot be read from one next-token distribution")
        ids.append(tokens[0])
    return ids


def two_way(logps: list[float]) -> float:
    """p(first choice) under a softmax over just the two choices."""
    first, second = logps
    return 1 / (1 + math.exp(second - first))


def decide(p_a_first: float, p_a_second: float, min_confidence: float = 0.5) -> tuple[str, float]:
    """(verdict, P(a better)): verdict "a" or "b" (the better one), "tie" when P is exactly 0.5
    (nothing to learn, and no side to pick without a bias), "unsure" when P(chosen better) is
    below ``min_confidence``."""
    p = (p_a_first + p_a_second) / 2
    if p == 0.5:
        return "tie", p
    if max(p, 1 - p) < min_confidence:
        return "unsure", p
    return ("a" if p > 0.5 else "b"), p



# --- the disk cache ------------------------------------------------------------------------------


def cache_key(request: dict) -> str:
    """The hash of everything that decides the reply: model, messages, sampling parameters. Not the
    server's URL, so that a judge served from another host or port still finds its replies."""
    canonical = json.dumps({"format": CACHE_FORMAT, **request}, sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Cache:
    """One JSON file per request, ``<dir>/<key[:2]>/<key>.json``, each written whole or not at all."""

    def __init__(self, directory: str):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, request: dict) -> Optional[dict]:
        path = self.path(cache_key(request))
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # not written by put (which never leaves half a file): ask again
            log.warning(f"judge cache: unreadable entry {path} ({e}); asking the judge again")
            return None
        return entry["reply"] if entry.get("request") == request else None  # a hash collision: a miss

    def put(self, request: dict, reply: dict):
        """Written to a temporary file beside the entry, then renamed over it: a run killed
        mid-write leaves a stray temporary file, never a truncated entry."""
        path = self.path(cache_key(request))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"request": request, "reply": reply}, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# --- counts for the trainer's log ----------------------------------------------------------------


class Stats:
    """Counts since the last ``read``; a lock, since a trainer may read them from another thread."""

    COUNTS = ("requests", "retries", "cache_hits", "errors", "order_disagreements", "logprobs_missing",
              "prompt_tokens", "completion_tokens")

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.counts = dict.fromkeys(self.COUNTS, 0)
        self.latencies = []

    def add(self, **counts):
        with self.lock:
            for name, n in counts.items():
                self.counts[name] += n

    def latency(self, seconds: float):
        with self.lock:
            self.latencies.append(seconds)

    def read(self) -> dict:
        """``judge/<count>``, and ``judge/latency_s`` (mean seconds per request that reached the
        server, retries and backoff included) when there was one; then all start again from 0."""
        with self.lock:
            out = {f"judge/{name}": n for name, n in self.counts.items()}
            if self.latencies:
                out["judge/latency_s"] = sum(self.latencies) / len(self.latencies)
            self.reset()
        return out


# --- the client ----------------------------------------------------------------------------------


def retryable(e: BaseException) -> bool:
    """A failure that may pass: overload (429), a server error, no connection, a timeout."""
    if isinstance(e, openai.APIStatusError):
        return e.status_code == 429 or e.status_code >= 500
    return isinstance(e, (openai.APIConnectionError, asyncio.TimeoutError))


def describe(e: BaseException) -> str:
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}: {str(e.message)[:200]}"
    if isinstance(e, (asyncio.TimeoutError, openai.APITimeoutError)):
        return "timed out"
    return f"{type(e).__name__}: {str(e)[:200]}"


def reply_of(completion) -> dict:
    """What the cache stores and the parsers read: the text and, when sent, the log-probs as plain
    data (the same whether the reply came from the server or from the cache)."""
    choices = getattr(completion, "choices", None)
    if not choices or not isinstance(choices[0].message.content, str):
        raise JudgeError(f"the server's answer has no reply text: {str(completion)[:200]}")
    content = choices[0].logprobs.content if choices[0].logprobs is not None else None
    logprobs = None if not content else [
        {"token": t.token, "logprob": t.logprob,
         "top_logprobs": [{"token": c.token, "logprob": c.logprob} for c in t.top_logprobs or []]}
        for t in content]
    return {"text": choices[0].message.content, "logprobs": logprobs}


class Judge:
    """A judge endpoint for a trainer: ``score(rows)`` and ``compare(pairs)`` are synchronous and
    run their own event loop, client and connections for the call, and close them before they
    return (so a call from any thread without a running event loop works, and nothing outlives it);
    ``ascore`` and ``acompare`` are the same for a caller already in an event loop.
    ``max_concurrency`` bounds the requests in flight of one call."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        self.template = read_template(cfg.template, cfg.mode)
        self.api_key = self.read_key(cfg.api_key_env)
        if cfg.model is None:
            self.cfg = cfg = dataclasses.replace(cfg, model=served_model(cfg.base_url, self.api_key, cfg.timeout_s))
        self.cache = Cache(cfg.cache_dir) if cfg.cache_dir is not None else None
        self._stats = Stats()

    @staticmethod
    def read_key(env: Optional[str]) -> str:
        if env is None:
            return NO_KEY
        if not os.environ.get(env):
            raise JudgeConfigError(f"judge.api_key_env={env}: the environment variable {env} is not set "
                                   f"(or set judge.api_key_env=null for a server that takes no key)")
        return os.environ[env]

    def stats(self) -> dict:
        """Counts since the last call (for the trainer's per-step log), then reset."""
        return self._stats.read()

    # -- synchronous API --

    def score(self, rows: list[dict]) -> list[Result]:
        """Pointwise: one ``Result`` per row ``{"prompt", "completion"[, "reference" | "answer"]}``."""
        return self._run(self.ascore(rows))

    def compare(self, pairs: list[dict]) -> list[PairResult]:
        """Pairwise: one ``PairResult`` per row ``{"prompt", "response_a", "response_b"[, "reference" | "answer"]}``."""
        return self._run(self.acompare(pairs))

    @staticmethod
    def _run(coroutine):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine)  # a new loop, closed (with its executor) before it returns
        coroutine.close()
        raise RuntimeError("Judge.score/compare run an event loop of their own; this thread is already "
                           "running one: await Judge.ascore/acompare instead")

    # -- asynchronous API --

    async def ascore(self, rows: list[dict]) -> list[Result]:
        self._check_mode("pointwise", "score")
        check_rows(rows, ("prompt", "completion"), "row")
        async with _Session(self) as ask:
            results = await asyncio.gather(*(self._score_one(ask, row) for row in rows))
        self._stats.add(errors=sum(r.error is not None for r in results))
        return results

    async def acompare(self, pairs: list[dict]) -> list[PairResult]:
        self._check_mode("pairwise", "compare")
        check_rows(pairs, ("prompt", "response_a", "response_b"), "pair")
        async with _Session(self) as ask:
            results = await asyncio.gather(*(self._compare_one(ask, pair) for pair in pairs))
        self._stats.add(errors=sum(r.error is not None for r in results),
                        order_disagreements=sum(r.disagreement for r in results))
        return results

    def _check_mode(self, mode: str, method: str):
        if self.cfg.mode != mode:
            raise JudgeConfigError(f"Judge.{method} needs judge.mode={mode} (and its template); this judge is "
                                   f"{self.cfg.mode}")

    async def _score_one(self, ask, row: dict) -> Result:
        reply = None
        try:
            reply = await ask(self.messages(row, completion=row["completion"]))
            if self.cfg.logprobs and not reply["logprobs"]:  # scored from the text instead: say so in the log
                self._stats.add(logprobs_missing=1)
            score = score_reply(reply, self.cfg)
        except JudgeError as e:
            return Result(None, None, reply["text"] if reply else None, str(e))
        value = (score - self.cfg.score_min) / (self.cfg.score_max - self.cfg.score_min)
        return Result(value, score, reply["text"], None)

    async def _compare_one(self, ask, pair: dict) -> PairResult:
        """Both orders. From text, the verdicts must agree (``combine``); from log-probs, the
        probability that a is better averaged over the orders decides, which cancels the judge's
        position bias as label_preferences.py does (a tie only at exactly 0.5)."""
        orders = ((pair["response_a"], pair["response_b"]), (pair["response_b"], pair["response_a"]))
        outcomes = await asyncio.gather(*(self._verdict(ask, pair, first, second) for first, second in orders))
        (ab, ab_text, ab_error, ab_prob), (ba, ba_text, ba_error, ba_prob) = outcomes
        texts = (ab_text, ba_text)
        errors = [f"{order} first: {e}" for order, e in (("a", ab_error), ("b", ba_error)) if e is not None]
        if errors:
            return PairResult(None, ab, ba, False, texts, "; ".join(errors))
        winner, disagreement = combine(ab, ba)
        if ab_prob is None or ba_prob is None:
            return PairResult(winner, ab, ba, disagreement, texts, None)
        verdict, prob_a = decide(ab_prob, 1 - ba_prob)
        return PairResult({"a": 0, "b": 1}.get(verdict), ab, ba, disagreement, texts, None, prob_a)

    async def _verdict(self, ask, pair: dict, first: str, second: str):
        """(verdict, reply text, error, p(the first shown is better) or None) of one order."""
        reply = None
        try:
            reply = await ask(self.messages(pair, response_a=first, response_b=second))
            if self.cfg.logprobs and reply["logprobs"]:
                p = first_letter_prob(reply["logprobs"])
                return ("A" if p > 0.5 else "B" if p < 0.5 else "tie"), reply["text"], None, p
            if self.cfg.logprobs:
                self._stats.add(logprobs_missing=1)
            return parse_verdict(reply["text"]), reply["text"], None, None
        except JudgeError as e:
            return None, reply["text"] if reply else None, str(e), None

    def messages(self, row: dict, **fields) -> list[dict]:
        """What the judge is sent for ``row``, with ``fields`` (the completion, or the responses in
        their order) filled in."""
        fields["prompt"] = conversation_text(row["prompt"])
        if "{reference}" in self.template:
            fields["reference"] = reference_of(row)
            if fields["reference"] is None:
                raise JudgeError(f"the template asks for {{reference}}, and the row has no "
                                 f"{' or '.join(REFERENCE_FIELDS)} (has {sorted(row)})")
        # one user turn: every chat template has one, not all take a system turn
        return [{"role": "user", "content": render(self.template, fields)}]

    def request(self, messages: list[dict]) -> dict:
        """The chat-completions request body, all of it (the cache key hashes it)."""
        body = {"model": self.cfg.model, "messages": messages, "temperature": self.cfg.temperature,
                "max_completion_tokens": self.cfg.max_tokens}
        if self.cfg.logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def backoff(self, attempt: int) -> float:
        """Exponential, with jitter: requests that failed together (one 429 burst) do not all come
        back at the same moment."""
        return self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)


class _Session:
    """One call's client, connections and concurrency limit; ``ask(messages)`` -> the reply."""

    def __init__(self, judge: Judge):
        self.judge, self.cfg = judge, judge.cfg

    async def __aenter__(self):
        # retries are ours (counted, and only on what may pass), so the client's own are off
        self.client = openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self.judge.api_key,
                                         timeout=self.cfg.timeout_s, max_retries=0)
        self.slots = asyncio.Semaphore(self.cfg.max_concurrency)
        return self.ask

    async def __aexit__(self, *exc):
        await self.client.close()

    async def ask(self, messages: list[dict]) -> dict:
        request = self.judge.request(messages)
        cache, stats = self.judge.cache, self.judge._stats
        cached = cache.get(request) if cache is not None else None
        if cached is not None:
            stats.add(cache_hits=1)
            return cached
        stats.add(requests=1)
        start = time.perf_counter()
        try:
            reply = await self.send(request)
        finally:
            stats.latency(time.perf_counter() - start)
        if cache is not None:
            try:
                cache.put(request, reply)
            except OSError as e:  # the reply is good; only a later run loses it
                log.warning(f"judge cache: could not write an entry under {cache.dir}: {e}")
        return reply

    async def send(self, request: dict) -> dict:
        """The reply, after up to ``max_retries`` retries of what may pass; else ``JudgeError``."""
        stats, failures = self.judge._stats, []
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                stats.add(retries=1)
                await asyncio.sleep(self.judge.backoff(attempt))  # not holding a slot
            try:
                async with self.slots:
                    # the client's timeout bounds each read; this bounds the whole request
                    completion = await asyncio.wait_for(self.client.chat.completions.create(**request),
                                                        self.cfg.timeout_s)
            except (openai.APIError, asyncio.TimeoutError) as e:
                failures.append(describe(e))
                if not retryable(e):
                    raise JudgeError(f"the judge request failed, and would again: {failures[-1]}") from None
                continue
            usage = getattr(completion, "usage", None)
            stats.add(prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
                      completion_tokens=getattr(usage, "completion_tokens", None) or 0)
            return reply_of(completion)
        raise JudgeError(f"no reply after {len(failures)} attempts ({self.cfg.base_url}): "
                         f"{'; '.join(dict.fromkeys(failures))}")

