"""Packing, attention and model configs on the architectures users bring, not just the tiny Llama.

For each architecture a tiny random-init model is built through ``models.load_model`` (the
trainer's path) and either packs correctly (packed per-token log-probs, through the trainer's own
``token_logps``, equal each sequence run alone in fp32) or is refused by the packing self-check
with its documented message (``packing=auto``: padded instead).
"""

import random

import pytest
import torch
from omegaconf import OmegaConf

import models
from conftest import fast_overrides, make_cfg, run_ranks
from data.packing import pack
from helpers import random_sequences
from logprobs import token_logps
from trainers import TRAINERS, per_sequence

VOCAB = 262
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)

# model_type -> the init: of a model YAML. Gemma-2's attention cap is tiny so that it bites on random init. Sequences below are up to 22 tokens long, so Mistral's
# window of 4 and Gemma's sliding layers really slide.
ARCHITECTURES = {
    "llama": dict(SMALL, intermediate_size=128, num_key_value_heads=2),
    "qwen2": dict(SMALL, intermediate_size=128, num_key_value_heads=2),
    "mistral": dict(SMALL, intermediate_size=128, num_key_value_heads=2, sliding_window=4),
    "gpt_neox": dict(SMALL, intermediate_size=128),
    "gemma2": dict(SMALL, intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=4,
                   attn_logit_softcapping=0.05, final_logit_softcapping=30.0),
    "gemma3_text": dict(SMALL, intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(SMALL, intermediate_size=128, num_key_value_heads=2, pad_token_id=0),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                word_embed_proj_dim=64, max_position_embeddings=128),
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
}
# transformers 5.19 builds their causal mask without position_ids: packed sequences see each other
LEAKS = {"opt", "falcon"}


def model_cfg(model_type: str, **extra):
    return OmegaConf.create({"name": model_type, "name_or_path": None, "archive": None, "fsdp_policy_mp": "float32",
                             "attn_implementation": "auto", "init": {"model_type": model_type, **ARCHITECTURES[model_type]},
                             **extra})


def alone_logps(model, seq) -> torch.Tensor:
    """Summed log p of the response tokens of one sequence run by itself, written out plainly."""
    ids = torch.tensor([seq["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    return sum(logp[t, label] for t, label in enumerate(seq["labels"][1:]) if label >= 0)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_equals_alone_or_the_self_check_refuses(model_type):
    model = models.load_model(model_cfg(model_type), torch.device("cpu"), seed=0).eval()
    seqs = random_sequences(6, random.Random(1), vocab=VOCAB)
    batch = pack(seqs, 44, pad_id=0)
    assert batch["input_ids"].shape[0] < len(seqs)  # sequences really share rows
    with torch.no_grad():
        packed = per_sequence(token_logps(model, batch)[0], batch["seq_ids"], len(seqs))
        alone = torch.stack([alone_logps(model, s) for s in seqs])
        error = models.packing_error(model, torch.device("cpu"))
        # bf16: the check compares like with like, so rounding cannot read as a leak nor hide one
        error_bf16 = models.packing_error(model.to(torch.bfloat16), torch.device("cpu"))
    if model_type in LEAKS:
        assert (packed - alone).abs().max() > 1e-2  # the leak is real ...
        assert min(error, error_bf16) > models.PACKING_TOLERANCE  # ... and the self-check sees it
    else:
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
        assert max(error, error_bf16) < 1e-5


def build_run(rank, world, overrides):
    cfg = make_cfg(*overrides)
    try:
        trainer = TRAINERS[cfg.loss.trainer](cfg, torch.device("cpu"))
    except models.ConfigError as e:
        return f"refused: {e}"
    return f"packs={trainer.models.packs}"


@pytest.mark.parametrize("packing", ["true", "auto"])
def test_trainer_refuses_or_pads_a_model_that_leaks_across_packed_rows(tmp_path, packing):
    init = OmegaConf.to_container(model_cfg("opt").init)
    overrides = fast_overrides(tmp_path / "run") + ["model=blank_model", "model.fsdp_policy_mp=float32",
                                                   "model.tokenizer_name_or_path=tokenizer/tiny", f"packing={packing}"]
    overrides += [f"+model.init.{k}={v}" for k, v in init.items()]
    out = run_ranks(build_run, 2, tmp_path, overrides)
    if packing == "true":
        assert out[0].startswith("refused: OPTForCausalLM (model_type opt, attention sdpa) attends across packed sequences")
        assert "set packing=false (or packing=auto" in out[0]
    else:
        assert out == ["packs=False", "packs=False"]
    # a model that packs correctly keeps packing
    assert run_ranks(build_run, 1, tmp_path, fast_overrides(tmp_path / "tiny") + [f"packing={packing}"]) == ["packs=True"]


def test_gemma2_soft_capping_is_applied_as_eager_computes_it():
    from transformers import AutoModelForCausalLM

    cfg = model_cfg("gemma2")
    cfg.init.initializer_range = 0.5  # weights large enough that attention scores reach the cap
    auto = models.load_model(cfg, torch.device("cpu"), seed=0).eval()
    assert auto.config._attn_implementation == "eager"
    # a config each: the attention implementation is read from the model's config at every forward
    eager = AutoModelForCausalLM.from_config(models.model_config(cfg), attn_implementation="eager").eval()
    sdpa = AutoModelForCausalLM.from_config(models.model_config(cfg), attn_implementation="sdpa").eval()
    eager.load_state_dict(auto.state_dict())
    sdpa.load_state_dict(auto.state_dict())
    ids = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, dropped = (m(input_ids=ids, use_cache=False).logits for m in (auto, eager, sdpa))
    torch.testing.assert_close(got, want)
    assert (got - dropped).abs().max() > 1e-2  # sdpa (what auto picked before) computes without the cap


def test_an_attention_that_drops_soft_capping_is_refused():
    with pytest.raises(models.ConfigError, match="ignores gemma2's attention logit soft-capping"):
        models.load_model(model_cfg("gemma2", attn_implementation="sdpa"), torch.device("cpu"))
    with pytest.raises(models.ConfigError, match="needs CUDA and the flash_attn package"):
        models.load_model(model_cfg("llama", attn_implementation="flash_attention_2"), torch.device("cpu"))
    assert models.load_model(model_cfg("llama", attn_implementation="eager"), torch.device("cpu")).config._attn_implementation == "eager"


def test_model_init_holds_nested_lists_and_dicts():
    cfg = model_cfg("llama")
    cfg.init.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    model = models.load_model(cfg, torch.device("cpu"))
    assert type(model.config.rope_scaling if hasattr(model.config, "rope_scaling") else model.config.rope_parameters) is dict
    gemma = models.load_model(model_cfg("gemma3_text"), torch.device("cpu"))
    assert gemma.config.layer_types == ["sliding_attention", "full_attention"]
