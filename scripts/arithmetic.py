"""The real-model demo's task: small arithmetic questions with an exact answer, as a user brings them
(a JSONL of prompts with an ``answer`` column, and a reward function in a file).

    python scripts/arithmetic.py --out runs/demo_real/prompts.jsonl
    train.py ... datasets=[runs/demo_real/prompts.jsonl] reward.functions=[scripts/arithmetic.py:reward]

A question adds or subtracts two numbers up to 30, or multiplies two up to 12, in one of eight
wordings ("What is 12 + 7?", "Subtract 7 from 12.", "What is the product of 4 and 9?", ...). The file follows the local-file convention (data/local.py): row i is
held out ("test") when i % 20 == 19. The held-out rows are drawn from questions whose text hashes
to the test side, the others from the rest, so no held-out prompt is ever trained on. SmolLM2-135M-Instruct gets about a quarter right at first: it often
talks on past its answer ("12 + 7 = 19. This is a classic example of ...") or gets the sum wrong.

``reward`` reads the last integer of the completion: the answer must be the last number the model
writes, so a reply that says the right number and then keeps going with others scores 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

WORDINGS = {
    "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "Calculate {a} + {b}.",
          "{a} + {b} = ?", "What is the sum of {a} and {b}?", "What do you get when you add {a} and {b}?"],
    "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.",
          "Calculate {a} - {b}.", "{a} - {b} = ?", "What is the difference between {a} and {b}?",
          "What do you get when you take {b} away from {a}?"],
    "*": ["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "Compute {a} * {b}.",
          "Calculate {a} x {b}.", "{a} * {b} = ?", "What is the product of {a} and {b}?",
          "What do you get when you multiply {a} by {b}?"],
}
N_TEST = 500  # held-out prompts; the file has 19 training rows for each


def question(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(1, 30), rng.randint(1, 30))
    if op == "-" and a < b:
        a, b = b, a
    return rng.choice(WORDINGS[op]).format(a=a, b=b), {"+": a + b, "-": a - b, "*": a * b}[op]


def is_test(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10 == 0


def rows(split: str, n: int) -> list[dict]:
    rng, seen, out = random.Random(f"arithmetic-{split}"), set(), []
    while len(out) < n:
        text, answer = question(rng)
        if text not in seen and is_test(text) == (split == "test"):
            seen.add(text)
            out.append({"prompt": [{"role": "user", "content": text}], "answer": str(answer)})
    return out


def interleaved(n_test: int) -> list[dict]:
    """19 training rows, then a held-out one, n_test times (data/local.py's split)."""
    train, test = rows("train", 19 * n_test), rows("test", n_test)
    return [r for i in range(n_test) for r in (*train[19 * i: 19 * (i + 1)], test[i])]


def last_integer(text: str) -> int | None:
    found = re.findall(r"-?\d+", text.replace(",", ""))
    return int(found[-1]) if found else None


def reward(prompt: list[dict], completion: str, answer: str, **row) -> float:
    """1.0 when the last integer in the completion is the answer, else 0.0."""
    return float(last_integer(completion) == int(answer))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--n-test", type=int, default=N_TEST, help="held-out prompts (x 20 rows in all)")
    a = p.parse_args()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in interleaved(a.n_test))
    print(f"{19 * a.n_test} training and {a.n_test} held-out prompts -> {a.out}")


if __name__ == "__main__":
    main()
