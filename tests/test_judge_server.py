"""judges.py against a real server: ``vllm serve`` of SmolLM2-135M-Instruct (conftest.judge_server,
started once per test run). The judge's pointwise and pairwise answers equal what the same prompts
give through the openai client directly, read by the formulas written out here; a judge without a
model name finds the server's; GRPO on 2 ranks rewarded by that judge logs its counts;
label_preferences.py --judge <the server> writes pairs. (A 135M model is a poor judge: these check
the plumbing and the arithmetic, not the verdicts.)"""

import math

import openai
import pytest
from omegaconf import OmegaConf

import judges
from conftest import REPO, run_ranks
from helpers import metrics, rl_overrides, rl_run

TEMPLATES = REPO / "config" / "judge" / "templates"
QUESTION = "What is 12 + 30?"
ANSWERS = ["42", "The answer is 41.", "banana", "12 + 30 = 42"]


def judge_cfg(url, **changes):
    node = OmegaConf.load(REPO / "config" / "judge" / "default.yaml")
    node.update({"logprobs": True, "max_tokens": 1, "max_concurrency": 1, **changes})
    return judges.load_config(node, url)


def first_token_probs(url, content: str) -> dict[str, float]:
    """The probability of each first token (spaces stripped, summed) among the top 20, asked directly."""
    with openai.OpenAI(base_url=url, api_key="EMPTY") as client:
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": content}],
                                               temperature=0, max_completion_tokens=1, logprobs=True, top_logprobs=20)
    probs = {}
    for candidate in reply.choices[0].logprobs.content[0].top_logprobs:
        probs[candidate.token.strip()] = probs.get(candidate.token.strip(), 0.0) + math.exp(candidate.logprob)
    return probs


def test_pointwise_scores_are_the_servers_expected_digit(judge_server):
    judge = judges.Judge(judge_cfg(judge_server, template=str(TEMPLATES / "pointwise_digit.txt")))
    assert judge.cfg.model == "smollm2"  # asked the server: judge.model is null
    results = judge.score([{"prompt": QUESTION, "completion": answer} for answer in ANSWERS])
    template = (TEMPLATES / "pointwise_digit.txt").read_text()
    for answer, result in zip(ANSWERS, results):
        probs = first_token_probs(judge_server, template.replace("{prompt}", QUESTION).replace("{completion}", answer))
        on_scale = {int(d): probs[d] for d in "12345" if d in probs}
        expected = sum(s * p for s, p in on_scale.items()) / sum(on_scale.values())
        assert result.error is None and result.score == pytest.approx(expected, abs=1e-4)
        assert result.value == pytest.approx((expected - 1) / 4, abs=1e-4)
    stats = judge.stats()
    assert (stats["judge/requests"], stats["judge/errors"]) == (4, 0) and stats["judge/latency_s"] > 0


def test_pairwise_verdicts_average_the_servers_first_letter_probabilities(judge_server):
    judge = judges.Judge(judge_cfg(judge_server, mode="pairwise", template=str(TEMPLATES / "pairwise_letter.txt")))
    pairs = [{"prompt": QUESTION, "response_a": a, "response_b": b} for a, b in [(ANSWERS[0], ANSWERS[2]),
                                                                                (ANSWERS[1], ANSWERS[3])]]
    template = (TEMPLATES / "pairwise_letter.txt").read_text()

    def p_first(first, second):
        """p(A) / (p(A) + p(B)) of the first token, asked directly."""
        probs = first_token_probs(judge_server, template.replace("{prompt}", QUESTION)
                                  .replace("{response_a}", first).replace("{response_b}", second))
        return probs.get("A", 0.0) / (probs.get("A", 0.0) + probs.get("B", 0.0))

    for pair, result in zip(pairs, judge.compare(pairs)):
        a, b = pair["response_a"], pair["response_b"]
        prob_a = (p_first(a, b) + 1 - p_first(b, a)) / 2
        assert result.error is None and result.prob_a == pytest.approx(prob_a, abs=1e-4)
        assert result.winner == (0 if prob_a > 0.5 else 1)


def test_grpo_rewarded_by_the_served_judge_on_two_ranks(tmp_path, judge_server):
    run_dir = tmp_path / "run"
    overrides = rl_overrides(run_dir, "grpo", "eval_at_end=false", "reward.functions=[]",
                             f"reward.judges=[{judge_server}]", f"judge.template={TEMPLATES / 'pointwise_digit.txt'}",
                             "judge.logprobs=true", "judge.max_tokens=1")
    run_ranks(rl_run, 2, tmp_path, overrides)
    records = [r for r in metrics(run_dir) if "rollout/score_mean" in r]
    label = f"reward/judge@{judge_server.split('/')[2]}"
    assert len(records) == 2
    for record in records:
        assert (record["judge/requests"], record["judge/errors"], record["rollout/invalid_fraction"]) == (8, 0, 0)
        assert 0 < record[label] < 1 and record["judge/latency_s"] > 0 and record["judge/prompt_tokens"] > 8 * 20


def test_label_preferences_asks_the_server(tmp_path, judge_server):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("label_preferences", REPO / "scripts" / "label_preferences.py")
    lp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lp)
    rows = [{"prompt": QUESTION, "response_a": a, "response_b": b, "answer": "42"}
            for a, b in [(ANSWERS[0], ANSWERS[2]), (ANSWERS[3], ANSWERS[1]), (ANSWERS[2], ANSWERS[1])]]
    inp, out = tmp_path / "pairs.jsonl", tmp_path / "labeled.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = lp.main(["--judge", judge_server, "--input", str(inp), "--out", str(out), "--set",
                    f"template={TEMPLATES / 'pairwise_letter.txt'}", "--set", "logprobs=true", "--set", "max_tokens=1"])
    labeled = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and len(labeled) == 3  # from log-probs, only an exact 0.5 is no pair
    for row in labeled:
        assert row["judge_model"] == "smollm2" and 0 <= row["judge_prob_a_better"] <= 1
        assert row["chosen_was"] == ("a" if row["judge_prob_a_better"] > 0.5 else "b")
