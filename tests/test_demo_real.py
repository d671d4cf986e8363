"""The real-model demo's pieces that run without a model: the arithmetic prompts and their held-out
split, the reward, and score_samples.py's accuracy, paired test and pairs (scripts/demo_real.sh)."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from data import load_rows

sys.path.insert(0, str(REPO / "scripts"))
import arithmetic  # noqa: E402


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("arith") / "prompts.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "arithmetic.py"), "--out", str(path), "--n-test", "50"],
                   check=True, capture_output=True)
    return path


def solve(question: str) -> tuple[str, int]:
    """The operation and the answer, from the question's words (apart from arithmetic.py's generator)."""
    a, b = map(int, re.findall(r"\d+", question))
    if "Subtract" in question or "take" in question:
        b, a = a, b  # "Subtract b from a", "take b away from a"
    if any(w in question for w in ("+", "plus", "Add", "sum", "add")):
        return "+", a + b
    if any(w in question for w in ("-", "minus", "Subtract", "difference", "take")):
        return "-", a - b
    assert any(w in question for w in ("*", " x ", "times", "Multiply", "product", "multiply")), question
    return "*", a * b


def test_held_out_prompts_are_the_local_files_test_split_and_never_trained_on(prompts):
    train = load_rows(str(prompts), "train", "prompt")
    test = load_rows(str(prompts), "test", "prompt")
    assert len(test) == 50 and len(train) == 19 * 50
    text = lambda rows: [r["prompt"][-1]["content"] for r in rows]  # noqa: E731
    assert not set(text(train)) & set(text(test))
    assert len(set(text(train))) == len(train) and len(set(text(test))) == len(test)
    ops = set()
    for row in train + test:  # the answer column is the question's answer
        op, value = solve(row["prompt"][-1]["content"])
        assert int(row["answer"]) == value >= 0
        ops.add(op)
    assert ops == {"+", "-", "*"}


def test_reward_reads_the_last_integer_of_the_reply():
    prompt = [{"role": "user", "content": "What is 12 + 7?"}]
    assert arithmetic.reward(prompt, "12 + 7 = 19", answer="19") == 1.0
    assert arithmetic.reward(prompt, "The answer is 19.", answer="19") == 1.0
    assert arithmetic.reward(prompt, "12 + 7 = 19. This is a classic example of 2 numbers", answer="19") == 0.0
    assert arithmetic.reward(prompt, "12 + 7 = 9", answer="19") == 0.0
    assert arithmetic.reward(prompt, "nineteen", answer="19") == 0.0
    assert arithmetic.reward(prompt, "1,019", answer="1019") == 1.0


def write_samples(path, texts: list[list[str]], answers: list[str]):
    with open(path, "w") as f:
        for i, (group, answer) in enumerate(zip(texts, answers)):
            f.write(json.dumps({"index": i, "prompt": [{"role": "user", "content": f"q{i}"}], "answer": answer,
                                "completions": [{"text": t, "token_ids": [], "logprobs": [], "finish_reason": "stop"}
                                                for t in group]}) + "\n")


def test_score_samples_paired_test_and_pairs_counted_by_hand(tmp_path):
    answers = ["1", "2", "3", "4", "5"]
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    write_samples(before, [["1"], ["0"], ["0"], ["4"], ["0"]], answers)  # right: 0, 3
    write_samples(after, [["1"], ["2"], ["3"], ["0"], ["0"]], answers)   # right: 0, 1, 2
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "scripts" / "score_samples.py"),  # noqa: E731
                                     "--reward", "scripts/arithmetic.py:reward", *a], cwd=REPO, check=True,
                                    capture_output=True, text=True).stdout.splitlines()[-1]
    result = json.loads(run("--samples", str(after), "--against", str(before)))
    # fixed: prompts 1 and 2; broken: prompt 3; z = (2 - 1) / sqrt(3)
    assert (result["accuracy"], result["against_accuracy"]) == (0.6, 0.4)
    assert (result["fixed"], result["broken"]) == (2, 1) and result["mcnemar_z"] == round(1 / 3 ** 0.5, 2)

    k = tmp_path / "k.jsonl"
    write_samples(k, [["1", "7", "1"], ["9", "8"], ["3", "3"], ["5", "4", "6"]], answers[:4])
    result = json.loads(run("--samples", str(k), "--pairs-out", str(tmp_path / "pairs.jsonl")))
    assert result["accuracy"] == 5 / 10  # 2 + 0 + 2 + 1 right of 10
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    # only prompts with a right and a wrong reply give a pair: the first right vs the first wrong
    assert [(p["prompt"][0]["content"], p["chosen"], p["rejected"], p["answer"]) for p in pairs] == [
        ("q0", "1", "7", "1"), ("q3", "4", "5", "4")]


def test_bench_real_reads_each_steps_own_tokens_from_cumulative_counts():
    """metrics.jsonl's ``tokens`` is a running total; bench_real's rates need each step's own."""
    import bench_real

    records = [{"step": 1, "tokens": 100}, {"step": 2, "tokens": 250}, {"step": 3, "tokens": 420}]
    assert [(r["step"], r["tokens"]) for r in bench_real._per_step(records)] == [(2, 150), (3, 170)]
