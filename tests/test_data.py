"""Toy tasks, templating and truncation, and bad input stopping a run before any compute."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest
from hydra.errors import MissingConfigException
from transformers import AutoTokenizer

import distributed
import models
from conftest import fast_overrides, make_cfg
from data import DataError, load_rows, toy
from data.tokenize import IGNORE, prompt_ids, response_ids, tokenize_sft, truncate
from trainers import TRAINERS

TOK = AutoTokenizer.from_pretrained(models.REPO / "tokenizer" / "tiny")


# --- toy tasks --------------------------------------------------------------------------------


def test_toy_answers_and_rewards():
    assert toy.add_answer("57+68=") == "125"
    assert toy.sort_answer("sort 3 1 2 1") == "1 1 2 3"
    assert toy.reverse_answer("reverse abcj") == "jcba"
    reward = toy.REWARDS["toy_add"]
    assert reward([{"role": "user", "content": "57+68="}], " 125") == 1.0
    assert reward([{"role": "user", "content": "57+68="}], "126") == 0.0


@pytest.mark.parametrize("task", list(toy.TASKS))
def test_toy_datasets_are_deterministic_disjoint_and_correct(task):
    train, test = load_rows(f"toy_{task}", "train", "sft"), load_rows(f"toy_{task}", "test", "sft")
    assert train == load_rows(f"toy_{task}", "train", "sft")
    assert not {toy.question_of(r["prompt"]) for r in train} & {toy.question_of(r["prompt"]) for r in test}
    reward = toy.REWARDS[f"toy_{task}"]
    assert all(reward(r["prompt"], r["response"]) == 1.0 for r in test)
    pairs = load_rows(f"toy_{task}_pref", "test", "pref")
    assert all(reward(p["prompt"], p["chosen"]) == 1.0 and reward(p["prompt"], p["rejected"]) == 0.0 for p in pairs)
    prompts = load_rows(f"toy_{task}_prompts", "test", "prompt")
    assert [p["answer"] for p in prompts] == [r["response"] for r in test]


def test_toy_add_train_split_is_every_addition_outside_the_test_split():
    """0..99 + 0..99 is 10,000 questions; the train split is all of those the hash keeps out of test."""
    every = {f"{a}+{b}=" for a in range(100) for b in range(100)}
    train = toy.questions("add", "train")
    assert len(train) == len(set(train)) and set(train) == {q for q in every if not toy._is_test(q)}


# --- templating and truncation ----------------------------------------------------------------


def test_chat_template_and_response_end_with_eos():
    ids = prompt_ids(TOK, [{"role": "user", "content": "1+2="}])
    assert TOK.decode(ids) == "<|bos|><|user|>1+2=<|end|><|assistant|>"
    assert response_ids(TOK, "3") == [TOK.convert_tokens_to_ids("3"), TOK.eos_token_id]


def test_plain_format_for_tokenizers_without_chat_template():
    tok = AutoTokenizer.from_pretrained(models.REPO / "tokenizer" / "tiny")
    tok.chat_template = None
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"}]
    assert tok.decode(prompt_ids(tok, msgs)) == "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant:"
    assert tok.decode(response_ids(tok, "sure")) == " sure<|end|>"


LIMITS = SimpleNamespace(max_length=10, max_prompt_length=4)


def test_truncation_keep_end_drop_error():
    prompt, response = list(range(100, 106)), list(range(200, 209))  # 6 + 9 tokens
    stats = Counter()
    p, (r,) = truncate(prompt, [response], LIMITS, stats, "f: row 1", "keep_end")
    assert p == [102, 103, 104, 105] and r == [200, 201, 202, 203, 204, 205]
    assert stats == {"prompt_truncated": 1, "response_truncated": 1}
    assert truncate(prompt, [response], LIMITS, stats, "f: row 1", "drop") is None and stats["dropped"] == 1
    with pytest.raises(DataError, match=r"f: row 1: field 'prompt'"):
        truncate(prompt, [response], LIMITS, stats, "f: row 1", "error")
    with pytest.raises(DataError, match=r"f: row 7: field 'response'"):
        truncate([1, 2], [list(range(9))], LIMITS, stats, "f: row 7", "error")
    assert truncate([1, 2], [[3]], LIMITS, Counter(), "f", "error") == ([1, 2], [[3]])  # fits: untouched


def test_tokenize_sft_labels_only_the_response():
    rows = [{"prompt": [{"role": "user", "content": "1+2="}], "response": "3"}]
    (ex,), _ = tokenize_sft(rows, TOK, SimpleNamespace(max_length=64, max_prompt_length=32), "toy")
    n_prompt = len(prompt_ids(TOK, rows[0]["prompt"]))
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] == response_ids(TOK, "3")


# --- bad input stops the run before any model is built -----------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "response": "b"}, "{oops"], r"row 2: malformed JSON"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], r"row 2: field 'response': missing"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}], r"row 2: field 'response': empty"),
    ([], r"empty file"),
])
def test_bad_local_file_names_file_row_and_field(tmp_path, rows, message, single_process):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), f"datasets=[{path}]")
    with pytest.raises(DataError, match=f"{path}: {message}"):
        TRAINERS["SFTTrainer"](cfg, distributed.device())


def test_prompt_longer_than_max_length_is_an_error_in_error_mode(tmp_path, single_process):
    rows = [{"prompt": "x", "response": "y"}] * 40
    rows[19] = {"prompt": "x" * 200, "response": "y"}  # file row 20: held out into the test split
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), f"datasets=[{path}]", "data.truncation_mode=error")
    with pytest.raises(DataError, match=f"{path}: row 20: field 'prompt': prompt 204 \\+ response 2 tokens exceed"):
        TRAINERS["SFTTrainer"](cfg, distributed.device())


def test_unknown_dataset_and_model(tmp_path, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), "datasets=[toy_nope]")
    with pytest.raises(DataError, match=r"unknown dataset 'toy_nope': known are .*toy_add"):
        TRAINERS["SFTTrainer"](cfg, distributed.device())
    with pytest.raises(MissingConfigException, match="model/llama99"):
        make_cfg("model=llama99")


def test_batch_size_must_split_over_ranks_and_micro_batches(tmp_path, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), "batch_size=6", "gradient_accumulation_steps=4")
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple"):
        TRAINERS["SFTTrainer"](cfg, distributed.device())


def test_shipped_tokenizer_is_what_the_build_script_makes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tokenizer", models.REPO / "scripts" / "build_tokenizer.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.build().save_pretrained(tmp_path)
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / name).read_text() == (models.REPO / "tokenizer" / "tiny" / name).read_text()
    assert "".join(TOK.decode(TOK("héllo 12+3= {}", add_special_tokens=False)["input_ids"])) == "héllo 12+3= {}"
