"""Rule-based reward functions: the registry, users' own functions, and calling them safely.

A reward function is ``fn(prompt: list[dict], completion: str, **row) -> float``: the conversation
that was sampled from, the completion's text, and the other fields of the dataset row (a toy
prompt row carries its ``answer``). ``reward.functions`` names one from ``FUNCTIONS`` (the toy
verifiers), ``module:function`` for an importable module, or ``path/to/file.py:function``.

A function that raises, or returns something that is not a finite number, does not stop the run
on one sample: the sample's score is ``reward.invalid_score`` and the error is reported (see
``call``); the trainer stops only when more than ``reward.max_invalid_fraction`` of a rollout fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from typing import Callable

from data.toy import REWARDS as FUNCTIONS


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
        module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    found = getattr(module, name, None)
    if not callable(found):
        raise ValueError(f"{what} {spec!r}: {target} has no {what.split()[-1]} {name!r}")
    return found


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
