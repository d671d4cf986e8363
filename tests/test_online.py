"""The online loops: which samples become training data (hand-made cases), what an iteration
writes, and an iteration that dies in training resuming on the data it had written."""

import json

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

import checkpointing
import distributed
from conftest import make_cfg, run_ranks
from data.selection import best_of_k, best_vs_worst_pairs
from helpers import assert_same_run, metrics, online_overrides
from trainers import TRAINERS


# --- selection --------------------------------------------------------------------------------

def test_pairs_are_each_prompts_best_against_its_worst():
    scores = [0.1, 0.9, 0.5,   # best 1, worst 0
              2.0, 2.0, 1.0,   # tied best: the earlier (3)
              0.0, 0.0, 0.0,   # all equal: no pair
              1.0, 0.0, 0.0]   # tied worst: the earlier (10)
    assert best_vs_worst_pairs(scores, 3) == [(1, 0), (3, 5), (9, 10)]
    assert best_vs_worst_pairs(scores, 3, margin=0.7) == [(1, 0), (3, 5), (9, 10)]
    assert best_vs_worst_pairs(scores, 3, margin=0.8) == [(3, 5), (9, 10)]  # 0.9 - 0.1 is not > 0.8
    assert best_vs_worst_pairs(scores, 3, margin=1.0) == []  # strictly more than the margin
    assert best_vs_worst_pairs([0.3, 0.7], 1) == []  # K=1: nothing to compare
    with pytest.raises(ValueError, match="groups of 5"):
        best_vs_worst_pairs(scores, 5)


def test_best_of_k_keeps_each_prompts_best_then_the_top_fraction():
    scores = [0.0, 1.0, 1.0,   # tie: the earlier best (1)
              0.0, 0.0, 0.0,   # all equal: the first (3)
              3.0, 2.0, 0.5,   # 6
              0.2, 0.4, 0.1]   # 10
    assert best_of_k(scores, 3) == [1, 3, 6, 10]
    assert best_of_k(scores, 3, top_fraction=0.5) == [1, 6]  # the best two of 3.0, 1.0, 0.4, 0.0
    assert best_of_k(scores, 3, top_fraction=0.3) == [1, 6]  # 0.3 x 4 = 1.2, rounded up
    assert best_of_k(scores, 3, top_fraction=0.01) == [6]  # at least one
    assert best_of_k(scores, 3, min_score=1.0) == [1, 6]
    assert best_of_k([0.5, 0.2], 1) == [0, 1]  # K=1: every sample is its prompt's best
    assert best_of_k([0.5, 0.2], 1, min_score=0.3) == [0]
    with pytest.raises(ValueError, match="top_reward_percentage"):
        best_of_k(scores, 3, top_fraction=0)


# --- the loops --------------------------------------------------------------------------------

class Crash(Exception):
    pass


def online_run(rank, world, overrides, crash_in=None):
    cfg = make_cfg(*overrides)
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    if crash_in is not None:  # die in the training phase of iteration crash_in, its data written
        update = trainer.update

        def crashing(micro):
            if trainer.step + 1 == crash_in:
                raise Crash(f"killed while training iteration {crash_in}")
            return update(micro)

        trainer.update = crashing
    trainer.train()
    return checkpointing.full_state_dict(trainer.model) if rank == 0 else None


def without_timing(records):
    return [{k: v for k, v in r.items() if not k.startswith("timing/") and k != "samples_per_s"} for r in records]


@pytest.mark.parametrize("loss", ["online_dpo", "raft"])
def test_iteration_killed_in_training_resumes_on_its_data(tmp_path, loss):
    whole = tmp_path / "whole"
    ref = run_ranks(online_run, 1, tmp_path, online_overrides(whole, loss))[0]
    broken = tmp_path / "broken"
    with pytest.raises(ProcessRaisedException, match="Crash: killed while training iteration 2"):
        run_ranks(online_run, 1, tmp_path, online_overrides(broken, loss), 2)
    assert [p.name for p in checkpointing.complete(broken)] == ["step-1"]
    written = (broken / "iterations" / "2" / "samples.jsonl").read_text()
    got = run_ranks(online_run, 1, tmp_path, online_overrides(broken, loss, "resume=true"))[0]
    assert (broken / "iterations" / "2" / "samples.jsonl").read_text() == written  # not sampled again
    assert_same_run(without_timing(metrics(broken)), without_timing(metrics(whole)))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=k)
    # what an iteration wrote: the data it trained on follows from its scored samples
    for it in (1, 2):
        samples = [json.loads(x) for x in (whole / "iterations" / str(it) / "samples.jsonl").read_text().splitlines()]
        data = [json.loads(x) for x in (whole / "iterations" / str(it) / "train.jsonl").read_text().splitlines()]
        scores = [s["score"] for s in samples]
        if loss == "online_dpo":
            pairs = best_vs_worst_pairs(scores, 4)
            assert [(d["chosen_text"], d["rejected_text"]) for d in data] == \
                [(samples[b]["text"], samples[w]["text"]) for b, w in pairs]
            assert all(d["scores"][0] > d["scores"][1] and len(d["ref"]) == 2 for d in data)
        else:
            assert [d["text"] for d in data] == [samples[i]["text"] for i in best_of_k(scores, 4)]
        assert (whole / "iterations" / str(it) / "model" / "config.json").exists()
    records = [r for r in metrics(whole) if "iteration/examples" in r]
    assert len(records) == 2 and all(r["iteration/updates"] == r["iteration/examples"] // 2 for r in records)


def test_self_judged_online_dpo_pairs_are_the_policys_own_verdicts(tmp_path):
    """loss.self_judge (seed 000): each prompt's first two distinct samples, judged by the policy
    itself in both orders against the row's answer as a reference; the pairs of iteration 1 are the
    verdicts of a plain forward of the model it started from, P(a better) = (p(A | a first) + p(B |
    b first)) / 2 over just "A" and "B" written out here, a pair only off an exact tie."""
    import math

    from transformers import AutoModelForCausalLM

    import judges
    from data import toy
    from data.tokenize import prompt_ids
    from helpers import tiny_checkpoint, trained_tiny, tokenizer

    start = tiny_checkpoint(tmp_path / "start", trained_tiny())
    run_dir = tmp_path / "run"
    run_ranks(online_run, 1, tmp_path, online_overrides(run_dir, "online_dpo", "loss.self_judge=true",
                                                        f"model.archive={start}", "max_length=512", "n_examples=8",
                                                        "eval_at_end=false"))
    model, tok = AutoModelForCausalLM.from_pretrained(start).eval(), tokenizer()
    a_id, b_id = judges.choice_ids(tok)
    samples = [json.loads(x) for x in (run_dir / "iterations" / "1" / "samples.jsonl").read_text().splitlines()]
    data = [json.loads(x) for x in (run_dir / "iterations" / "1" / "train.jsonl").read_text().splitlines()]
    answers = {r["prompt"][-1]["content"]: r["answer"] for r in toy.prompt_rows("add", "train")}
    want = []
    for g in range(0, len(samples), 4):
        texts = [s["text"] for s in samples[g:g + 4] if s["text"].strip()]
        other = [t for t in texts[1:] if t != texts[0]]
        if not other:
            continue
        a, b = texts[0], other[0]
        answer = answers[samples[g]["prompt"][-1]["content"]]  # the dataset row's, the reference

        def p_first(x, y):
            ids = prompt_ids(tok, judges.judge_messages(judges.PRINCIPLE, samples[g]["prompt"], x, y, answer))
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].double()
            la, lb = torch.log_softmax(logits, -1)[[a_id, b_id]].tolist()
            return math.exp(la) / (math.exp(la) + math.exp(lb))

        p = (p_first(a, b) + 1 - p_first(b, a)) / 2
        want.append((a, b, p))
    assert want
    expected = {((a, b) if p > 0.5 else (b, a)): max(p, 1 - p) for a, b, p in want if p != 0.5}
    got = {(d["chosen_text"], d["rejected_text"]): d["judge_prob_chosen"] for d in data}
    assert len(got) == len(data) == len(expected)
    for pair, p in expected.items():  # within rounding of 0.5 a verdict may fall either way
        assert pair in got if p > 0.5 + 1e-5 else (pair in got or pair[::-1] in got)
        assert got.get(pair, got.get(pair[::-1])) == pytest.approx(p, abs=1e-6)
