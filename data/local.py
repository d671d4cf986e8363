"""Rows from a local .json / .jsonl / .parquet file, with configurable column names.

The shape comes from the first row: chosen and rejected columns -> "pref", a response column ->
"sft", only a prompt column -> "prompt". A prompt is a string (one user message) or a list of
``{role, content}`` messages ending with a user turn; a response/chosen/rejected is a string or a
message list whose last message is the assistant's (its content is taken). Every other column is
kept in the row as it is, for reward functions and environments (``fn(prompt, completion, **row)``).
Every row is checked before anything is returned; errors name the file, the row (the line for JSON lines) and the
column. A file has one split, so rows whose 0-based index has index % 20 == 19 are "test", the
rest "train": a file of fewer than 20 rows has no test rows (the run trains on all of it and
says it evaluates nothing of it).
"""

from __future__ import annotations

import functools
import json
import logging
import os

from data import DataError, check_conversation, check_text, where

log = logging.getLogger("train")
EXTENSIONS = (".json", ".jsonl", ".parquet")  # matched case-insensitively
KEYS = {"prompt_key": "prompt", "response_key": "response", "chosen_key": "chosen", "rejected_key": "rejected"}
HOLDOUT = 20  # rows with index % 20 == 19 are "test"


def _json_lines(path: str, text: str) -> list[tuple[int, object]]:
    records = []
    # split on "\n" only: str.splitlines would also break at U+2028 etc. inside JSON strings
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) are not rows, but still count as lines
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where(path, n)}: malformed JSON at column {e.colno}: {e.msg}") from None
    return records


def _read(path: str, ext: str) -> list[tuple[int, object]]:
    """[(row number as people count it, parsed object)] in file order."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1" and ext != ".parquet":  # parquet's magic bytes: the content decides, not the name
        log.warning(f"{path}: a parquet file named {ext}: read as parquet")
        ext = ".parquet"
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
            raise DataError(f"{path}: not a readable parquet file: {e}") from None
        return list(enumerate(table.to_pylist(), start=1))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is no content
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: line {line}, column {column}: byte 0x{raw[e.start]:02x} is not UTF-8 "
                        f"(save the file as UTF-8)") from None
    if ext == ".json" and text.lstrip().startswith("["):  # a JSON list of objects; else JSON lines
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
    return _json_lines(path, text)


def _reply(value, path: str, n: int, key: str) -> str:
    if isinstance(value, list):  # a message list: its final assistant message is the reply
        last = value[-1] if value else None
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise DataError(f"{where(path, n, key)}: a message list must end with an assistant message, got {last!r:.80}")
        value = last.get("content")
    elif not isinstance(value, str):
        raise DataError(f"{where(path, n, key)}: expected a string or a list of messages, got {type(value).__name__}")
    return check_text(value, path, n, key)


def _row(obj, path: str, n: int, prompt_key: str, fields: dict) -> dict:
    """One record -> a row; ``fields`` maps row fields (response/chosen/rejected) to file columns."""
    if not isinstance(obj, dict):
        raise DataError(f"{where(path, n)}: expected an object, got {type(obj).__name__}")
    for key in (prompt_key, *fields.values()):
        if key not in obj:
            raise DataError(f"{where(path, n, key)}: missing")
    prompt = obj[prompt_key]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": check_text(prompt, path, n, prompt_key)}]
    elif isinstance(prompt, list):
        prompt = [{"role": m["role"], "content": m["content"]} for m in check_conversation(prompt, path, n, prompt_key)]
    else:
        raise DataError(f"{where(path, n, prompt_key)}: expected a string or a list of messages, got {type(prompt).__name__}")
    row = {"prompt": prompt, **{f: _reply(obj[key], path, n, key) for f, key in fields.items()}, "origin": where(path, n)}
    # the other columns go to reward functions and environments as they are (``fn(prompt, completion, **row)``)
    others = {k: v for k, v in obj.items() if k not in (prompt_key, *fields.values())}
    for k in others.keys() & row.keys():
        raise DataError(f"{where(path, n, k)}: the loader makes a field of this name (from another column, or the "
                        f"row's origin), which would hide this column: rename the column")
    row.update(others)
    if "chosen" in row and row["chosen"] == row["rejected"]:
        raise DataError(f"{where(path, n, fields['rejected'])}: identical to {fields['chosen']!r}; such a pair teaches nothing")
    return row


def load_file(path: str, split: str, keys: dict) -> tuple[list[dict], str]:
    """(rows of ``split``, their shape) from a local file; ``keys`` renames columns (see KEYS; a
    key set to None keeps the default name)."""
    unknown = set(keys) - set(KEYS)
    if unknown:
        raise DataError(f"unknown key option(s) {sorted(unknown)}: expected some of {sorted(KEYS)}")
    columns = {**KEYS, **{key: name for key, name in keys.items() if name is not None}}
    if split not in ("train", "test"):
        raise DataError(f"{path}: split {split!r}: expected 'train' or 'test'")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise DataError(f"{path}: unsupported extension {ext!r}; expected one of {', '.join(EXTENSIONS)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    stat = os.stat(path)
    rows, shape = _checked_rows(path, ext, tuple(sorted(columns.items())), stat.st_mtime_ns, stat.st_size)
    test = split == "test"
    return [r for i, r in enumerate(rows) if (i % HOLDOUT == HOLDOUT - 1) == test], shape


@functools.lru_cache(maxsize=4)
def _checked_rows(path: str, ext: str, columns: tuple, mtime_ns: int, size: int) -> tuple[list[dict], str]:
    """Every row of the file, checked, and their shape: read and checked once per process while
    the file is unchanged (train.py checks a file before its slow imports, then the trainer asks
    for each split)."""
    k = dict(columns)
    records = _read(path, ext)
    if not records:
        raise DataError(f"{path}: empty file (no rows)")

    n, first = records[0]
    if not isinstance(first, dict):
        raise DataError(f"{where(path, n)}: expected an object, got {type(first).__name__}")
    if k["chosen_key"] in first or k["rejected_key"] in first:  # one of them alone is an error below
        shape, fields = "pref", {"chosen": k["chosen_key"], "rejected": k["rejected_key"]}
    elif k["response_key"] in first:
        shape, fields = "sft", {"response": k["response_key"]}
    else:
        shape, fields = "prompt", {}
    return [_row(obj, path, n, k["prompt_key"], fields) for n, obj in records], shape
