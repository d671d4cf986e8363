"""Score ``scripts/generate.py`` output with a reward function: accuracy, a paired comparison with a
second model's output on the same prompts, and preference pairs from K samples per prompt.

    python scripts/score_samples.py --samples after.jsonl --reward scripts/arithmetic.py:reward \
        [--against before.jsonl] [--label after-grpo] [--show 3]
    python scripts/score_samples.py --samples k4.jsonl --reward ... --pairs-out pairs.jsonl

``--reward`` is any spec ``reward.functions`` takes; it is called with the prompt, the completion's
text and the row's other fields (e.g. ``answer``), and scores >= ``--threshold`` count as correct.
Accuracy is over every completion of every prompt (greedy output: K = 1). ``--against``: McNemar's
paired test on the first completions (evaluation.paired_comparison). ``--pairs-out`` writes, for
each prompt with a correct and an incorrect completion, one DPO row ``{"prompt", "chosen",
"rejected", "answer"}``: the first correct and the first incorrect completion (seed 001's "score K
samples, pair the best with the worst", with a 0/1 verifier in place of the reward model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpointing  # noqa: E402
import rewards  # noqa: E402
from evaluation import paired_comparison  # noqa: E402

NOT_ROW = {"index", "prompt", "completions"}  # generate.py's own fields; the rest are the dataset row's


def scores(path: str, reward_fn, threshold: float) -> tuple[list[dict], list[list[float]]]:
    records = [json.loads(line) for line in open(path) if line.strip()]
    out = []
    for rec in records:
        row = {k: v for k, v in rec.items() if k not in NOT_ROW}
        out.append([])
        for c in rec["completions"]:
            value, why = rewards.call(reward_fn, rec["prompt"], c["text"], row)
            if why is not None:
                raise SystemExit(f"{path}: prompt {rec['index']}: the reward function {why}")
            out[-1].append(float(value >= threshold))
    return records, out


def pairs(records: list[dict], correct: list[list[float]]) -> list[dict]:
    rows = []
    for rec, marks in zip(records, correct):
        good = [c["text"] for c, m in zip(rec["completions"], marks) if m]
        bad = [c["text"] for c, m in zip(rec["completions"], marks) if not m]
        if good and bad:
            extra = {k: v for k, v in rec.items() if k not in NOT_ROW}
            rows.append({"prompt": rec["prompt"], "chosen": good[0], "rejected": bad[0], **extra})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", required=True, help="scripts/generate.py output")
    p.add_argument("--reward", required=True, help="a reward function spec (module:function or file.py:function)")
    p.add_argument("--threshold", type=float, default=1.0, help="a score at least this counts as correct")
    p.add_argument("--against", default=None, help="another model's generate.py output on the same prompts")
    p.add_argument("--label", default=None)
    p.add_argument("--show", type=int, default=0, help="print the first N prompts' first completions")
    p.add_argument("--pairs-out", default=None, help="write DPO pairs (correct vs incorrect completion) here")
    a = p.parse_args()
    reward_fn = rewards.load_function(a.reward)
    records, correct = scores(a.samples, reward_fn, a.threshold)
    n = sum(map(len, correct))
    result = {"model": a.label or a.samples, "prompts": len(records), "completions": n,
              "accuracy": round(sum(map(sum, correct)) / n, 4)}
    if a.against:
        before_records, before = scores(a.against, reward_fn, a.threshold)
        if [r["prompt"] for r in before_records] != [r["prompt"] for r in records]:
            raise SystemExit(f"--against {a.against}: not the same prompts, in the same order, as {a.samples}")
        result.update({"against_accuracy": round(sum(s[0] for s in before) / len(before), 4),
                       **paired_comparison([s[0] for s in before], [s[0] for s in correct])})
    if a.pairs_out:
        rows = pairs(records, correct)
        checkpointing.write_jsonl(a.pairs_out, rows)
        result["pairs"] = len(rows)
    for rec, marks in list(zip(records, correct))[: a.show]:
        print(f"  [{'right' if marks[0] else 'wrong'}] {rec['prompt'][-1]['content']!r} -> "
              f"{rec['completions'][0]['text']!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
