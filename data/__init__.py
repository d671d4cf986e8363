"""Datasets as plain functions from a split to a list of rows.

Every loader returns rows of one of three shapes; a conversation is a list of
``{"role": "system" | "user" | "assistant" | "tool", "content": str}`` messages that ends with
a user or tool turn (the assistant answers next):

- ``"sft"``:    ``{"prompt": conversation, "response": str}``
- ``"pref"``:   ``{"prompt": conversation, "chosen": str, "rejected": str}``
- ``"prompt"``: ``{"prompt": conversation}`` (toy prompts also carry ``"answer"``)

A row read from a file may carry ``"origin"`` (``"file: row N"``), so that a problem found later,
after splitting or tokenizing, still names the row of the file it came from.

A trainer asks for the shape it consumes; ``load_rows`` converts where that is lossless in
the usual direction (pairs train SFT on the chosen response, as in the DPO repo; any row can
serve as a prompt). Errors name the file, the row and the field, before any compute is spent.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

SHAPES = ("sft", "pref", "prompt")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad input data: the message names where (file, row, field) and what is wrong."""


def where(source: str, row: int | None = None, field: str | None = None) -> str:
    """The place of a problem, e.g. ``data/x.jsonl: row 12: field 'chosen'`` (rows count from 1)."""
    parts = [str(source)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ": ".join(parts)


# name -> (loader, shape). A loader is ``fn(split: str, path: str | None) -> list[dict]``; ``path``
# points at a local copy in the hub's own layout (``data.paths.<name>=...``), None means the hub.
REGISTRY: dict[str, tuple[Callable[..., list[dict]], str]] = {}


def register(name: str, shape: str):
    assert shape in SHAPES, shape

    def wrap(fn):
        REGISTRY[name] = (fn, shape)
        return fn

    return wrap


def check_conversation(messages, source: str, row: int, field: str = "prompt") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where(source, row, field)}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where(source, row, field)}: message {i} needs a role of {'/'.join(ROLES)}, got {m!r:.80}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where(source, row, field)}: message {i} has no string 'content'")
    if messages[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{where(source, row, field)}: the conversation must end with a user (or tool) turn, "
                        f"ends with {messages[-1]['role']!r}")
    return messages


def check_text(value, source: str, row: int, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where(source, row, field)}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where(source, row, field)}: empty")
    return value


def origin(row: dict, source: str, index: int) -> str:
    """Where a row came from: its file and row if the loader recorded them, else its position."""
    return row.get("origin") or where(source, index)


def check_row(row: dict, shape: str, source: str, index: int) -> dict:
    """Validate one row of ``shape``; ``index`` counts from 1 as people do."""
    if not isinstance(row, dict):
        raise DataError(f"{where(source, index)}: expected an object, got {type(row).__name__}")
    if "origin" in row:
        source, index = row["origin"], None
    if "prompt" not in row:
        raise DataError(f"{where(source, index, 'prompt')}: missing")
    check_conversation(row["prompt"], source, index)
    fields = {"sft": ["response"], "pref": ["chosen", "rejected"], "prompt": []}[shape]
    for f in fields:
        if f not in row:
            raise DataError(f"{where(source, index, f)}: missing")
        check_text(row[f], source, index, f)
    if shape == "pref" and row["chosen"] == row["rejected"]:
        raise DataError(f"{where(source, index, 'rejected')}: identical to 'chosen'; such a pair teaches nothing")
    return row


def convert(rows: list[dict], have: str, want: str, source: str) -> list[dict]:
    if have == want:
        return rows
    if want == "prompt":  # every field stays: reward functions and environments read them (**row)
        return rows
    if have == "pref" and want == "sft":
        return [{**{k: v for k, v in r.items() if k not in ("chosen", "rejected")}, "response": r["chosen"]} for r in rows]
    raise DataError(f"{source}: holds {have!r} rows, but this loss needs {want!r} rows")


def check_files(names, keys: dict) -> None:
    """Read and check, row by row, the local files among dataset ``names`` (no tokenizer, no model:
    a second on a large file), so that a bad file stops a run before the slow imports."""
    from data import local

    for name in names if not isinstance(names, str) else []:  # a bare string is refused later
        if os.path.splitext(name)[1].lower() in local.EXTENSIONS:
            local.load_file(name, "train", keys)


def load_rows(name: str, split: str, shape: str, paths: dict | None = None, keys: dict | None = None) -> list[dict]:
    """Rows of ``shape`` from a registered dataset ``name`` or a local .json/.jsonl/.parquet file."""
    from data import hub, local, toy, toy_env  # noqa: F401  (importing registers the loaders)

    if name in REGISTRY:
        fn, have = REGISTRY[name]
        path = (paths or {}).get(name)
        rows, source = fn(split, path), path or name
    elif os.path.splitext(name)[1].lower() in local.EXTENSIONS:
        (rows, have), source = local.load_file(name, split, keys or {}), name
    else:
        known = ", ".join(sorted(REGISTRY))
        raise DataError(f"unknown dataset {name!r}: known are {known}, or a path to a .json/.jsonl/.parquet file")
    if not rows and split == "test":  # e.g. a local file of fewer than local.HOLDOUT rows: train on all of it
        logging.getLogger("train").warning(f"{source}: no {split} rows: nothing of it is evaluated")
        return []
    if not rows:
        raise DataError(f"{source}: split {split!r} is empty")
    for i, r in enumerate(rows, start=1):
        check_row(r, have, source, i)
    return convert(rows, have, shape, source)
