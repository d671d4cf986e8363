"""scripts/label_preferences.py (an LLM judge labels pairs, both orders averaged) and the sampler
method it reads the judge with, ``Sampler.choice_logprobs``.

The judge here is the tiny model with random weights, its logits scaled up: it barely reads the
responses and mostly answers "A" (position bias), so p(A | a first) and p(B | a second) differ a
lot, which is what makes a mix-up of the two orders visible. Every probability the script writes is checked against
a plain, unsharded forward pass of the judge prompt computed here. The vLLM check runs the script
in a subprocess (vLLM cannot run in ranks forked from pytest), and skips without vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import models
from conftest import REPO, run_ranks
from data import DataError, load_rows
from data.tokenize import prompt_ids
from helpers import tiny_checkpoint
from sampler import HFSampler

TINY = REPO / "config" / "model" / "tiny.yaml"
SCRIPT = REPO / "scripts" / "label_preferences.py"


def load_script():
    spec = importlib.util.spec_from_file_location("label_preferences", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lp = load_script()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """As in test_sampler.py: a second thread buys the tiny model nothing and can cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer():
    return models.load_tokenizer(OmegaConf.load(TINY))


def tiny(seed: int = 0):
    return models.load_model(OmegaConf.load(TINY), torch.device("cpu"), seed=seed).eval()


@torch.no_grad()
def judge_model():
    """The random tiny model with 20x sharper logits (the final norm's scale), so that its
    position bias is strong: p(A) is ~0.8 whichever response comes first."""
    model = tiny()
    model.model.norm.weight.mul_(20)
    return model


def judge_dir(path: Path) -> Path:
    """The judge as an HF checkpoint directory, as a real judge would be given."""
    return tiny_checkpoint(path, judge_model())


ROWS = [  # five rows: two ranks get 3 and 2 of them
    {"prompt": [{"role": "user", "content": "12+30="}], "response_a": "42", "response_b": "43", "id": "r0"},
    {"prompt": "reverse abc", "response_a": "cba", "response_b": "I will not do that.", "id": "r1"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sort 3 1 2"}],
     "response_a": "1 2 3", "response_b": [{"role": "assistant", "content": "3 2 1"}], "id": "r2"},
    {"prompt": "7+8=", "response_a": "It is 15, because 7+8 is 15.", "response_b": "15", "id": "r3"},
    {"prompt": "say yes", "response_a": "no", "response_b": "yes", "id": "r4"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@torch.no_grad()
def plain_logps(model, tok, messages: list[dict]) -> list[float]:
    """log p("A"), log p("B") as the next token after the judge prompt: one unpadded forward."""
    ids = torch.tensor([prompt_ids(tok, messages)])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    a, b = (tok(x, add_special_tokens=False)["input_ids"] for x in ("A", "B"))
    assert len(a) == len(b) == 1
    return [logps[a[0]].item(), logps[b[0]].item()]


def expected(model, tok, principle: str) -> list[dict]:
    """What the script should write for ROWS, computed independently of its probability code."""
    out = []
    for row in reference_rows():
        conv, a, b = row["prompt"], row["a"], row["b"]
        first, second = lp.judge_messages(principle, conv, a, b), lp.judge_messages(principle, conv, b, a)
        text = second[0]["content"]  # the swap: b is shown as Response A, a as Response B
        assert principle in text and conv[-1]["content"] in text and text.endswith(lp.QUESTION)
        assert text.index("[Response A]\n" + b) < text.index("[Response B]\n" + a)
        l1, l2 = plain_logps(model, tok, first), plain_logps(model, tok, second)
        p_first = math.exp(l1[0]) / (math.exp(l1[0]) + math.exp(l1[1]))    # p(A | a first)
        p_second = math.exp(l2[1]) / (math.exp(l2[0]) + math.exp(l2[1]))   # p(B | a second)
        out.append({"a": a, "b": b, "p_first": p_first, "p_second": p_second, "l1": l1, "l2": l2,
                    "p": (p_first + p_second) / 2})
    return out


def reference_rows():
    """ROWS as the script should read them: a string prompt is one user turn, a message-list
    response its last message's content."""
    def text(x):
        return x if isinstance(x, str) else x[-1]["content"]

    def conversation(x):
        return x if isinstance(x, list) else [{"role": "user", "content": x}]

    return [{"prompt": conversation(r["prompt"]), "a": text(r["response_a"]), "b": text(r["response_b"])} for r in ROWS]


def check_written(out: Path, want: list[dict], tol: float) -> list[dict]:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(ROWS)))  # no tie here: every row a pair, in order
    assert [r["id"] for r in records] == [r["id"] for r in ROWS]  # the row's other fields carried over
    for r, w in zip(records, want):
        assert abs(r["judge_prob_a_first"] - w["p_first"]) < tol and abs(r["judge_prob_a_second"] - w["p_second"]) < tol
        raw = r["judge_logprobs_a_first"] + r["judge_logprobs_a_second"]
        assert max(abs(x - y) for x, y in zip(raw, w["l1"] + w["l2"])) < tol
        assert abs(r["judge_prob_chosen"] - max(w["p"], 1 - w["p"])) < tol
        if abs(w["p"] - 0.5) > tol:  # which side is better, where numerical noise cannot flip it
            better, worse = (w["a"], w["b"]) if w["p"] > 0.5 else (w["b"], w["a"])
            assert (r["chosen"], r["rejected"], r["chosen_was"]) == (better, worse, "a" if w["p"] > 0.5 else "b")
    # the judge answers mostly "A": the orders disagree, so a mix-up of the two would show
    assert all(abs(w["p_first"] - w["p_second"]) > 0.3 for w in want)
    return records


def run_script(rank, world, argv):
    load_script().main(argv)


def script_args(judge, inp, out, name, *extra):
    return ["--judge", str(judge), "--input", str(inp), "--out", str(out), "--sampler", name, "--principle",
            "Prefer the correct answer.", *extra]


def test_script_two_ranks_hf_matches_an_unsharded_forward(tmp_path):
    judge, inp, out = judge_dir(tmp_path / "judge"), write_jsonl(tmp_path / "pairs.jsonl", ROWS), tmp_path / "out.jsonl"
    # 4 sequences per forward: rank 0 (3 rows, 6 prompts) runs 2 forwards, rank 1 (2 rows) 1 and a padding one
    assert not dist.is_initialized()
    run_ranks(run_script, 2, tmp_path, script_args(judge, inp, out, "hf", "--set", "batch_size=4"))
    records = check_written(out, expected(judge_model(), tokenizer(), "Prefer the correct answer."), tol=1e-5)
    assert all(r["principle"] == "Prefer the correct answer." for r in records)
    assert not list(tmp_path.glob("out.jsonl.*"))  # no .tmp or model dir left behind
    pairs = load_rows(str(out), "train", "pref")  # what train.py loss=rm|dpo datasets=[out] reads
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(r["chosen"], r["rejected"]) for r in records]


def tiny_gpt2():
    """Absolute position embeddings: left padding must not shift them (RoPE would not notice)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=262, n_positions=128, n_embd=64, n_layer=2, n_head=2)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_choice_logprobs_hf_is_a_plain_forward(arch):
    tok, model = tokenizer(), tiny() if arch == "llama" else tiny_gpt2()
    texts = ["hi", "12+30=", "a longer prompt, which left-pads the others", "sort 3 1 2", "x" * 60]
    prompts = [prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]
    choices = [38, 39, tok.eos_token_id, 0]
    with torch.no_grad():
        plain = [torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1], -1)[choices].tolist()
                 for p in prompts]
    model.train()
    for batch_size in (1, 3):
        out = HFSampler(model, tok, batch_size=batch_size).choice_logprobs(prompts, choices)
        assert [len(x) for x in out] == [len(choices)] * len(prompts)
        assert max(abs(a - b) for x, y in zip(out, plain) for a, b in zip(x, y)) < 1e-5
    assert all(sum(math.exp(v) for v in x) < 1 for x in out)  # raw log-probs, not renormalised over the choices
    assert model.training, "choice_logprobs must restore training mode"
    assert HFSampler(model, tok).choice_logprobs([], choices) == []


def logps_of(p: float) -> list[float]:
    """Log-probs of "A" and "B" that give p(A) = p, with some mass elsewhere (as a real judge's)."""
    return [math.log(0.9 * p), math.log(0.9 * (1 - p))]


def test_chosen_and_rejected_from_the_two_orders_and_ties():
    assert lp.decide(0.8, 0.6) == ("a", pytest.approx(0.7))
    assert lp.decide(0.3, 0.1) == ("b", pytest.approx(0.2))
    assert lp.decide(0.75, 0.25) == ("tie", 0.5)  # a judge that always answers "A": no preference, no pair
    assert lp.decide(0.6, 0.5, min_confidence=0.6)[0] == "unsure"  # 0.55
    assert lp.decide(0.4, 0.5, min_confidence=0.6)[0] == "unsure"  # P(b better) = 0.55
    assert lp.decide(0.75, 0.5, min_confidence=0.6)[0] == "a"     # 0.625
    row = {"prompt": [{"role": "user", "content": "q"}], "a": "first", "b": "second", "extra": {"id": 7}}
    args = SimpleNamespace(min_confidence=0.5, principle="P", judge="J")
    # a first: p(A) = 0.8; a second: p(B) = 0.6 (the swapped prompt's "A" is b)
    pair = lp.label(row, 3, logps_of(0.8), logps_of(0.4), args)["pair"]
    assert (pair["chosen"], pair["rejected"], pair["chosen_was"]) == ("first", "second", "a")
    assert (pair["index"], pair["id"]) == (3, 7)
    assert (pair["judge_prob_a_first"], pair["judge_prob_a_second"], pair["judge_prob_chosen"]) == \
        pytest.approx((0.8, 0.6, 0.7))
    pair = lp.label(row, 4, logps_of(0.3), logps_of(0.9), args)["pair"]  # P(a better) = (0.3 + 0.1) / 2
    assert (pair["chosen"], pair["rejected"], pair["chosen_was"]) == ("second", "first", "b")
    assert pair["judge_prob_chosen"] == pytest.approx(0.8)
    tie = lp.label(row, 5, logps_of(0.75), logps_of(0.75), args)
    assert tie["verdict"] == "tie" and "pair" not in tie


def test_write_keeps_pairs_in_order_and_counts_what_it_dropped(tmp_path):
    row = {"prompt": [{"role": "user", "content": "q"}], "a": "x", "b": "y", "extra": {}}
    args = SimpleNamespace(min_confidence=0.6, principle="P", judge="J")
    judged = [lp.label(row, i, logps_of(pa), logps_of(pb), args)
              for i, pa, pb in ((0, 0.9, 0.2), (1, 0.75, 0.75), (2, 0.6, 0.5), (4, 0.1, 0.9))]
    out = tmp_path / "o.jsonl"
    summary = lp.write(str(out), [(judged[1::2], [3]), (judged[0::2], [])], 5)  # ranks return rows out of order
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["chosen_was"]) for r in records] == [(0, "a"), (4, "b")]
    counts = ("rows", "pairs", "ties", "below_min_confidence", "too_long")
    assert [summary[k] for k in counts] == [5, 2, 1, 1, 1]
    assert summary["mean_prob_on_choices"] == pytest.approx(0.9)
    with pytest.raises(RuntimeError, match="twice or not at all"):
        lp.write(str(out), [(judged, []), (judged[:1], [])], 5)


def test_config_judge_in_one_process_skips_long_prompts(tmp_path, capsys):
    inp, out = write_jsonl(tmp_path / "pairs.jsonl", ROWS), tmp_path / "out.jsonl"
    lengths = [max(map(len, lp.judge_prompts(tokenizer(), "P", r))) for r in lp.load_pairs(str(inp))[0]]
    limit = sorted(lengths)[2]  # the two longest rows are skipped
    lp.main(["--judge", "tiny", "--input", str(inp), "--out", str(out), "--sampler", "hf", "--principle", "P",
             "--max-length", str(limit)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["too_long"] == 2 and summary["rows"] == 5 and summary["ranks"] == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == [i for i, n in enumerate(lengths) if n <= limit]
    assert all(r["judge"] == "tiny" for r in records) and not dist.is_initialized()


def test_no_pair_kept_is_an_error_exit(tmp_path, capsys):
    inp, out = write_jsonl(tmp_path / "pairs.jsonl", ROWS), tmp_path / "out.jsonl"
    code = lp.main(["--judge", "tiny", "--input", str(inp), "--out", str(out), "--sampler", "hf", "--principle", "P",
                    "--min-confidence", "1.0"])  # no judge is ever certain
    assert code == 1 and "error: no pair was kept" in capsys.readouterr().err
    assert lp.main(["--judge", "tiny", "--input", str(inp), "--out", str(out), "--sampler", "hf", "--principle", "P"]) == 0


def test_generate_output_is_judged_on_its_first_two_completions(tmp_path):
    """scripts/generate.py's rows: completions[0] is response a, completions[1] response b, the row's
    other fields kept; a row whose two texts are equal or empty is skipped and counted, not refused."""
    def gen(i, *texts):
        return {"index": i, "prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i),
                "completions": [{"text": t, "token_ids": [1], "logprobs": [-1.0], "finish_reason": "stop"} for t in texts]}

    inp = write_jsonl(tmp_path / "samples.jsonl", [gen(0, "x", "y", "z"), gen(1, "same", "same"), gen(2, "", "w"),
                                                  gen(3, "u", "v")])
    rows, skipped = lp.load_pairs(str(inp))
    assert skipped == 2
    assert [(r["prompt"][0]["content"], r["a"], r["b"]) for r in rows] == [("q0", "x", "y"), ("q3", "u", "v")]
    assert rows[1]["extra"] == {"index": 3, "answer": "3"}


BAD = [  # (file name, lines, what the message must name)
    ("missing.jsonl", [{"prompt": "q", "response_a": "x"}], "missing.jsonl: row 1: field 'response_b': missing"),
    ("json.jsonl", [ROWS[0], '{"prompt": "q", "response_a": '], "json.jsonl: row 2: malformed JSON"),
    ("turn.jsonl", [ROWS[0], ROWS[1], {**ROWS[0], "prompt": [{"role": "assistant", "content": "hi"}]}],
     "turn.jsonl: row 3: field 'prompt': the conversation must end with a user (or tool) turn"),
    ("same.jsonl", [{"prompt": "q", "response_a": "x", "response_b": "x"}],
     "same.jsonl: row 1: field 'response_b': identical"),
    ("type.jsonl", [{"prompt": "q", "response_a": 3, "response_b": "x"}],
     "type.jsonl: row 1: field 'response_a': expected a string"),
    ("empty.jsonl", [{"prompt": "q", "response_a": " ", "response_b": "x"}],
     "empty.jsonl: row 1: field 'response_a': empty"),
    ("pref.jsonl", [{"prompt": "q", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "x"}],
     "pref.jsonl: row 2: field 'rejected': missing"),
    ("shape.jsonl", [{"prompt": "q", "response": "x"}], "shape.jsonl: row 1: field 'response_a': missing"),
    ("none.jsonl", [], "none.jsonl: empty file"),
    ("gen.jsonl", [{"prompt": "q", "completions": [{"text": "x"}]}], "gen.jsonl: row 1: field 'completions': expected a list of at least 2"),
    ("rows.csv", [], "rows.csv: unsupported extension"),
]


@pytest.mark.parametrize("name,lines,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_named_before_the_judge_is_loaded(tmp_path, monkeypatch, name, lines, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the judge was loaded before the input was checked")

    monkeypatch.setattr(models, "load_tokenizer", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    inp = write_jsonl(tmp_path / name, lines) if lines else tmp_path / name
    inp.touch()
    with pytest.raises(DataError) as e:
        lp.main(script_args("tiny", inp, tmp_path / "out.jsonl", "hf"))
    assert message in str(e.value).replace(str(tmp_path) + os.sep, "")
    assert not dist.is_initialized() and not (tmp_path / "out.jsonl").exists()


def test_a_judge_server_labels_the_pairs_it_prefers_in_both_orders(tmp_path, capsys):
    """--judge http://...: each pair asked both ways of an OpenAI-compatible server (the fake of
    fake_judge.py, preferring the shorter response, a tie at equal length, and always "A" on r4's
    prompt, a position bias); a pair is kept only when both orders pick the same response."""
    from fake_judge import FakeServer, ok

    def reply(body, n):
        content = body["messages"][0]["content"]
        first, second = content.split("<A>")[1].split("</A>")[0], content.split("<B>")[1].split("</B>")[0]
        if "say yes" in content:
            return ok("Verdict: A")
        return ok("Verdict: tie" if len(first) == len(second) else f"Verdict: {'A' if len(first) < len(second) else 'B'}")

    server = FakeServer()
    server.reply = reply
    template = tmp_path / "pairwise.txt"
    template.write_text("{prompt}\n<A>{response_a}</A>\n<B>{response_b}</B>\nVerdict?")
    inp, out = write_jsonl(tmp_path / "pairs.jsonl", ROWS), tmp_path / "out.jsonl"
    try:
        code = lp.main(["--judge", server.url, "--input", str(inp), "--out", str(out), "--set", "model=fake",
                        "--set", f"template={template}", "--set", "backoff_s=0.01"])
    finally:
        server.close()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and len(server.requests) == 10
    assert [(r["id"], r["chosen"], r["rejected"], r["chosen_was"], r["judge_verdict_a_first"],
             r["judge_verdict_b_first"]) for r in records] == [("r1", "cba", "I will not do that.", "a", "A", "B"),
                                                              ("r3", "15", "It is 15, because 7+8 is 15.", "b", "B", "A")]
    assert all(r["judge"] == server.url and r["judge_model"] == "fake" for r in records)
    assert {k: summary[k] for k in ("rows", "pairs", "ties", "order_disagreements", "errors", "judge/requests")} == \
        {"rows": 5, "pairs": 2, "ties": 2, "order_disagreements": 1, "errors": 0, "judge/requests": 10}
    with pytest.raises(SystemExit):
        lp.parse(["--judge", server.url, "--input", str(inp), "--out", str(out), "--principle", "Be kind."])
    assert "a judge server reads its template" in capsys.readouterr().err


def test_with_reference_the_judge_reads_each_rows_reference_answer(tmp_path):
    """Seed 000's self-reference: --with-reference shows the judge (the policy's own checkpoint) each
    row's reference answer before the two responses; a row without one is refused, naming it."""
    inp = write_jsonl(tmp_path / "pairs.jsonl", [{**r, "answer": f"REF{i}"} for i, r in enumerate(ROWS)])
    rows, _ = lp.load_pairs(str(inp))
    tok = tokenizer()
    a_first, b_first = (tok.decode(ids) for ids in lp.judge_prompts(tok, "P", rows[3], lp.reference_of(rows[3])))
    for text in (a_first, b_first):
        assert text.index("REF3") < text.index("[Response A]") and "REF0" not in text
    assert "REF3" not in tok.decode(lp.judge_prompts(tok, "P", rows[3])[0])
    out = tmp_path / "out.jsonl"
    assert lp.main(["--judge", "tiny", "--input", str(inp), "--out", str(out), "--sampler", "hf",
                    "--with-reference"]) == 0
    assert out.read_text()
    missing = write_jsonl(tmp_path / "missing.jsonl", [{**ROWS[0], "answer": "1"}, ROWS[1]])
    with pytest.raises(DataError, match=r"^.*missing\.jsonl: row 2: no reference or answer field"):
        lp.main(["--judge", "tiny", "--input", str(missing), "--out", str(out), "--with-reference"])
