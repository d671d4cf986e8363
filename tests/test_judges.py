"""judges.py against a fake OpenAI-compatible server started here: a ``ThreadingHTTPServer`` on a
free port of 127.0.0.1 answering POST /v1/chat/completions with what each test scripts (a reply,
an error status, a stall, log-probs in OpenAI's format); it records every request and the most
requests it held at once. The real client (``openai.AsyncOpenAI``) talks to it over HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from pathlib import Path

import openai
import pytest
from omegaconf import OmegaConf

import judges
from conftest import REPO
from fake_judge import FakeServer, failure, ok
from judges import Judge, JudgeConfig, JudgeConfigError, PairResult, Result

TEMPLATES = REPO / "config" / "judge" / "templates"
DEFAULT_YAML = REPO / "config" / "judge" / "default.yaml"


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def config(server, **changes) -> JudgeConfig:
    """Small timeouts and backoffs: the file runs in seconds."""
    base = dict(base_url=server.url, model="judge-model", api_key_env=None, mode="pointwise",
                template=str(TEMPLATES / "pointwise_rubric.txt"), score_min=1, score_max=5, max_concurrency=4,
                timeout_s=2.0, max_retries=2, backoff_s=0.01, cache_dir=None, temperature=0.0, max_tokens=64,
                logprobs=False)
    return JudgeConfig(**{**base, **changes})


def row(completion: str, **extra) -> dict:
    return {"prompt": [{"role": "user", "content": "What is 2+2?"}], "completion": completion, **extra}


def by_completion(replies: dict):
    """A judge that answers each completion (a marker no template holds, found in the rendered
    prompt) with its own reply."""
    def reply(body, n):
        content = body["messages"][0]["content"]
        return next(ok(text) for key, text in replies.items() if key in content)
    return reply


# --- pointwise -----------------------------------------------------------------------------------


def test_pointwise_score_is_the_number_on_the_scale_mapped_to_0_1(server):
    server.reply = by_completion({"C-FOUR": "Close enough.\nScore: 4", "C-TWO": "I said Score: 5 first, then\nScore: 2",
                                  "C-FIVE": " 5 ", "C-ONE": "Score: 1"})
    results = Judge(config(server)).score([row("C-FOUR"), row("C-TWO"), row("C-FIVE"), row("C-ONE")])
    # (s - 1) / (5 - 1), the last "Score:" counting, a bare number accepted
    assert [r.value for r in results] == [0.75, 0.25, 1.0, 0.0]
    assert [r.score for r in results] == [4.0, 2.0, 5.0, 1.0]
    assert all(r.error is None for r in results) and results[0].text == "Close enough.\nScore: 4"
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert {k: first["body"][k] for k in ("model", "temperature", "max_completion_tokens")} == \
        {"model": "judge-model", "temperature": 0.0, "max_completion_tokens": 64}
    assert "logprobs" not in first["body"] and len(first["body"]["messages"]) == 1
    assert "User: What is 2+2?" in first["body"]["messages"][0]["content"]


def test_a_0_to_10_scale(server):
    server.reply = lambda body, n: ok("Score: 7")
    [result] = Judge(config(server, score_min=0, score_max=10)).score([row("x")])
    assert result.value == pytest.approx(0.7) and result.score == 7.0


def test_the_reference_comes_from_the_rows_reference_else_its_answer(server):
    server.reply = lambda body, n: ok("Score: 5")
    judge = Judge(config(server, template=str(TEMPLATES / "pointwise_reference.txt")))
    results = judge.score([row("4", answer=4), row("four", reference="IV", answer=4), row("no reference")])
    assert [r.value for r in results] == [1.0, 1.0, None]
    assert "has no reference or answer" in results[2].error
    assert len(server.requests) == 2  # the row without one is not sent
    sent = {c.split("[Reference answer]\n")[1].split("\n")[0]: c for c in server.contents()}  # in any order
    assert set(sent) == {"4", "IV"} and "four" in sent["IV"]


def token(text: str, p: float, top: list[tuple[str, float]] = ()) -> dict:
    return {"token": text, "logprob": math.log(p), "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())} for t, q in top]}


def test_with_logprobs_the_score_is_the_expectation_over_the_score_tokens(server):
    # A reasoning digit ("3 things") comes before the score: the score's own position is read.
    top = [("4", 0.6), ("3", 0.2), (" 3", 0.05), (" 5", 0.05), ("x", 0.07), ("9", 0.03)]
    tokens = [token("I", 0.9), token(" weighed", 0.9), token(" ", 0.9), token("3", 0.8, [("3", 0.8), ("2", 0.2)]),
              token(" things", 0.9), token(".\n", 0.9), token("Score", 0.9), token(":", 0.9), token(" ", 0.9),
              token("4", 0.6, top)]
    server.reply = lambda body, n: ok("".join(t["token"] for t in tokens), tokens)
    judge = Judge(config(server, logprobs=True))
    [result] = judge.score([row("x")])
    # over the scores 1..5 only ("x" and "9" are not on the scale), "3" and " 3" both meaning 3
    p4, p3, p5 = 0.6, 0.2 + 0.05, 0.05
    expectation = (4 * p4 + 3 * p3 + 5 * p5) / (p4 + p3 + p5)
    assert result.score == pytest.approx(expectation, abs=1e-12)
    assert result.value == pytest.approx((expectation - 1) / (5 - 1), abs=1e-12)
    assert server.requests[0]["body"]["logprobs"] is True and server.requests[0]["body"]["top_logprobs"] == 20
    assert judge.stats()["judge/logprobs_missing"] == 0


def test_with_logprobs_and_no_score_in_the_reply_the_first_token_is_read(server):
    """A small judge asked for the digit alone (max_tokens 1) whose first token is a word: the
    expectation over the score tokens among that position's top log-probs; with none, an error."""
    top = [("The", 0.3), ("2", 0.2), (" 4", 0.1), ("4", 0.05), ("x", 0.1), ("7", 0.1)]
    server.reply = lambda body, n: ok("The", [token("The", 0.3, top)]) if n == 0 else \
        ok("The", [token("The", 0.3, [("The", 0.3), ("x", 0.1)])])
    judge = Judge(config(server, logprobs=True, max_tokens=1))
    [first] = judge.score([row("x")])
    expectation = (2 * 0.2 + 4 * 0.15) / (0.2 + 0.15)
    assert first.score == pytest.approx(expectation, abs=1e-12) and first.value == pytest.approx((expectation - 1) / 4)
    [second] = judge.score([row("y")])
    assert second.value is None and second.error == "no probability on the scores 1..5 at the score's position"


def test_pairwise_with_logprobs_averages_the_two_orders_first_letter_probabilities(server):
    """Each order gives p(A) / (p(A) + p(B)) of the first token (" A" counted as "A"); P(a better)
    = (p(A | a first) + p(B | b first)) / 2 decides, so a judge that leans to the first position
    still ranks a pair by how much it leans; neither letter among the top log-probs: an error."""
    def reply(body, n):
        content = body["messages"][0]["content"]
        if "NEITHER" in content:
            return ok("Hmm", [token("Hmm", 0.5, [("Hmm", 0.5), ("So", 0.2)])])
        top = {("R-ONE", "R-TWO"): [("B", 0.35), ("A", 0.3), (" A", 0.1)],  # one first: A 0.4 vs B 0.35
               ("R-TWO", "R-ONE"): [("The", 0.4), ("A", 0.3), ("B", 0.25)],  # two first: A, by more
               ("R-THREE", "R-FOUR"): [("A", 0.6), ("B", 0.2)],
               ("R-FOUR", "R-THREE"): [("A", 0.9), ("B", 0.05)]}
        shown = tuple(sorted((t for t in ("R-ONE", "R-TWO", "R-THREE", "R-FOUR") if t in content), key=content.index))
        return ok(top[shown][0][0], [token(top[shown][0][0], top[shown][0][1], top[shown])])

    server.reply = reply
    judge = Judge(config(server, mode="pairwise", template=str(TEMPLATES / "pairwise_letter.txt"), logprobs=True,
                         max_tokens=1))
    one, three, neither = judge.compare([pair("q", "R-ONE", "R-TWO"), pair("q", "R-THREE", "R-FOUR"),
                                         pair("q", "NEITHER 1", "NEITHER 2")])
    p_one = (0.4 / 0.75 + 0.25 / 0.55) / 2  # p(A | one first) and p(B | two first), both of "one better"
    # each order picks the one shown first (a disagreement, no winner from text), but it leans
    # further toward two when two comes first: P(one better) = 0.494, two wins
    assert (one.winner, one.ab_verdict, one.ba_verdict, one.disagreement) == (1, "A", "A", True)
    assert one.prob_a == pytest.approx(p_one, abs=1e-12) and one.error is None
    p_three = (0.6 / 0.8 + 0.05 / 0.95) / 2
    assert (three.winner, three.prob_a) == (1, pytest.approx(p_three, abs=1e-12))
    assert neither.winner is None and neither.error.startswith("a first: neither A nor B")


def test_with_logprobs_asked_and_none_sent_the_score_is_read_from_the_text(server):
    server.reply = lambda body, n: ok("Score: 4")
    judge = Judge(config(server, logprobs=True))
    [result] = judge.score([row("x")])
    assert result.value == 0.75 and judge.stats()["judge/logprobs_missing"] == 1


def test_logprobs_need_single_digit_scores(server):
    with pytest.raises(JudgeConfigError, match=r"single-digit scores \(0\.\.9\), not 1\.\.10"):
        config(server, logprobs=True, score_max=10)


def test_a_reply_without_a_valid_score_is_that_samples_error_not_an_exception(server):
    server.reply = by_completion({"C-GARBAGE": "I would rather not say.", "C-HIGH": "Score: 9", "C-FINE": "Score: 3"})
    judge = Judge(config(server))
    results = judge.score([row("C-GARBAGE"), row("C-HIGH"), row("C-FINE")])
    assert results[0] == Result(None, None, "I would rather not say.", results[0].error)
    assert results[0].error.startswith("no score in the judge's reply")
    assert results[1].value is None and results[1].error.startswith("score 9 outside the scale 1..5")
    assert results[2].value == 0.5 and results[2].error is None
    stats = judge.stats()
    assert (stats["judge/errors"], stats["judge/requests"], stats["judge/retries"]) == (2, 3, 0)


# --- pairwise ------------------------------------------------------------------------------------


def pair(tag: str, a: str, b: str) -> dict:
    return {"prompt": f"question {tag}", "response_a": a, "response_b": b}


def test_pairwise_asks_both_orders_and_a_winner_needs_both(server):
    def reply(body, n):
        content = body["messages"][0]["content"]
        if "question fair" in content:  # prefers GOOD wherever it is shown
            return ok("Verdict: " + ("A" if content.index("GOOD") < content.index("BAD") else "B"))
        if "question biased" in content:  # always the first shown
            return ok("Reply A is better.\nVerdict: A")
        return ok("Verdict: tie" if content.index("GOOD") < content.index("BAD") else "Verdict: B")

    server.reply = reply
    judge = Judge(config(server, mode="pairwise", template=str(TEMPLATES / "pairwise.txt")))
    results = judge.compare([pair("fair", "GOOD a", "BAD b"), pair("fair", "BAD a", "GOOD b"),
                             pair("biased", "GOOD a", "BAD b"), pair("tied", "GOOD a", "BAD b")])
    assert [(r.winner, r.ab_verdict, r.ba_verdict, r.disagreement) for r in results] == [
        (0, "A", "B", False),    # a first: A (a); b first: B (a) -> a
        (1, "B", "A", False),    # b wins in both orders
        (None, "A", "A", True),  # each order picks the one shown first: no preference, counted
        (None, "tie", "B", False)]
    assert all(r.error is None for r in results)
    assert results[2].texts == ("Reply A is better.\nVerdict: A",) * 2
    # each pair was shown both ways
    contents = server.contents()
    assert len(contents) == 8
    for a, b in (("GOOD a", "BAD b"), ("BAD a", "GOOD b")):
        assert any(c.index(a) < c.index(b) for c in contents if a in c and b in c)
        assert any(c.index(b) < c.index(a) for c in contents if a in c and b in c)
    stats = judge.stats()
    assert (stats["judge/order_disagreements"], stats["judge/requests"], stats["judge/errors"]) == (1, 8, 0)


@pytest.mark.parametrize("ab, ba, expected", [("A", "B", (0, False)), ("B", "A", (1, False)), ("A", "A", (None, True)),
                                              ("B", "B", (None, True)), ("tie", "A", (None, False)),
                                              ("B", "tie", (None, False)), ("tie", "tie", (None, False))])
def test_combine(ab, ba, expected):
    assert judges.combine(ab, ba) == expected


def test_a_pair_with_an_unreadable_verdict_is_that_pairs_error(server):
    server.reply = lambda body, n: ok("Verdict: A" if body["messages"][0]["content"].index("R-ONE") <
                                      body["messages"][0]["content"].index("R-TWO") else "Both are fine.")
    judge = Judge(config(server, mode="pairwise", template=str(TEMPLATES / "pairwise.txt")))
    [result] = judge.compare([pair("q", "R-ONE", "R-TWO")])
    assert result == PairResult(None, "A", None, False, ("Verdict: A", "Both are fine."), result.error)
    assert result.error.startswith("b first: no verdict in the judge's reply")
    assert judge.stats()["judge/errors"] == 1


def test_self_reference_template_shows_the_reference(server):
    server.reply = lambda body, n: ok("Verdict: tie")
    judge = Judge(config(server, mode="pairwise", template=str(TEMPLATES / "self_reference.txt")))
    [result] = judge.compare([{**pair("q", "x", "y"), "reference": "REFERENCE TEXT"}])
    assert result.winner is None and result.error is None
    assert all("[Reference reply]\nREFERENCE TEXT\n" in c for c in server.contents())


# --- failures and retries ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
def test_429_and_5xx_are_retried(server, status):
    server.reply = lambda body, n: failure(status) if n < 2 else ok("Score: 5")
    judge = Judge(config(server, max_retries=2))
    [result] = judge.score([row("x")])
    assert result.value == 1.0 and result.error is None
    assert len(server.requests) == 3
    stats = judge.stats()
    assert (stats["judge/requests"], stats["judge/retries"], stats["judge/errors"]) == (1, 2, 0)
    assert (stats["judge/prompt_tokens"], stats["judge/completion_tokens"]) == (11, 3)  # the answered one's
    assert stats["judge/latency_s"] > 0
    after = judge.stats()  # read: reset
    assert after["judge/retries"] == 0 and after["judge/requests"] == 0 and "judge/latency_s" not in after


@pytest.mark.parametrize("status", [400, 404, 401])
def test_other_4xx_are_not_retried(server, status):
    server.reply = lambda body, n: failure(status)
    judge = Judge(config(server, max_retries=3))
    [result] = judge.score([row("x")])
    assert result.value is None and f"HTTP {status}" in result.error
    assert len(server.requests) == 1 and judge.stats()["judge/retries"] == 0


def test_retries_run_out(server):
    server.reply = lambda body, n: failure(500)
    judge = Judge(config(server, max_retries=2))
    [result] = judge.score([row("x")])
    assert result.error.startswith(f"no reply after 3 attempts ({server.url}): HTTP 500")
    assert len(server.requests) == 3


def test_a_stalled_server_times_out_each_try_and_the_sample_fails(server):
    server.reply = lambda body, n: ok("Score: 5", delay=10.0)
    judge = Judge(config(server, timeout_s=0.3, max_retries=1))
    start = time.monotonic()
    [result] = judge.score([row("x")])
    elapsed = time.monotonic() - start
    assert result.value is None and result.error.startswith("no reply after 2 attempts")
    assert "timed out" in result.error
    assert 2 * 0.3 <= elapsed < 5.0  # two full timeouts, then it gives up, long before the 10 s stall ends
    assert len(server.requests) == 2
    stats = judge.stats()
    assert (stats["judge/retries"], stats["judge/errors"]) == (1, 1)


def test_a_refused_connection_is_retried_then_fails():
    dead = FakeServer()
    dead.close()  # the port is free now: connections are refused
    judge = Judge(config(dead, max_retries=2))
    [result] = judge.score([row("x")])
    assert result.error.startswith("no reply after 3 attempts") and "APIConnectionError" in result.error
    assert judge.stats()["judge/retries"] == 2


def test_concurrency_limit(server):
    def reply(body, n):
        # each request waits (up to 2 s) for a third to arrive: 3 at once is shown to happen, on a
        # loaded machine too, and the semaphore keeps it from being more
        deadline = time.monotonic() + 10
        while server.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        return ok("Score: 2")

    server.reply = reply
    # a timeout far above the wait, so that a slow third arrival is waited for, not retried
    results = Judge(config(server, max_concurrency=3, timeout_s=60)).score([row(f"c{i}") for i in range(12)])
    assert [r.value for r in results] == [0.25] * 12
    assert server.max_in_flight == 3


# --- the cache -----------------------------------------------------------------------------------


def test_the_cache_answers_a_second_run_without_a_request_and_identically(server, tmp_path):
    top = [("4", 0.5), ("5", 0.3), ("2", 0.2)]
    tokens = [token("Score", 0.9), token(":", 0.9), token(" ", 0.9), token("4", 0.5, top)]
    server.reply = lambda body, n: ok("".join(t["token"] for t in tokens), tokens)
    cfg = config(server, cache_dir=str(tmp_path / "cache"), logprobs=True)
    rows = [row("a"), row("b")]
    first = Judge(cfg).score(rows)
    assert len(server.requests) == 2 and first[0].value == pytest.approx((4 * .5 + 5 * .3 + 2 * .2 - 1) / 4)
    # a new Judge (a resumed run), the server moved: the key holds no URL, so every reply is found
    moved = Judge(config(server, cache_dir=str(tmp_path / "cache"), logprobs=True, base_url="http://127.0.0.1:9/v1"))
    second = moved.score(rows)
    assert second == first and len(server.requests) == 2
    stats = moved.stats()
    assert (stats["judge/cache_hits"], stats["judge/requests"], stats["judge/prompt_tokens"]) == (2, 0, 0)
    # another sampling parameter is another request
    Judge(config(server, cache_dir=str(tmp_path / "cache"), logprobs=True, temperature=0.7)).score(rows[:1])
    assert len(server.requests) == 3


def test_failures_are_not_cached(server, tmp_path):
    server.reply = lambda body, n: failure(500) if n == 0 else ok("Score: 4")
    cfg = config(server, cache_dir=str(tmp_path), max_retries=0)
    assert Judge(cfg).score([row("x")])[0].error is not None
    assert Judge(cfg).score([row("x")])[0].value == 0.75
    assert len(server.requests) == 2


def test_a_cache_entry_is_written_whole_then_renamed_into_place(server, tmp_path, monkeypatch):
    server.reply = lambda body, n: ok("Score: 4")
    cfg = config(server, cache_dir=str(tmp_path))
    seen, real_replace = [], os.replace

    def replace(src, dst):
        # at the rename: the entry is not there yet, the temporary file beside it is complete
        seen.append((Path(src).parent == Path(dst).parent, Path(dst).exists(),
                     json.loads(Path(src).read_text())["reply"]["text"]))
        real_replace(src, dst)

    monkeypatch.setattr(judges.os, "replace", replace)
    Judge(cfg).score([row("x")])
    assert seen == [(True, False, "Score: 4")]
    entries = list(tmp_path.rglob("*"))
    assert [p.suffix for p in entries if p.is_file()] == [".json"]


def test_a_write_cut_short_leaves_no_entry_and_the_next_run_asks_again(server, tmp_path, monkeypatch):
    """A run killed between writing and renaming: no entry (nothing half-written is ever read), and
    a stray temporary file is ignored."""
    server.reply = lambda body, n: ok("Score: 4")
    cfg = config(server, cache_dir=str(tmp_path))

    def killed(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(judges.os, "replace", killed)
    [result] = Judge(cfg).score([row("x")])
    assert result.value == 0.75  # the reply itself was good
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # its temporary file removed too
    monkeypatch.undo()
    judge = Judge(cfg)
    key = judges.cache_key(judge.request(judge.messages(row("x"), completion="x")))
    stray = tmp_path / key[:2] / f".{key[:16]}.stray.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text('{"request": {"mod')  # what a kill mid-write leaves
    assert Judge(cfg).score([row("x")])[0].value == 0.75
    assert len(server.requests) == 2
    assert Judge(cfg).score([row("x")])[0].value == 0.75 and len(server.requests) == 2  # now cached


# --- keys, config, templates ---------------------------------------------------------------------


def test_the_api_key_is_read_from_the_named_environment_variable(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "s3cret")
    Judge(config(server, api_key_env="JUDGE_TEST_KEY")).score([row("x")])
    Judge(config(server, api_key_env=None)).score([row("x")])
    assert [r["auth"] for r in server.requests] == ["Bearer s3cret", "Bearer EMPTY"]
    monkeypatch.delenv("JUDGE_TEST_KEY")
    with pytest.raises(JudgeConfigError, match="the environment variable JUDGE_TEST_KEY is not set"):
        Judge(config(server, api_key_env="JUDGE_TEST_KEY"))


def test_a_key_in_the_config_is_refused(server):
    with pytest.raises(JudgeConfigError, match="never the key itself") as caught:
        config(server, api_key_env="sk-proj-abc123")
    assert "abc123" not in str(caught.value)  # not echoed into a log
    node = {**{k: v for k, v in vars(config(server)).items()}, "api_key": "sk-proj-abc123"}
    with pytest.raises(JudgeConfigError, match="a key is never written in a config"):
        judges.load_config(node, server.url)


def test_default_yaml_holds_exactly_the_config_keys_but_the_address():
    yaml = OmegaConf.load(DEFAULT_YAML)
    assert list(yaml) == [k for k in JudgeConfig.__dataclass_fields__ if k != "base_url"]
    cfg = judges.load_config(yaml, "http://127.0.0.1:9/v1")
    assert (cfg.base_url, cfg.model, cfg.mode, cfg.logprobs, cfg.cache_dir, cfg.api_key_env) == \
        ("http://127.0.0.1:9/v1", None, "pointwise", False, None, None)
    assert (REPO / cfg.template).is_file()
    with pytest.raises(JudgeConfigError, match=r"judge.timeout_s: Value 'slow'"):
        judges.load_config({**OmegaConf.to_container(yaml), "timeout_s": "slow"}, "http://x")
    with pytest.raises(JudgeConfigError, match=r"judge.max_retry is not an option of the judge: did you mean "
                                               r"judge.max_retries\?"):
        judges.load_config({**OmegaConf.to_container(yaml), "max_retry": 1}, "http://x")


def test_a_judge_without_a_model_name_asks_the_server_and_a_dead_one_stops_at_once():
    dead = FakeServer()
    dead.close()
    with pytest.raises(JudgeConfigError, match=r"^judge http://127\.0\.0\.1:\d+/v1: cannot list its models "
                                               r"\(APIConnectionError"):
        Judge(config(dead, model=None))


@pytest.mark.parametrize("name, mode", [("pointwise_rubric", "pointwise"), ("pointwise_reference", "pointwise"),
                                        ("pointwise_digit", "pointwise"), ("pairwise", "pairwise"),
                                        ("self_reference", "pairwise"), ("pairwise_letter", "pairwise")])
def test_each_template_has_its_modes_placeholders(name, mode):
    text = judges.read_template(str(TEMPLATES / f"{name}.txt"), mode)
    other = "pairwise" if mode == "pointwise" else "pointwise"
    with pytest.raises(JudgeConfigError, match=f"a {other} template needs"):
        judges.read_template(str(TEMPLATES / f"{name}.txt"), other)
    if name.endswith(("_digit", "_letter")):  # read from the first token's log-probs
        assert text.rstrip().endswith(("the digit alone.", "the letter alone."))
    else:
        assert ("Score: N" in text) == (mode == "pointwise") and ("Verdict: tie" in text) == (mode == "pairwise")


def test_a_misspelt_placeholder_is_refused(server, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("{prompt}\n{completoin}\n{completion}")
    with pytest.raises(JudgeConfigError, match=r"missing \[\], unknown \['completoin'\]"):
        Judge(config(server, template=str(bad)))


def test_rendering_is_one_pass_and_leaves_other_braces(server, tmp_path):
    template = tmp_path / "t.txt"
    template.write_text('{prompt} | {response_a} | {response_b} | reply as {"verdict": ...}')
    server.reply = lambda body, n: ok("Verdict: A")
    Judge(config(server, mode="pairwise", template=str(template))).compare([pair("q", "says {response_b}", "b")])
    # the two orders are asked at once: either may reach the server first
    assert sorted(server.contents()) == ['question q | b | says {response_b} | reply as {"verdict": ...}',
                                         'question q | says {response_b} | b | reply as {"verdict": ...}']


def test_a_malformed_row_or_the_wrong_mode_raises_before_any_request(server):
    judge = Judge(config(server))
    with pytest.raises(ValueError, match=r"row 1: \['completion'\] missing"):
        judge.score([row("x"), {"prompt": "q"}])
    with pytest.raises(JudgeConfigError, match="Judge.compare needs judge.mode=pairwise"):
        judge.compare([pair("q", "a", "b")])
    assert server.requests == []


# --- the event loop ------------------------------------------------------------------------------


def test_called_from_a_thread_each_call_runs_and_closes_its_own_loop_and_client(server, monkeypatch):
    closed = []

    class Recording(openai.AsyncOpenAI):
        async def close(self):
            closed.append(self)
            await super().close()

    monkeypatch.setattr(judges.openai, "AsyncOpenAI", Recording)
    server.reply = lambda body, n: ok("Score: 4")
    judge, out = Judge(config(server)), []
    worker = threading.Thread(target=lambda: out.extend(judge.score([row("x")]) + judge.score([row("y")])))
    worker.start()
    worker.join(10)
    assert [r.value for r in out] == [0.75, 0.75]
    assert len(closed) == 2  # one client per call, closed


def test_inside_a_running_loop_the_sync_api_says_to_await_the_async_one(server):
    server.reply = lambda body, n: ok("Score: 4")
    judge = Judge(config(server))

    async def caller():
        with pytest.raises(RuntimeError, match="await Judge.ascore/acompare instead"):
            judge.score([row("x")])
        return await judge.ascore([row("x")])

    [result] = asyncio.run(caller())
    assert result.value == 0.75 and len(server.requests) == 1
