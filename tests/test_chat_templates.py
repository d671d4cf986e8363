"""Chat examples are what each model family's own chat template renders, ending with its
end-of-turn token, which ``models.load_tokenizer`` makes the EOS token (so sampling stops there).

Each family's tokenizer is built here, offline: one token per byte plus the family's special
tokens, with a short but faithful copy of its real chat template.
"""

import logging
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import models
from data import load_rows
from data.packing import pack, pad
from data.tokenize import IGNORE, end_of_turn, tokenize_pairs, tokenize_prompts, tokenize_sft

LIMITS = SimpleNamespace(max_length=512, max_prompt_length=256)

FAMILIES = {
    # SmolLM2-Instruct: the template adds a system prompt when there is none; pad = eos = <|im_end|>
    "chatml": dict(
        special=["<|im_start|>", "<|im_end|>"], bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
        eot="<|im_end|>", template=(
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
            "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")),
    # Llama-3-Instruct's template with the base model's tokenizer config (eos <|end_of_text|>, no pad)
    "llama3": dict(
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, eot="<|eot_id|>", template=(
            "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
            "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
            "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")),
    # Gemma: a turn ends with <end_of_turn>, the EOS token is <eos>
    "gemma": dict(
        special=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>", pad="<pad>",
        eot="<end_of_turn>", template=(
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
            "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
            "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")),
    # Mistral-Instruct: no generation prompt, a reply ends with </s>, the EOS token
    "mistral": dict(
        special=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>", pad=None, eot="</s>", template=(
            "{{ bos_token }}{% for message in messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
            "{% endfor %}")),
}

PROMPT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
          {"role": "user", "content": "And 3+3?"}]


def family_tokenizer(family: str, template: str | None = None) -> PreTrainedTokenizerFast:
    f = FAMILIES[family]
    vocab = {t: i for i, t in enumerate(f["special"])}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(f["special"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f["bos"], eos_token=f["eos"], pad_token=f["pad"],
                                   chat_template=template or f["template"])


def loaded(tok, tmp_path):
    """``tok`` as ``models.load_tokenizer`` hands it to the trainers."""
    tok.save_pretrained(tmp_path / "tok")
    return models.load_tokenizer(OmegaConf.create({"tokenizer_name_or_path": str(tmp_path / "tok")}))


def rendered(tok, prompt, response, eot):
    """The template's text of the conversation, cut right after the reply's end-of-turn token,
    tokenized; and how many of those tokens are the prompt's."""
    prompt_text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
    assert text.startswith(prompt_text)
    text = text[: text.index(eot, len(prompt_text)) + len(eot)]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, len(tok(prompt_text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_example_is_the_template_rendering_up_to_its_end_of_turn(family, tmp_path):
    eot = FAMILIES[family]["eot"]
    tok = family_tokenizer(family)
    ids, n_prompt = rendered(tok, PROMPT, "It is 6.", eot)
    for t in (tok, loaded(family_tokenizer(family), tmp_path)):  # as built, and with eos = end of turn
        (ex,), _ = tokenize_sft([{"prompt": PROMPT, "response": "It is 6."}], t, LIMITS, "rows")
        assert ex["input_ids"] == ids
        assert ex["labels"] == [IGNORE] * n_prompt + ids[n_prompt:]
        assert ex["labels"][-1] == tok.convert_tokens_to_ids(eot)
        # preference pairs: each side is the SFT example of its reply
        rows = [{"prompt": PROMPT, "chosen": "It is 6.", "rejected": "Seven."}]
        (pair,), _ = tokenize_pairs(rows, t, LIMITS, "rows")
        assert pair["chosen"] == {"input_ids": ex["input_ids"], "labels": ex["labels"]}
        rejected, _ = rendered(tok, PROMPT, "Seven.", eot)
        assert pair["rejected"]["input_ids"] == rejected and pair["rejected"]["labels"][-1] == ex["labels"][-1]
        # prompt rows are the prompt as before: the template's generation prompt
        (p,), _ = tokenize_prompts([{"prompt": PROMPT}], t, LIMITS, "rows")
        assert p["prompt_ids"] == ids[:n_prompt]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_tokenizer_makes_the_end_of_turn_token_eos(family, tmp_path, caplog):
    f = FAMILIES[family]
    assert end_of_turn(family_tokenizer(family)) == family_tokenizer(family).convert_tokens_to_ids(f["eot"])
    with caplog.at_level(logging.INFO, logger="train"):
        tok = loaded(family_tokenizer(family), tmp_path)
    assert tok.eos_token == f["eot"] and tok.eos_token_id == tok.convert_tokens_to_ids(f["eot"])
    assert tok.pad_token == (f["pad"] or f["eos"])  # a missing pad is the model's own EOS
    said = [r.message for r in caplog.records if "ends a turn with" in r.message]
    assert len(said) == (f["eot"] != f["eos"])


def test_end_of_turn_label_survives_packing_when_pad_is_eos():
    tok = family_tokenizer("chatml")  # SmolLM2: pad = eos = <|im_end|>
    assert tok.pad_token_id == tok.eos_token_id == end_of_turn(tok)
    rows = [{"prompt": [{"role": "user", "content": "hi" * n}], "response": "yo" * n} for n in (1, 3, 9)]
    examples, _ = tokenize_sft(rows, tok, LIMITS, "rows")
    for layout in (pack(examples, 250, tok.pad_token_id), pad(examples, tok.pad_token_id)):
        for i, ex in enumerate(examples):
            targets = layout["targets"][layout["seq_ids"] == i]
            # the token before the last predicts the end of the turn; the last predicts nothing
            assert targets[-2:].tolist() == [tok.eos_token_id, IGNORE]
            assert targets[targets != IGNORE].tolist() == ex["input_ids"][-len(targets[targets != IGNORE]):]


def test_template_rewriting_the_prompt_falls_back_to_reply_and_end_of_turn(caplog):
    # a reasoning template: the generation prompt opens <think>, a rendered reply has none, so
    # the prompt is not a prefix of the conversation with the reply
    opening = "'<|im_start|>assistant\n' }}"
    template = FAMILIES["chatml"]["template"].replace(opening, "'<|im_start|>assistant\n<think>\n' }}")
    tok = family_tokenizer("chatml", template)
    rows = [{"prompt": [{"role": "user", "content": q}], "response": "ok"} for q in ("a", "b")]
    with caplog.at_level(logging.WARNING, logger="train"):
        examples, _ = tokenize_sft(rows, tok, LIMITS, "rows")
    reply = tok("ok", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert all(ex["input_ids"][-3:] == ex["labels"][-3:] == reply for ex in examples)
    assert sum("renders the prompt differently" in r.message for r in caplog.records) == 1  # once per tokenizer


def test_tiny_tokenizer_examples_are_unchanged():
    """The shipped byte tokenizer's examples are token for token what they were before templates
    rendered replies: the prompt, the reply's own tokens, then the EOS token <|end|>."""
    tok = AutoTokenizer.from_pretrained(models.REPO / "tokenizer" / "tiny")
    assert end_of_turn(tok) == tok.eos_token_id

    def before(prompt, text):
        p = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        return p, tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    rows = load_rows("toy_add", "train", "sft")[:50] + load_rows("toy_sort", "train", "sft")[:50] + [
        {"prompt": [{"role": "system", "content": "Be brief."}] + PROMPT, "response": " héllo {}\n"},
        {"prompt": PROMPT, "response": "\n\n  spaced  "}]
    examples, _ = tokenize_sft(rows, tok, LIMITS, "rows")
    for row, ex in zip(rows, examples, strict=True):
        p, r = before(row["prompt"], row["response"])
        assert ex["input_ids"] == p + r and ex["labels"] == [IGNORE] * len(p) + r
    pairs = load_rows("toy_add_pref", "train", "pref")[:50]
    examples, _ = tokenize_pairs(pairs, tok, LIMITS, "rows")
    for row, ex in zip(pairs, examples, strict=True):
        for side in ("chosen", "rejected"):
            p, r = before(row["prompt"], row[side])
            assert ex[side] == {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}
