"""Task accuracy by greedy decoding with HF ``generate``, for the toy tasks' verifiers.

Single-process and unsharded: it evaluates an exported model directory (``<run_dir>/LATEST``) or a
random-init model config, which is what the demo prints before and after each stage.
"""

from __future__ import annotations

import torch

from data.tokenize import prompt_ids


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    model.eval()
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(map(len, ids))
        # left padding, so every prompt ends where generation starts
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def task_accuracy(model, tokenizer, rows: list[dict], reward_fn, max_new_tokens: int = 16) -> float:
    completions = generate_greedy(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens)
    return sum(reward_fn(r["prompt"], c) for r, c in zip(rows, completions)) / len(rows)
