"""Synthetic tasks with a verifier, generated deterministically, small enough for a tiny model.

Each task ``toy_X`` registers three datasets and one reward function:

- ``toy_X``         SFT rows: prompt + the correct answer
- ``toy_X_pref``    pairs: the correct answer (chosen) vs a corrupted one (rejected)
- ``toy_X_prompts`` prompts only, each with its ``answer``
- ``REWARDS["toy_X"](prompt, completion) -> float``: 1.0 when the completion is correct. It
  recomputes the answer from the prompt text, so it also scores prompts it never generated.

Train and test prompts are disjoint: a prompt's split is fixed by a hash of its text.
"""

from __future__ import annotations

import hashlib
import random

from data import register

TRAIN_SIZE = 20_000
TEST_SIZE = 2000
SEED = {"train": 1234, "test": 4321}


def _is_test(text: str) -> bool:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10 == 0


# --- the tasks: (make a question from an rng, answer a question, corrupt an answer) ---


def add_question(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)}+{rng.randint(0, 99)}="


def add_answer(question: str) -> str:
    a, b = question.rstrip("=").split("+")
    return str(int(a) + int(b))


def sort_question(rng: random.Random) -> str:
    return "sort " + " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 8)))


def sort_answer(question: str) -> str:
    return " ".join(sorted(question.split()[1:], key=int))


def reverse_question(rng: random.Random) -> str:
    return "reverse " + "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))


def reverse_answer(question: str) -> str:
    return question.split(" ", 1)[1][::-1]


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: one character replaced by another of the same kind, or swapped."""
    chars = list(answer)
    positions = [i for i, c in enumerate(chars) if c != " "]
    i = rng.choice(positions)
    if len(positions) > 1 and rng.random() < 0.3:
        j = rng.choice([p for p in positions if p != i])
        chars[i], chars[j] = chars[j], chars[i]
    pool = "0123456789" if chars[i].isdigit() else "abcdefghij"
    if "".join(chars) == answer:
        chars[i] = rng.choice([c for c in pool if c != chars[i]])
    return "".join(chars)


TASKS = {
    "add": (add_question, add_answer),
    "sort": (sort_question, sort_answer),
    "reverse": (reverse_question, reverse_answer),
}


# Every question of a task with few: the draw below stops once it has them all instead of drawing
# on (toy_add has 10,000 questions, 9,006 outside the test split; 50 x 20,000 draws took 2 s).
ALL_QUESTIONS = {"add": [f"{a}+{b}=" for a in range(100) for b in range(100)]}


def questions(task: str, split: str) -> list[str]:
    make, _ = TASKS[task]
    rng = random.Random(f"{task}-{SEED[split]}")
    want = TRAIN_SIZE if split == "train" else TEST_SIZE
    if task in ALL_QUESTIONS:
        want = min(want, sum(_is_test(q) == (split == "test") for q in ALL_QUESTIONS[task]))
    seen, out = set(), []
    for _ in range(50 * want):  # bounded: small tasks run out of distinct questions
        q = make(rng)
        if q not in seen and _is_test(q) == (split == "test"):
            seen.add(q)
            out.append(q)
            if len(out) == want:
                break
    return out


def prompt_of(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def question_of(prompt: list[dict]) -> str:
    return prompt[-1]["content"]


def sft_rows(task: str, split: str) -> list[dict]:
    answer = TASKS[task][1]
    return [{"prompt": prompt_of(q), "response": answer(q)} for q in questions(task, split)]


def pref_rows(task: str, split: str) -> list[dict]:
    rng = random.Random(f"{task}-pref-{SEED[split]}")
    rows = []
    for row in sft_rows(task, split):
        rejected = corrupt(row["response"], rng)
        rows.append({"prompt": row["prompt"], "chosen": row["response"], "rejected": rejected})
    return rows


def prompt_rows(task: str, split: str) -> list[dict]:
    return [{"prompt": r["prompt"], "answer": r["response"]} for r in sft_rows(task, split)]


def make_reward(task: str):
    answer = TASKS[task][1]

    def reward(prompt: list[dict], completion: str, **row) -> float:
        return float(completion.strip() == answer(question_of(prompt)))

    reward.__name__ = f"toy_{task}"
    return reward


REWARDS = {f"toy_{task}": make_reward(task) for task in TASKS}
VERIFIERS = {}  # dataset name -> the reward function that checks a completion of its prompts

for _task in TASKS:
    # default arguments bind the task now, not at call time
    register(f"toy_{_task}", "sft")(lambda split, path, t=_task: sft_rows(t, split))
    register(f"toy_{_task}_pref", "pref")(lambda split, path, t=_task: pref_rows(t, split))
    register(f"toy_{_task}_prompts", "prompt")(lambda split, path, t=_task: prompt_rows(t, split))
    for _name in (f"toy_{_task}", f"toy_{_task}_pref", f"toy_{_task}_prompts"):
        VERIFIERS[_name] = REWARDS[f"toy_{_task}"]
