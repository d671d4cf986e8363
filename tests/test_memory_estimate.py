"""scripts/memory_estimate.py counts what transformers builds: its parameter count equals
``sum(p.numel())`` of the model, its activation count equals the bytes autograd saves, and its
logits term equals the CPU allocator's peak while log-probs are computed and differentiated."""

import itertools
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

import logprobs
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


# The sizes the model cards give, so that a mistyped key in ARCHS cannot pass as another model.
PUBLISHED = {"llama3_8b": 8.03e9, "qwen2_5_7b": 7.62e9, "mistral7b": 7.24e9, "llama3_70b": 70.6e9}


@pytest.mark.parametrize("name", me.ARCHS)
def test_parameter_count_of_the_hub_configs(name):
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        model = build(me.ARCHS[name])
    n = sum(p.numel() for p in model.parameters())
    assert me.parameters(me.Arch.from_config(me.ARCHS[name])) == n
    assert n == pytest.approx(PUBLISHED[name], rel=1e-3)


def test_every_model_in_archs_has_a_model_config():
    """``model=<name>`` is how both train.py and the estimate pick a model."""
    for name in me.ARCHS:
        assert make_cfg(f"model={name}").model.name == name


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


# --- the LM head's peak, measured -----------------------------------------------------------------

HEAD = dict(model_type="llama", vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # the logits dominate
HEAD_TOKENS = 512


def allocator_peak(fn) -> int:
    """The most bytes ``fn`` had allocated at once beyond what it started with: the profiler records
    every CPU allocation and free, in order, on this thread (CPU autograd runs on the caller's)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events))


def head_step(model, batch, stage: str, chunk):
    """What each trainer's training forward does with log-probs, then its backward."""
    def step():
        if stage == "dpo":  # the resident reference runs after the policy's forward
            logps, _ = logprobs.token_logps(model, batch, chunk)
            with torch.no_grad():
                ref, _ = logprobs.token_logps(model, batch, chunk)
            loss = (logps - ref).sum()
        elif stage == "sft":
            loss = logprobs.token_logps(model, batch, chunk)[0].sum()
        else:  # RL: the entropy always, differentiated only with entropy_coef > 0
            grad = stage == "ppo, entropy_coef > 0"
            logps, _, entropy = logprobs.token_logps(model, batch, chunk, with_entropy=True, entropy_grad=grad)
            loss = logps.sum() + (entropy.sum() if grad else 0)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return allocator_peak(step)


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo", "ppo, entropy_coef > 0"])
def test_logits_term_is_the_allocator_peak(stage):
    """Everything but the LM head is the same between two chunk sizes, and between chunked and
    full logits up to the hidden state's gradient (2 x tokens x hidden, not counted): the peaks'
    differences are the estimate's logits terms' differences. The independent count: 12 bytes
    per entry of one chunk (24 with the entropy's gradient), plus the LM head's bf16 gradient."""
    torch.manual_seed(0)
    model = build(HEAD, dtype=torch.bfloat16, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    vocab, hidden, tokens = HEAD["vocab_size"], HEAD["hidden_size"], HEAD_TOKENS
    batch = {"input_ids": torch.randint(vocab, (1, tokens), generator=g), "position_ids": torch.arange(tokens)[None],
             "targets": torch.randint(vocab, (1, tokens), generator=g)}
    peaks = {chunk: head_step(model, batch, stage, chunk) for chunk in (None, 128, 256)}

    a = me.Arch.from_config(HEAD)
    name, entropy_grad = stage.split(",")[0], "entropy_coef" in stage

    def modelled(chunk):
        per_entry = me.head_bytes(name, bool(chunk), resident_reference=name == "dpo", entropy_grad=entropy_grad)
        return me.logits_bytes(me.Stage(name, ("policy",), (), tokens, chunk, per_entry), a)

    per_entry = 24 if entropy_grad else 12
    assert modelled(256) - modelled(128) == per_entry * 128 * vocab
    assert peaks[256] - peaks[128] == pytest.approx(modelled(256) - modelled(128), rel=2e-3)
    assert modelled(128) == per_entry * 128 * vocab + 2 * vocab * hidden
    full_per_entry = {"sft": 12, "dpo": 14, "ppo": 18, "ppo, entropy_coef > 0": 24}[stage]
    assert modelled(None) == full_per_entry * tokens * vocab
    assert peaks[None] - peaks[128] == pytest.approx(modelled(None) - modelled(128), abs=2 * tokens * hidden + 2**16)


def test_logits_follow_logprob_chunk_tokens():
    """min(T, C) positions of the vocabulary, plus the LM head's gradient while several chunks run;
    the whole micro-batch with logprob_chunk_tokens=null, where DPO's reference overlaps the
    policy's kept log-softmax and RL's entropy takes three more fp32 copies."""
    a = me.Arch.from_config(me.ARCHS["llama3_8b"])
    v, head_grad = a.vocab, 2 * a.vocab * a.hidden

    def logits(stage, *overrides):
        return me.estimate("llama3_8b", stage, 8, 80, list(overrides))["no_checkpointing"]["logits"] * me.GIB

    cfg = make_cfg("loss=sft")
    assert cfg.logprob_chunk_tokens == 2048
    sft_tokens = cfg.batch_size // 8 * cfg.max_length  # 4096: two chunks
    assert logits("sft") == pytest.approx(12 * 2048 * v + head_grad)
    assert logits("sft", "logprob_chunk_tokens=8192") == pytest.approx(12 * sft_tokens * v)  # one chunk
    assert logits("sft", "logprob_chunk_tokens=null") == pytest.approx(12 * sft_tokens * v)
    assert logits("dpo") == pytest.approx(12 * 2048 * v + head_grad)
    assert logits("dpo", "logprob_chunk_tokens=null") == pytest.approx(14 * 2 * sft_tokens * v)
    assert logits("dpo", "logprob_chunk_tokens=null", "loss.precompute_ref_logps=true") == pytest.approx(
        12 * 2 * sft_tokens * v)
    ppo = make_cfg("loss=ppo")
    ppo_tokens = ppo.batch_size // 8 * (ppo.max_prompt_length + ppo.loss.sampling.max_new_tokens)
    assert logits("ppo") == pytest.approx(12 * 2048 * v + head_grad)
    assert logits("ppo", "loss.entropy_coef=0.01") == pytest.approx(24 * 2048 * v + head_grad)
    assert logits("ppo", "logprob_chunk_tokens=null") == pytest.approx(18 * ppo_tokens * v)


def test_reshard_after_forward_false_keeps_every_layer_gathered():
    """Each model's layers in bf16, plus the one layer's gradient being reduced (bf16 and fp32)."""
    a = me.Arch.from_config(me.ARCHS["llama3_8b"])
    layer = me.layer_params(a)
    default = me.estimate("llama3_8b", "dpo", 8, 80, [])["no_checkpointing"]["layer_buffers"] * me.GIB
    kept = me.estimate("llama3_8b", "dpo", 8, 80, ["reshard_after_forward=false"])["no_checkpointing"]
    assert default == pytest.approx(10 * layer)
    assert kept["layer_buffers"] * me.GIB == pytest.approx(2 * (2 * 32 * layer) + 6 * layer)  # policy and reference


def test_host_memory_at_load():
    """Now rank 0's one fp32 copy per node (the shards too where ranks compute on CPU); before,
    each of the node's 8 ranks loaded a whole copy."""
    n = me.parameters(me.Arch.from_config(me.ARCHS["llama3_70b"]))
    host = me.estimate("llama3_70b", "sft", 16, 80, [], ranks_per_node=8)["host_load_gib"]
    assert host["rank0_copy"] * me.GIB == pytest.approx(4 * n)
    assert host["cpu_shards"] * me.GIB == pytest.approx(8 * 4 * n / 16)
    assert host["every_rank_a_copy"] * me.GIB == pytest.approx(8 * 4 * n)


def test_gpus_needed_is_the_first_count_that_fits():
    """Llama-3-70B's SFT does not fit 8 or 16 GPUs of 80 GiB even with activation checkpointing (its
    trained states alone are 16 x 70.6e9 / 8 bytes = 131 GiB per GPU on 8), and fits 32."""
    on_8 = me.estimate("llama3_70b", "sft", 8, 80, [])
    assert on_8["activation_checkpointing"]["trained_states"] * me.GIB == pytest.approx(
        16 * me.parameters(me.Arch.from_config(me.ARCHS["llama3_70b"])) / 8)
    assert on_8["gpus_needed"]["activation_checkpointing"] == 32
    assert me.estimate("llama3_70b", "sft", 16, 80, [])["activation_checkpointing"]["total_gib"] > 80
    assert me.estimate("llama3_70b", "sft", 32, 80, [])["activation_checkpointing"]["total_gib"] <= 80
    assert me.estimate("llama3_8b", "sft", 8, 80, [])["gpus_needed"]["activation_checkpointing"] == 8


def test_hf_sampler_holds_no_engine():
    assert me.estimate("llama3_8b", "ppo", 8, 80, ["sampler=hf"])["no_checkpointing"]["vllm_engine"] == 0


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_parameters_are_what_peft_adds(targets):
    from omegaconf import OmegaConf

    import models

    config = VARIANTS["llama"]
    model = build(config)
    base = sum(p.numel() for p in model.parameters())
    lora = OmegaConf.create({"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": targets, "modules_to_save": None})
    peft_model = models.add_lora(model, lora)
    added = sum(p.numel() for p in peft_model.parameters()) - base
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    a = me.Arch.from_config(config)
    assert a.layers * me.lora_layer_params(a, 8, targets) == added == trainable


def test_lora_holds_the_frozen_base_the_adapters_states_and_no_reference():
    a = me.Arch.from_config(me.ARCHS["llama3_8b"])
    full = me.estimate("llama3_8b", "dpo", 8, 80, [])["no_checkpointing"]
    lora = me.estimate("llama3_8b", "dpo", 8, 80, ["lora.r=16"])
    adapters = a.layers * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # q,o; k,v; gate,up,down
    assert lora["lora_parameters"] == adapters
    parts = lora["no_checkpointing"]
    assert parts["trained_states"] * me.GIB == pytest.approx((4 * me.parameters(a) + 16 * adapters) / 8)
    assert parts["frozen_weights"] == 0 and full["frozen_weights"] > 0  # the reference is the adapter-off policy
    assert parts["activations"] == full["activations"] and parts["logits"] == full["logits"]
