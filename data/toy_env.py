"""Two multi-turn tasks with their environments (environments.py), small enough for the tiny model:

- ``calculator``: multiply two 2-digit numbers, which a 1M-parameter model cannot do in its head,
  with a calculator tool. A reply ``calc 37*48`` gets the tool's output (``tool``: ``1776``) as the
  next observation; any other reply is the answer and ends the episode (reward 1 if right).
- ``guess_number``: find a secret number in a range from "higher" / "lower" replies, within
  ``bit_length(width)`` guesses (what bisection always needs; reward 1 if found).

Each registers an SFT warm start and prompts (``toy_calc``/``toy_calc_prompts``, ``toy_guess``/
``toy_guess_prompts``). The warm starts teach the format, not the strategy: ``toy_calc`` calls
the tool on a quarter of its first turns and answers directly (a product the model cannot
compute) on the rest; ``toy_guess`` guesses uniformly within what the replies so far allow,
leaning to the low end. What RL from them has to find: always call the tool; guess the middle.
Train and test prompts are disjoint (a hash of the question, as data/toy.py).
"""

from __future__ import annotations

import random
import re

from data import register
from data.toy import _is_test
from environments import Environment, Step

TOOL_FRACTION = 0.25  # of toy_calc's first turns that call the tool
CALL = re.compile(r"^calc (\d{1,4})([*+-])(\d{1,4})$")


# --- calculator -------------------------------------------------------------------------------


def calc_questions(split: str) -> list[str]:
    all_questions = [f"{a}*{b}=" for a in range(10, 100) for b in range(10, 100)]
    mine = [q for q in all_questions if _is_test(q) == (split == "test")]
    random.Random(f"calc-{split}").shuffle(mine)
    return mine


def product(question: str) -> str:
    a, b = question.rstrip("=").split("*")
    return str(int(a) * int(b))


def calculate(expression: str) -> str:
    """The tool: ``a*b``, ``a+b`` or ``a-b`` of integers, else ``error``."""
    found = CALL.match("calc " + expression.strip())
    if not found:
        return "error"
    a, op, b = int(found[1]), found[2], int(found[3])
    return str(a * b if op == "*" else a + b if op == "+" else a - b)


class Calculator(Environment):
    def reset(self, prompt, **row):
        self.answer, self.calls = row["answer"], 0

    def step(self, reply: str) -> Step:
        reply = reply.strip()
        if reply.startswith("calc "):
            self.calls += 1
            return Step(messages=[{"role": "tool", "content": calculate(reply[5:])}], info={"tool_calls": self.calls})
        solved = float(reply == self.answer)
        return Step(reward=solved, done=True, info={"tool_calls": self.calls, "solved": solved})


def calc_sft_rows(split: str) -> list[dict]:
    rng, rows = random.Random(f"calc-sft-{split}"), []
    for q in calc_questions(split):
        ask = [{"role": "user", "content": q}]
        call = "calc " + q.rstrip("=")
        rows.append({"prompt": ask, "response": call if rng.random() < TOOL_FRACTION else product(q)})
        rows.append({"prompt": ask + [{"role": "assistant", "content": call}, {"role": "tool", "content": product(q)}],
                     "response": product(q)})
    return rows


def calc_prompt_rows(split: str) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": q}], "answer": product(q)} for q in calc_questions(split)]


# --- guess the number ------------------------------------------------------------------------


def guess_games(split: str) -> list[tuple[int, int, int]]:
    """(low, high, secret): ranges of 4 to 15 numbers starting at 1 to 30."""
    games = [(lo, lo + w - 1, s) for lo in range(1, 31) for w in range(4, 16) for s in range(lo, lo + w)]
    mine = [g for g in games if _is_test(guess_prompt(g[0], g[1]) + str(g[2])) == (split == "test")]
    random.Random(f"guess-{split}").shuffle(mine)
    return mine


def guess_prompt(lo: int, hi: int) -> str:
    return f"guess {lo}-{hi}"


def guess_budget(lo: int, hi: int) -> int:
    return (hi - lo + 1).bit_length()


class GuessNumber(Environment):
    def reset(self, prompt, **row):
        self.secret, self.left = row["secret"], guess_budget(row["low"], row["high"])

    def step(self, reply: str) -> Step:
        self.left -= 1
        said = reply.strip()
        guess = int(said) if said.isascii() and said.isdigit() else None  # isdigit() alone takes "²"
        if guess == self.secret:
            return Step(reward=1.0, done=True, info={"solved": 1.0})
        if self.left == 0:
            return Step(done=True, info={"solved": 0.0})
        hint = "say a number" if guess is None else "higher" if guess < self.secret else "lower"
        return Step(messages=[{"role": "user", "content": hint}])


def guess_sft_rows(split: str) -> list[dict]:
    """Each turn of a demonstrator's games: a guess drawn within what the hints allow, leaning low."""
    rng, rows = random.Random(f"guess-sft-{split}"), []
    for lo, hi, secret in guess_games(split) * 4:
        conversation, low, high = [{"role": "user", "content": guess_prompt(lo, hi)}], lo, hi
        for _ in range(guess_budget(lo, hi)):
            guess = low + int(rng.random() ** 2 * (high - low + 1))
            rows.append({"prompt": list(conversation), "response": str(guess)})
            if guess == secret:
                break
            hint = "higher" if guess < secret else "lower"
            low, high = (guess + 1, high) if guess < secret else (low, guess - 1)
            conversation += [{"role": "assistant", "content": str(guess)}, {"role": "user", "content": hint}]
    return rows


def guess_prompt_rows(split: str) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": guess_prompt(lo, hi)}], "low": lo, "high": hi, "secret": s}
            for lo, hi, s in guess_games(split)]


ENVIRONMENTS = {"calculator": Calculator, "guess_number": GuessNumber}
TASK_ENVIRONMENTS = {"toy_calc": "calculator", "toy_guess": "guess_number"}  # scripts/eval_task.py --task

register("toy_calc", "sft")(lambda split, path: calc_sft_rows(split))
register("toy_calc_prompts", "prompt")(lambda split, path: calc_prompt_rows(split))
register("toy_guess", "sft")(lambda split, path: guess_sft_rows(split))
register("toy_guess_prompts", "prompt")(lambda split, path: guess_prompt_rows(split))
