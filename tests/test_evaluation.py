"""Greedy task evaluation (what the demo prints): batched, left-padded generation against a plain
one-prompt-at-a-time argmax loop, and the paired comparison against counts made by hand."""

import pytest
import torch
from omegaconf import OmegaConf

import models
from data.tokenize import prompt_ids
from data.toy import prompt_of
from evaluation import generate_greedy, paired_comparison, task_accuracy, task_scores


def argmax_loop(model, tokenizer, prompt, max_new_tokens):
    """Greedy decoding the slow way: the whole sequence through the model at every step, no
    padding, no cache."""
    ids = prompt_ids(tokenizer, prompt)
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        new.append(int(logits.argmax()))
        if new[-1] == tokenizer.eos_token_id:
            break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    cfg = OmegaConf.load(models.REPO / "config" / "model" / "tiny.yaml")
    model = models.load_model(cfg, torch.device("cpu"), seed=3).eval()
    tokenizer = models.load_tokenizer(cfg)
    prompts = [prompt_of(q) for q in ["1+2=", "sort 3 1 2 9 9 0 4 5", "reverse abc", "77+80="]]
    expected = [argmax_loop(model, tokenizer, p, 6) for p in prompts]
    assert len({len(prompt_ids(tokenizer, p)) for p in prompts}) > 1  # the batch really is left-padded
    assert generate_greedy(model, tokenizer, prompts, 6, batch_size=3) == expected
    rows = [{"prompt": p} for p in prompts]
    odd = lambda prompt, completion: float(len(completion) % 2)  # noqa: E731
    assert task_scores(model, tokenizer, rows, odd, 6) == [float(len(c) % 2) for c in expected]
    assert task_accuracy(model, tokenizer, rows, odd, 6) == sum(len(c) % 2 for c in expected) / 4


def test_paired_comparison_counts_only_the_prompts_the_models_disagree_on():
    before = [1, 1, 0, 0, 0, 1, 0, 0]
    after = [1, 0, 1, 1, 1, 1, 0, 1]
    # fixed: prompts 2, 3, 4, 7; broken: prompt 1
    assert paired_comparison(before, after) == {"fixed": 4, "broken": 1, "mcnemar_z": round(3 / 5 ** 0.5, 2)}
    assert paired_comparison(before, before) == {"fixed": 0, "broken": 0, "mcnemar_z": 0.0}
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison(before, after[:-1])


def test_sample_during_eval_writes_completions_and_their_verified_accuracy(tmp_path):
    """SFT with ``sample_during_eval``: each eval writes the greedy completions of the first
    ``n_eval_model_samples`` eval prompts, and ``eval/task_accuracy`` is the toy verifier's mean
    over exactly those rows. 3 prompts over 2 ranks (uneven shares) give what 1 rank gives."""
    import json

    from conftest import fast_overrides, run_ranks
    from data.toy import REWARDS
    from helpers import metrics, train_run

    written = {}
    for world in (1, 2):
        run_dir = tmp_path / f"w{world}"
        extra = ["sample_during_eval=true", "sampler=hf", "n_eval_model_samples=3", "eval_sampling.max_new_tokens=6",
                 "n_examples=16", "eval_every=1000", "eval_at_end=false"]
        run_ranks(train_run, world, tmp_path, fast_overrides(run_dir) + extra)
        rows = [json.loads(line) for line in (run_dir / "samples" / "step-0.jsonl").read_text().splitlines()]
        (record,) = [r for r in metrics(run_dir) if "eval/task_accuracy" in r]
        assert len(rows) == 3
        assert record["eval/task_accuracy"] == pytest.approx(sum(REWARDS["toy_add"](r["prompt"], r["completion"])
                                                                 for r in rows) / 3)
        written[world] = rows
    assert written[1] == written[2]
