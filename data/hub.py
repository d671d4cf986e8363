"""Public preference and chat datasets, read with ``datasets.load_dataset``.

Every loader reads the files of one split, either from the Hugging Face hub (``path=None``) or
from a local copy in exactly the hub's layout (``path=<directory>``), and runs the same parsing on
both: only the first argument of ``load_dataset`` differs. Rows that are normal for a dataset but
useless as training pairs (identical or empty replies, ...) are skipped and counted in one
warning; rows that do not have the dataset's format raise ``DataError`` naming file, row, field.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from collections import Counter

try:
    import datasets
except ImportError:  # only these loaders need it: toy and local data run without (a bare CUDA machine)
    datasets = None

from data import DataError, check_conversation, check_text, register, where

log = logging.getLogger("train")

HOLDOUT = 20  # single-split datasets: rows with index % 20 == 19 are "test", the rest "train"


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}: expected 'train' or 'test'")
    return split


def _need_datasets(what: str):
    if datasets is None:
        raise DataError(f"{what} is read with the datasets package, which is not installed: pip install datasets")


def _files(hub_id: str, path: str | None, patterns: list[str], builder: str) -> list[tuple[str, datasets.Dataset]]:
    """(source, rows) for the data files matching ``patterns`` (globs in the hub repo's layout).

    The hub resolves the globs in the repo and gives one dataset over all files; a local copy is
    read file by file so that errors name the actual file and its line."""
    _need_datasets(hub_id)
    if path is None:
        return [(f"{hub_id}/{','.join(patterns)}", datasets.load_dataset(hub_id, data_files=patterns, split="train"))]
    if not os.path.isdir(path):
        raise DataError(f"{path}: expected a directory holding a copy of {hub_id} in the hub's layout")
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(path, p))})
    if not files:
        raise DataError(f"{path}: no file matches {patterns}; expected a copy of {hub_id} in the hub's layout")
    return [(f, _load_local(builder, f)) for f in files]


def _load_local(builder: str, file: str) -> datasets.Dataset:
    """One local file through ``datasets``; a JSON-lines file it cannot parse is named with its
    first malformed line (1-based), instead of the library's 0-based row deep in a traceback."""
    try:
        return datasets.load_dataset(builder, data_files=file, split="train")
    except Exception as e:
        if builder == "json":
            opener = gzip.open if file.endswith(".gz") else open
            with opener(file, "rt", encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, start=1):
                    try:
                        line.strip() and json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as bad:
                        raise DataError(f"{file}: line {n}: malformed JSON at column {bad.colno}: {bad.msg}") from None
        raise DataError(f"{file}: {builder} could not read it: {str(e).splitlines()[0]}") from e


def _collect(name: str, split: str, files, parse, keep=lambda i: True) -> list[dict]:
    """Parse every row of every file; ``parse`` returns a row or a reason (str) to skip it.

    All rows are parsed, also those ``keep`` leaves out, so that a malformed row fails both splits."""
    rows, skipped, seen = [], Counter(), 0
    for source, ds in files:
        for i, r in enumerate(ds):
            out = parse(r, source, i + 1)
            if not keep(i):
                continue
            seen += 1
            if isinstance(out, str):
                skipped[out] += 1
            else:
                rows.append({**r, **out, "origin": where(source, i + 1)})  # the other columns reach reward functions
    if skipped:
        reasons = ", ".join(f"{why}: {n}" for why, n in sorted(skipped.items()))
        log.warning("%s %s: skipped %d of %d rows (%s)", name, split, sum(skipped.values()), seen, reasons)
    return rows


def _pair(prompt: list[dict], chosen: str, rejected: str) -> dict | str:
    # identical or empty replies are routine in scraped/annotated pairs and teach nothing: skip, count
    if not chosen.strip() or not rejected.strip():
        return "empty reply"
    if chosen == rejected:
        return "identical replies"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _string(value, source: str, row: int, field: str) -> str:
    # like check_text, but an empty string is data (a skippable pair), not a format error
    if not isinstance(value, str):
        raise DataError(f"{where(source, row, field)}: expected a string, got {type(value).__name__}")
    return value


# --- Anthropic/hh-rlhf -----------------------------------------------------------------------

HH_ID = "Anthropic/hh-rlhf"
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def _hh_turns(text, source: str, row: int, field: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{user: a}, {assistant: b}], contents stripped."""
    parts = HH_TURN.split(_string(text, source, row, field))
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where(source, row, field)}: not a '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript: {text!r:.80}")
    return [{"role": HH_ROLE[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _hh_row(r: dict, source: str, row: int) -> dict | str:
    chosen, rejected = _hh_turns(r.get("chosen"), source, row, "chosen"), _hh_turns(r.get("rejected"), source, row, "rejected")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return "empty reply"  # the transcript stops before the assistant answers
    if chosen[:-1] != rejected[:-1]:
        return "conversations differ before the last reply"  # a few hh pairs diverge earlier
    if len(chosen) < 2 or chosen[-2]["role"] != "user":
        return "no Human turn before the last reply"  # e.g. two Assistant turns in a row
    return _pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


@register("hh", "pref")
def hh(split: str, path: str | None) -> list[dict]:
    """Anthropic/hh-rlhf, the helpful and harmless human preference pairs (Bai et al. 2022).

    Files: ``harmless-base/<split>.jsonl.gz`` and ``helpful-*/<split>.jsonl.gz`` (helpful-base,
    helpful-online, helpful-rejection-sampled), the files the hub's default config loads;
    ``red-team-attempts`` holds transcripts, not pairs, and is not read. Each line is
    ``{"chosen": transcript, "rejected": transcript}`` with transcripts like
    ``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``.

    Each transcript is split at ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` into user / assistant
    messages (contents stripped). The prompt is every turn but the last; the last (assistant)
    turns of chosen and rejected are the chosen and rejected replies. Skipped and counted: pairs
    with an empty or missing final reply, identical final replies, transcripts that differ
    before the final reply, or no Human turn right before it. A transcript that does not start
    with those markers raises DataError.
    """
    split = _split(split)
    files = _files(HH_ID, path, [f"harmless-base/{split}.jsonl.gz", f"helpful-*/{split}.jsonl.gz"], "json")
    return _collect("hh", split, files, _hh_row)


# --- stanfordnlp/SHP --------------------------------------------------------------------------

SHP_ID = "stanfordnlp/SHP"
# Keep only pairs whose more upvoted comment has at least twice the score of the other: the DPO
# repo's SHP filter (and the SteamSHP recipe); closer scores are mostly noise.
SHP_MIN_SCORE_RATIO = 2.0


def _shp_row(r: dict, source: str, row: int) -> dict | str:
    history = check_text(r.get("history"), source, row, "history")
    a, b = _string(r.get("human_ref_A"), source, row, "human_ref_A"), _string(r.get("human_ref_B"), source, row, "human_ref_B")
    label, ratio = r.get("labels"), r.get("score_ratio")
    if label not in (0, 1) or isinstance(label, bool):
        raise DataError(f"{where(source, row, 'labels')}: expected 0 or 1, got {label!r}")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
        raise DataError(f"{where(source, row, 'score_ratio')}: expected a number, got {ratio!r}")
    if ratio < SHP_MIN_SCORE_RATIO:
        return f"score_ratio < {SHP_MIN_SCORE_RATIO}"
    chosen, rejected = (a, b) if label == 1 else (b, a)  # labels == 1: comment A is preferred
    return _pair([{"role": "user", "content": history}], chosen, rejected)


@register("shp", "pref")
def shp(split: str, path: str | None) -> list[dict]:
    """stanfordnlp/SHP, Stanford Human Preferences: pairs of Reddit comments to one post.

    Files: ``<domain>/<split>.json`` (JSON lines; 18 subreddit domains); the hub's validation
    files are not read. Columns used: ``history`` (the post), ``human_ref_A``/``human_ref_B``
    (the comments), ``labels`` (1 if A is preferred, else 0), ``score_ratio``.

    Row: prompt = [user: history], chosen/rejected = the preferred/other comment by ``labels``.
    Pairs with ``score_ratio < SHP_MIN_SCORE_RATIO`` (2) are dropped and counted, as in the DPO
    repo; so are pairs with an empty or identical comment.
    """
    split = _split(split)
    return _collect("shp", split, _files(SHP_ID, path, [f"*/{split}.json"], "json"), _shp_row)


# --- HuggingFaceH4/ultrafeedback_binarized --------------------------------------------------

ULTRAFEEDBACK_ID = "HuggingFaceH4/ultrafeedback_binarized"


def _last_reply(messages, source: str, row: int, field: str) -> tuple[list[dict], str]:
    """A message list -> (the messages before the last, the last one's content, an assistant's)."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where(source, row, field)}: expected a list of messages ending with the assistant's reply")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise DataError(f"{where(source, row, field)}: the last message must be the assistant's, got {last!r:.80}")
    prompt = check_conversation(messages[:-1], source, row, field)
    return [{"role": m["role"], "content": m["content"]} for m in prompt], _string(last.get("content"), source, row, field)


def _ultrafeedback_row(r: dict, source: str, row: int) -> dict | str:
    prompt, chosen = _last_reply(r.get("chosen"), source, row, "chosen")
    other, rejected = _last_reply(r.get("rejected"), source, row, "rejected")
    if other != prompt:
        raise DataError(f"{where(source, row, 'rejected')}: the messages before the reply differ from 'chosen'")
    pair = _pair(prompt, chosen, rejected)
    if isinstance(pair, dict) and r.get("score_chosen") is not None and r.get("score_chosen") == r.get("score_rejected"):
        return "tied scores"  # the binarization keeps ties: no preference to learn
    return pair


@register("ultrafeedback", "pref")
def ultrafeedback(split: str, path: str | None) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized, the Zephyr DPO pairs from UltraFeedback.

    Files: ``data/train_prefs-*.parquet`` for "train", ``data/test_prefs-*.parquet`` for "test"
    (the hub's train_prefs/test_prefs splits; the _sft and _gen splits are not read). Columns
    used: ``chosen`` and ``rejected``, message lists ``[{content, role}, ...]`` that end with the
    assistant's reply.

    Row: prompt = chosen's messages but the last, chosen/rejected = the last message's content
    of each. Pairs with an empty or identical reply, or with tied ``score_chosen`` and
    ``score_rejected`` (the binarization keeps ties), are skipped and counted.
    """
    split = _split(split)
    files = _files(ULTRAFEEDBACK_ID, path, [f"data/{split}_prefs-*.parquet"], "parquet")
    return _collect("ultrafeedback", split, files, _ultrafeedback_row)


# --- ShareGPT (anon8231489123/ShareGPT_Vicuna_unfiltered) --------------------------------------

SHAREGPT_ID = "anon8231489123/ShareGPT_Vicuna_unfiltered"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt_row(r: dict, source: str, row: int) -> dict | str:
    turns = r.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{where(source, row, 'conversations')}: expected a list of turns, got {type(turns).__name__}")
    messages = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise DataError(f"{where(source, row, f'conversations[{j}]')}: expected {{'from': str, 'value': str}}, got {t!r:.80}")
        if t["from"] not in SHAREGPT_ROLE:
            return f"speaker {t['from']!r}"
        messages.append({"role": SHAREGPT_ROLE[t["from"]], "content": t["value"]})
    # the last human turn answered by a non-empty gpt turn; later unanswered turns are dropped
    for j in range(len(messages) - 1, 0, -1):
        if messages[j - 1]["role"] == "user" and messages[j]["role"] == "assistant" and messages[j]["content"].strip():
            return {"prompt": messages[:j], "response": messages[j]["content"]}
    return "no human->gpt pair"


@register("sharegpt", "sft")
def sharegpt(split: str, path: str | None) -> list[dict]:
    """ShareGPT conversations as cleaned for Vicuna (anon8231489123/ShareGPT_Vicuna_unfiltered).

    File: ``ShareGPT_V3_unfiltered_cleaned_split.json``, a JSON list of
    ``{"id", "conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``; ``path``
    may be that file or a directory holding it.

    Row: the last human turn that a non-empty gpt turn answers splits the conversation: prompt
    = every turn up to and including it (human -> user, gpt -> assistant, system -> system),
    response = the gpt turn; later turns are dropped. Conversations without such a pair, or with
    another speaker, are skipped and counted. The data has one split, so conversations whose
    index in the file has index % 20 == 19 are "test", the rest "train".
    """
    split = _split(split)
    if path is not None and os.path.isfile(path):
        _need_datasets(path)
        files = [(path, datasets.load_dataset("json", data_files=path, split="train"))]
    else:
        files = _files(SHAREGPT_ID, path, [SHAREGPT_FILE], "json")
    keep = lambda i: (i % HOLDOUT == HOLDOUT - 1) == (split == "test")  # noqa: E731
    return _collect("sharegpt", split, files, _sharegpt_row, keep)
