"""scripts/memory_estimate.py counts what transformers builds: its parameter count equals
``sum(p.numel())`` of the model, and its activation count equals the bytes autograd saves."""

import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, make_cfg

sys.path.insert(0, str(REPO / "scripts"))
import memory_estimate as me  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
VARIANTS = {
    "llama": dict(model_type="llama", **SMALL),
    "llama, attention bias, own head_dim, tied": dict(model_type="llama", **SMALL | dict(
        attention_bias=True, head_dim=48, tie_word_embeddings=True)),
    "qwen2 (q/k/v bias)": dict(model_type="qwen2", **SMALL),
    "mistral, no GQA": dict(model_type="mistral", **SMALL | dict(num_key_value_heads=4)),
}


def build(config: dict, **kwargs):
    c = dict(config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c), **kwargs)


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_count_of_small_models(name):
    model = build(VARIANTS[name])
    assert me.parameters(me.Arch.from_config(VARIANTS[name])) == sum(p.numel() for p in model.parameters())


def test_parameter_count_of_the_tiny_model():
    init = dict(make_cfg("model=tiny").model.init)
    assert me.parameters(me.Arch.from_config(init)) == sum(p.numel() for p in build(init).parameters())


@pytest.mark.parametrize("name", me.ARCHS)
def test_parameter_count_of_the_7b_8b_configs(name):
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        model = build(me.ARCHS[name])
    n = sum(p.numel() for p in model.parameters())
    assert me.parameters(me.Arch.from_config(me.ARCHS[name])) == n
    assert 7e9 < n < 8.1e9


def saved_activation_bytes(model, tokens: int) -> int:
    """Bytes of the distinct tensors, other than parameters, that a forward pass saves for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, position_ids=torch.arange(tokens)[None], use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("layers", [1, 3])
def test_activation_bytes_are_what_autograd_saves(name, layers):
    """In bf16 with sdpa (flash kernel: one causal sequence, no mask), as a GPU run computes."""
    config = VARIANTS[name] | dict(num_hidden_layers=layers)
    torch.manual_seed(0)
    model = build(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    tokens = 48
    expected = tokens * me.activation_bytes(me.Arch.from_config(config), checkpointing=False)
    assert saved_activation_bytes(model, tokens) == expected


def test_stages_follow_the_configs():
    """DPO holds a reference unless its log-probs are precomputed, PPO a critic only with GAE;
    activation checkpointing shrinks activations and nothing else."""
    a = me.Arch.from_config(me.ARCHS["llama3_8b"])
    dpo = me.estimate("llama3_8b", "dpo", 8, 80, [])
    precomputed = me.estimate("llama3_8b", "dpo", 8, 80, ["loss.precompute_ref_logps=true"])
    assert dpo["no_checkpointing"]["frozen_weights"] * me.GIB == pytest.approx(4 * me.parameters(a) / 8)
    assert precomputed["no_checkpointing"]["frozen_weights"] == 0
    cfg = make_cfg("loss=dpo")
    pairs_per_rank = cfg.batch_size // 8 // cfg.gradient_accumulation_steps
    assert dpo["tokens_per_micro_batch"] == 2 * pairs_per_rank * cfg.max_length  # both replies at full length

    sft = me.estimate("llama3_8b", "sft", 8, 80, [])
    ppo = me.estimate("llama3_8b", "ppo", 8, 80, [])
    grpo = me.estimate("llama3_8b", "grpo", 8, 80, [])
    assert grpo["no_checkpointing"]["trained_states"] == sft["no_checkpointing"]["trained_states"]
    assert ppo["no_checkpointing"]["trained_states"] > 1.9 * sft["no_checkpointing"]["trained_states"]

    off, on = sft["no_checkpointing"], sft["activation_checkpointing"]
    assert on["activations"] < off["activations"] / 10
    assert without_activations(on) == without_activations(off)


def without_activations(parts: dict) -> dict:
    return {k: v for k, v in parts.items() if k not in ("activations", "total_gib")}
