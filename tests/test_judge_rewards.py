"""LLM judges as rewards through the trainer (``reward.judges``, rewards.py), against the fake
OpenAI-compatible server of fake_judge.py: each sample's score is the judge's, its counts are
logged summed over ranks, a judge that fails stops the run in one line that names it, and a run
SIGKILLed and resumed is answered from its cache what the killed run was answered, so it ends as
the uninterrupted run ends even where the judge would answer a repeated request differently."""

import json
import threading
from collections import Counter

import pytest

from conftest import make_cfg
from fake_judge import FakeServer, failure, ok
from helpers import metrics, rl_overrides, with_fixed_completions
from kill_points import WALL_CLOCK, run, small_datasets


def graded(seen: Counter | None = None):
    """A judge that scores a completion 1 + len(completion) % 5 (its text between <<< and >>> in
    the template below); with ``seen``, shifted by how often it was asked that before, as a judge
    sampling at a temperature, or batching differently, may answer a repeated request."""
    lock = threading.Lock()

    def reply(body, n):
        content = body["messages"][0]["content"]
        completion = content.split("<<<", 1)[1].rsplit(">>>", 1)[0]
        shift = 0
        if seen is not None:
            with lock:
                shift, seen[content] = seen[content], seen[content] + 1
        return ok(f"Score: {1 + (len(completion) + shift) % 5}")

    return reply


@pytest.fixture
def judge():
    server = FakeServer()
    server.reply = graded()
    yield server
    server.close()


def judged(tmp_path, url, *extra):
    template = tmp_path / "template.txt"
    template.write_text("{prompt}\n<<<{completion}>>>\nScore it from 1 to 5.")
    return [f"reward.judges=[{url}]", "judge.model=fake", f"judge.template={template}", "judge.backoff_s=0.01",
            "judge.timeout_s=5", *extra]


def final_metrics(run_dir):
    """What two runs of one config must agree on: their metrics but wall-clock times, the judge's
    counts and its label (its port differs); its scores are in rollout/score_mean."""
    return [{k: v for k, v in r.items() if not k.startswith(("timing/", "judge/", "reward/judge@"))
             and k not in WALL_CLOCK} for r in metrics(run_dir)]


def test_each_samples_reward_is_the_judges_score_and_the_counts_are_logged(tmp_path, single_process, judge):
    run_dir = tmp_path / "run"
    cfg = make_cfg(*rl_overrides(run_dir, "grpo", "eval_at_end=false", "loss.save_rollouts=true"),
                   *judged(tmp_path, judge.url))
    with_fixed_completions(cfg).train()
    label = f"reward/judge@{judge.url.split('/')[2]}"
    records = [r for r in metrics(run_dir) if "rollout/score_mean" in r]
    assert len(records) == 2
    for step, record in enumerate(records, 1):
        rows = [json.loads(line) for line in (run_dir / "rollouts" / f"step-{step}.jsonl").read_text().splitlines()]
        assert len(rows) == 8
        for row in rows:
            assert row["scores"][judge.url] == (len(row["text"]) % 5) / 4
            assert row["score"] == pytest.approx(row["scores"][judge.url] + row["scores"]["toy_add"], abs=1e-6)
        assert record[label] == pytest.approx(sum(r["scores"][judge.url] for r in rows) / 8)
        assert (record["judge/requests"], record["judge/cache_hits"], record["judge/errors"]) == (8, 0, 0)
        assert record["judge/prompt_tokens"] == 8 * 11 and record["judge/latency_s"] > 0
    assert len(judge.requests) == 16
    assert len(list((run_dir / "judge_cache").rglob("*.json"))) == len(set(map(json.dumps, judge.contents())))


def test_a_failing_judge_stops_the_run_in_one_line_naming_it(tmp_path, single_process, judge):
    judge.reply = lambda body, n: failure(500)
    cfg = make_cfg(*rl_overrides(tmp_path / "run", "grpo", "eval_at_end=false"),
                   *judged(tmp_path, judge.url, "judge.max_retries=1"))
    with pytest.raises(RuntimeError, match=rf"^step 1: 8 of 8 samples have no valid score \(reward.max_invalid_"
                                           rf"fraction=0.5\); first: judge {judge.url}: no reply after 2 attempts "
                                           rf"\({judge.url}\): HTTP 500"):
        with_fixed_completions(cfg).train()
    assert len(judge.requests) == 16  # 8 samples, each tried twice


def test_a_judge_rewarded_run_killed_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    """2 ranks, GRPO with real sampling and a judge that answers a repeated request differently:
    SIGKILLed before its third iteration, with no checkpoint yet, the resumed run asks again what
    the killed run asked, and its cache (run_dir/judge_cache) answers what the judge answered then."""
    (tmp_path / "data").mkdir()
    data = small_datasets(tmp_path / "data")

    def overrides(run_dir, url):
        return [f"run_dir={run_dir}", f"datasets=[{data['prompt']}]", "loss=grpo", "sampler=hf",
                "loss.rollout_batch_size=4", "loss.n_samples_per_prompt=2", "batch_size=4", "n_examples=16",
                "save_every=1000", "n_eval_examples=0", "eval_at_start=false", "eval_at_end=false", "lr=1e-3",
                "warmup_steps=1", "max_length=48", "max_prompt_length=24", "loss.sampling.max_new_tokens=6",
                "loss.sampling.temperature=2.0", "reward.functions=[]", *judged(tmp_path, url)]

    runs = {}
    for name in ("uninterrupted", "killed"):
        server, seen = FakeServer(), Counter()
        server.reply = graded(seen)
        try:
            if name == "killed":
                assert run(tmp_path, overrides(tmp_path / name, server.url), at=(0, 2, "step", 0)).died_of == "SIGKILL"
                asked = len(server.requests)
                done = run(tmp_path, [*overrides(tmp_path / name, server.url), "resume=true"])
                assert asked == 16 and len(server.requests) == 32  # iterations 3 and 4 only: 1 and 2 from the cache
            else:
                done = run(tmp_path, overrides(tmp_path / name, server.url))
            assert done.codes == [None, None], done.output
            assert max(seen.values()) == 1  # the judge was never asked the same thing twice
        finally:
            server.close()
        runs[name] = final_metrics(tmp_path / name)
    assert len(runs["killed"]) == len(runs["uninterrupted"]) == 4
    assert runs["killed"] == runs["uninterrupted"]


def test_a_judge_that_goes_down_mid_run_stops_it_and_the_run_resumes_when_it_is_back(tmp_path, single_process):
    """The judge's server dies after the first iteration: the second iteration's samples all fail,
    the run stops in one line naming the judge and the connection error, its first checkpoint
    intact; with the server back (on the same address) the resumed run ends as a run whose judge
    never failed."""
    def overrides(run_dir, url):
        return [*rl_overrides(run_dir, "grpo", "eval_at_end=false", "n_examples=12", "save_every=4",
                              "reward.functions=[]"), *judged(tmp_path, url, "judge.max_retries=1")]

    steady = FakeServer()
    steady.reply = graded()
    try:
        with_fixed_completions(make_cfg(*overrides(tmp_path / "steady", steady.url))).train()
    finally:
        steady.close()

    server = FakeServer()
    server.reply = graded()
    url, port = server.url, server.http.server_address[1]
    trainer = with_fixed_completions(make_cfg(*overrides(tmp_path / "run", url)))
    step = trainer.train_step

    def judge_dies_after_the_first_iteration():
        if trainer.step == 1:
            server.close()
        return step()

    trainer.train_step = judge_dies_after_the_first_iteration
    with pytest.raises(RuntimeError, match=rf"^step 2: 8 of 8 samples have no valid score .*first: judge {url}: "
                                           rf"no reply after 2 attempts .*APIConnectionError"):
        trainer.train()
    assert [p.name for p in sorted((tmp_path / "run").glob("step-*"))] == ["step-1"]
    back = FakeServer(port)
    back.reply = graded()
    try:
        with_fixed_completions(make_cfg(*overrides(tmp_path / "run", url), "resume=true")).train()
    finally:
        back.close()
    assert len(back.requests) == 16  # iterations 2 and 3; the first was checkpointed

    assert final_metrics(tmp_path / "run") == final_metrics(tmp_path / "steady")
