"""Rows to token ids: chat templating and the truncation policy.

A tokenized SFT example is ``{"input_ids": [...], "labels": [...], "prompt": messages}`` with
``labels`` equal to ``input_ids`` on response tokens and -100 on prompt tokens (``prompt`` keeps
the conversation, for sampling and verifiers). Every length limit is enforced here,
before training, with the offending row named; what was truncated or dropped is counted.

With a chat template, the tokens of an example are the template's own: the prompt rendered with
the generation prompt, then the rest of the whole conversation's rendering up to and including
the template's end-of-turn token (``end_of_turn``), which need not be the EOS token (Gemma ends a
turn with ``<end_of_turn>``, its EOS is ``<eos>``); ``models.load_tokenizer`` makes it the EOS token.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter

from data import DataError, load_rows, origin

IGNORE = -100
log = logging.getLogger("train")

# Tokenizers without a chat template (base models such as Pythia) get the Anthropic HH format,
# which is what the DPO repo trains on.
PLAIN_ROLES = {"system": "", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}


def prompt_ids(tokenizer, messages: list[dict], place: str | None = None) -> list[int]:
    """The chat-templated prompt, ending with the assistant's turn opening. A conversation the
    model's template refuses (many require strict user/assistant alternation: no leading
    assistant turn, no two user turns in a row) stops the run naming the row (``place``)."""
    if tokenizer.chat_template:
        return render(tokenizer, messages, True, place or "a prompt")
    text = "".join(PLAIN_ROLES[m["role"]] + m["content"] for m in messages) + "\n\nAssistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render(tokenizer, messages: list[dict], generation_prompt: bool, place: str) -> list[int]:
    """The chat template's tokens of ``messages``; a conversation it refuses is a ``DataError``."""
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                            return_dict=False)
    except Exception as e:  # jinja2's TemplateError (raise_exception in the template) and the like
        roles = " -> ".join(m["role"] for m in messages)
        raise DataError(f"{place}: the model's chat template cannot render this conversation "
                        f"(roles {roles}): {e}; fix or drop the row, or merge consecutive turns of one role") from None
    return list(out)


def response_ids(tokenizer, text: str, eot: int | None = None) -> list[int]:
    """The response's tokens and the end-of-turn token ``eot`` (by default the EOS token, which
    ``models.load_tokenizer`` makes the end-of-turn token), so a trained model learns to stop."""
    if not tokenizer.chat_template and not text.startswith(" "):
        text = " " + text  # the plain format puts a space after "Assistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id if eot is None else eot]


PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Probe reply."}]


def end_of_turn(tokenizer) -> int:
    """The token the chat template ends an assistant turn with (ChatML's ``<|im_end|>``, Llama-3's
    ``<|eot_id|>``, Gemma's ``<end_of_turn>``, Mistral's ``</s>``): the first token after the reply
    in a rendered probe conversation, if it is a special (added) token; else, and without a chat
    template, the EOS token."""
    if tokenizer.chat_template:
        reply = PROBE[-1]["content"]
        try:
            text = tokenizer.apply_chat_template(PROBE, tokenize=False)
        except Exception:  # a template that refuses the probe (e.g. requires a system turn)
            text = ""
        if reply in text:
            after = tokenizer(text[text.rindex(reply) + len(reply) :], add_special_tokens=False)["input_ids"]
            if after and after[0] in tokenizer.added_tokens_decoder:
                return after[0]
    return tokenizer.eos_token_id


_warned = weakref.WeakSet()  # the tokenizers a fallback was reported for


def reply_ids(tokenizer, messages: list[dict], prompt: list[int], text: str, eot: int, place: str) -> list[int]:
    """The tokens of a reply ``text`` to ``messages`` (whose tokens are ``prompt``, from
    ``prompt_ids``), as the chat template renders them: the whole conversation rendered, less
    the prompt, cut right after the end-of-turn token ``eot``. What a template puts after it
    (ChatML's and Gemma's "\n") is not trained: generation stops at the end-of-turn token, and a
    later turn's rendering supplies it. The first ``eot`` is the end, as a reply quoting the token
    ends there anyway, while a template may add more after it (Phi-3 appends the EOS token).

    A template that renders the prompt differently once a reply follows (one that rewrites earlier
    turns, e.g. drops a reasoning opening the generation prompt added), or a token merging across
    the boundary, falls back to ``response_ids``: the reply's own tokens and ``eot``. Without a
    chat template (the plain format): ``response_ids``, as always."""
    if not tokenizer.chat_template:
        return response_ids(tokenizer, text)
    try:
        full = render(tokenizer, messages + [{"role": "assistant", "content": text}], False, place)
    except DataError as e:
        return fallback(tokenizer, text, eot, str(e))
    if full[: len(prompt)] != prompt:
        return fallback(tokenizer, text, eot, f"{place}: the chat template renders the prompt differently once a "
                                              f"reply follows it")
    rest = full[len(prompt) :]
    if eot not in rest:
        return fallback(tokenizer, text, eot, f"{place}: the chat template does not end the reply with the "
                                              f"end-of-turn token {tokenizer.convert_ids_to_tokens(eot)!r}")
    return rest[: rest.index(eot) + 1]


def fallback(tokenizer, text: str, eot: int, why: str) -> list[int]:
    """``response_ids`` for a reply the template's rendering cannot give; said once per tokenizer."""
    if tokenizer not in _warned:
        _warned.add(tokenizer)
        log.warning(f"{why}: such replies are tokenized on their own and end with the end-of-turn token "
                    f"(said once per tokenizer)")
    return response_ids(tokenizer, text, eot)


def truncate(prompt: list[int], responses: list[list[int]], limits, stats: Counter, place: str, mode: str):
    """Apply the truncation policy to a prompt and its response(s); None means drop the row.

    ``keep_end`` keeps the end of a long prompt (the part nearest the response) down to
    ``max_prompt_length``, then cuts responses to fit ``max_length``; ``drop`` skips rows that do
    not fit; ``error`` stops with the row named.
    """
    longest = max((len(r) for r in responses), default=0)
    if len(prompt) + longest <= limits.max_length and len(prompt) <= limits.max_prompt_length:
        return prompt, responses
    if mode == "error":
        field = "prompt" if len(prompt) > limits.max_prompt_length else "response"
        raise DataError(
            f"{place}: field {field!r}: prompt {len(prompt)} + response {longest} tokens exceed "
            f"max_prompt_length={limits.max_prompt_length} / max_length={limits.max_length} "
            f"(set truncation_mode=keep_end or drop to accept such rows)"
        )
    if mode == "drop":
        stats["dropped"] += 1
        return None
    if len(prompt) > limits.max_prompt_length:
        prompt = prompt[-limits.max_prompt_length :]
        stats["prompt_truncated"] += 1
    room = limits.max_length - len(prompt)
    if longest > room:
        responses = [r[:room] for r in responses]
        stats["response_truncated"] += 1
    return prompt, responses


def tokenize_sft(rows: list[dict], tokenizer, limits, source: str, mode: str = "keep_end"):
    """SFT rows to examples; returns (examples, stats) where stats counts truncations and drops."""
    stats, examples, eot = Counter(), [], end_of_turn(tokenizer)
    for i, row in enumerate(rows, start=1):
        place = origin(row, source, i)
        prompt = prompt_ids(tokenizer, row["prompt"], place)
        reply = reply_ids(tokenizer, row["prompt"], prompt, row["response"], eot, place)
        kept = truncate(prompt, [reply], limits, stats, place, mode)
        if kept is None:
            continue
        p, (r,) = kept
        examples.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r, "prompt": row["prompt"]})
    if rows and not examples:  # (no rows at all: an empty eval split, already reported)
        raise DataError(f"{source}: no example left after truncation_mode={mode!r} ({dict(stats)})")
    return examples, stats


def tokenize_pairs(rows: list[dict], tokenizer, limits, source: str, mode: str = "keep_end"):
    """Preference rows to ``{"chosen": example, "rejected": example}``, both with the same prompt
    (truncated together, so the pair still differs only in the reply)."""
    stats, examples, eot = Counter(), [], end_of_turn(tokenizer)
    for i, row in enumerate(rows, start=1):
        place = origin(row, source, i)
        prompt = prompt_ids(tokenizer, row["prompt"], place)
        replies = [reply_ids(tokenizer, row["prompt"], prompt, row[k], eot, place) for k in ("chosen", "rejected")]
        kept = truncate(prompt, replies, limits, stats, place, mode)
        if kept is None:
            continue
        p, (c, r) = kept
        if c == r:  # truncation can cut two replies down to the same prefix
            stats["identical_after_truncation"] += 1
            continue
        example = {side: {"input_ids": p + ids, "labels": [IGNORE] * len(p) + ids}
                   for side, ids in (("chosen", c), ("rejected", r))}
        examples.append({**example, "prompt": row["prompt"]})
    if rows and not examples:  # (no rows at all: an empty eval split, already reported)
        raise DataError(f"{source}: no pair left after truncation_mode={mode!r} ({dict(stats)})")
    return examples, stats


def tokenize_prompts(rows: list[dict], tokenizer, limits, source: str, mode: str = "keep_end"):
    """Prompt rows to ``{"prompt_ids": [...], "prompt": messages, "row": other fields}`` for
    sampling (``row`` keeps e.g. a toy task's ``answer`` for reward functions). A prompt must leave
    room for a response: it is held to ``max_prompt_length``."""
    stats, examples = Counter(), []
    for i, row in enumerate(rows, start=1):
        place = origin(row, source, i)
        kept = truncate(prompt_ids(tokenizer, row["prompt"], place), [], limits, stats, place, mode)
        if kept is None:
            continue
        extra = {k: v for k, v in row.items() if k not in ("prompt", "origin")}
        examples.append({"prompt_ids": kept[0], "prompt": row["prompt"], "row": extra})
    if rows and not examples:  # (no rows at all: an empty eval split, already reported)
        raise DataError(f"{source}: no prompt left after truncation_mode={mode!r} ({dict(stats)})")
    return examples, stats


# a trainer's ``row_format`` -> the function that tokenizes its rows
TOKENIZERS = {"sft": tokenize_sft, "pref": tokenize_pairs, "prompt": tokenize_prompts}


def load_examples(cfg, split: str, shape: str, tokenizer) -> list[dict]:
    """The tokenized examples of ``cfg.datasets``' ``split`` in row ``shape``, warned about what
    truncation and templating dropped or cut."""
    from omegaconf import OmegaConf

    examples = []
    for name in cfg.datasets:
        rows = load_rows(name, split, shape, paths=OmegaConf.to_container(cfg.data.paths),
                         keys=OmegaConf.to_container(cfg.data.columns))
        source = f"{name} ({split})"
        tokenized, stats = TOKENIZERS[shape](rows, tokenizer, cfg, source, cfg.data.truncation_mode)
        if sum(stats.values()):
            log.warning(f"{source}: of {len(rows)} rows, " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in stats.items()))
        examples += tokenized
    return examples
