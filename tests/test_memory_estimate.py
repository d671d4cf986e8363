"""scripts/memory_estimate.py counts what transformers builds: its parameter count equals
``sum(p.numel())`` of the model, its activation count equals the bytes autograd saves, its
logits term equals the CPU allocator's peak while log-probs are computed and differentiated, and
QLoRA's NF4 terms equal a torchao NF4Tensor's storage and the allocator's peak while it dequantizes."""

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


# --- QLoRA: the base's decoder linears in torchao's NF4 -----------------------------------------


def to_nf4(weight, scaler_block: int):
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4(weight, me.NF4_BLOCK, scaler_block)


@pytest.mark.parametrize("shape, dtype, scaler_block", [((1024, 4096), torch.float32, 256),  # Llama-3-8B's k_proj
                                                        ((1024, 512), torch.float32, 64),
                                                        ((512, 256), torch.bfloat16, 256)])
def test_nf4_bytes_are_what_an_nf4_tensor_stores(shape, dtype, scaler_block):
    """The packed 4-bit indices, the int8 scalers, a factor per scaler block, the scalers' mean and
    the 16-entry table: every inner tensor the NF4Tensor flattens to."""
    w = to_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype), scaler_block)
    inner, _ = w.__tensor_flatten__()
    assert sorted(inner) == ["nf4", "quantization_factor", "quantized_data", "quantized_scalers", "scaler_mean"]
    stored = sum(getattr(w, name).untyped_storage().nbytes() for name in inner)
    n = shape[0] * shape[1]
    assert w.quantized_data.untyped_storage().nbytes() == n // 2 and w.quantized_scalers.numel() == n // 64
    assert w.quantization_factor.numel() == n // (64 * scaler_block) and w.scaler_mean.numel() == 1
    assert stored == me.nf4_bytes(n, dtype.itemsize, scaler_block=scaler_block)
    if (dtype, scaler_block) == (torch.float32, 64):  # the trainer's (models.NF4_SCALE_BLOCK)
        # 0.5166 bytes a weight; the mean and the table, 68 bytes a tensor, on top
        assert stored == 0.5 * n + n / 64 + 4 * n / (64 * 64) + 4 + 16 * 4
        assert me.nf4_bytes(n) == stored  # the estimate's defaults


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequantization_is_the_allocator_peak(dtype):
    """A linear with an NF4 weight (as models.quantize_base makes it), bf16 input: its forward and
    its backward each dequantize the whole weight, and that is each one's peak: 20 bytes a weight
    quantized from fp32 (14 from bf16), not the bf16 weight's 2."""
    rows, cols = 256, 1024
    linear = torch.nn.Linear(cols, rows, bias=False)
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(dtype)
    linear.weight = torch.nn.Parameter(to_nf4(weight, me.NF4_SCALER_BLOCK), requires_grad=False)
    x = torch.randn(4, cols, dtype=torch.bfloat16, requires_grad=True)
    forward = allocator_peak(lambda: linear(x))
    y = linear(x)
    backward = allocator_peak(lambda: y.backward(torch.ones_like(y)))
    expected = me.dequantize_bytes(rows * cols, dtype.itemsize)
    per_weight = {torch.float32: 20, torch.bfloat16: 14}[dtype]  # int64 nibbles 8, then 3 in the weight's dtype
    assert expected == per_weight * rows * cols + dtype.itemsize * rows * cols // 64  # + the dequantized scalers
    assert forward == pytest.approx(expected, rel=1e-3)
    assert backward == pytest.approx(expected, rel=1e-3)


def test_qlora_stores_the_decoder_linears_in_nf4():
    """Llama-3-8B: 32 layers of q, o [4096, 4096], k, v [4096, 1024], gate, up, down [4096, 14336],
    each 0.5166 bytes a weight in place of fp32's 4; the adapters, the reference (none), the
    activations and the logits as with LoRA; the gathered policy layer's linears in NF4."""
    a = me.Arch.from_config(me.ARCHS["llama3_8b"])
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    linears = 32 * per_layer  # 6.98e9 of the 8.03e9
    bytes_per_weight = 0.5 + 1 / 64 + 4 / (64 * 64)
    for stage in ("dpo", "ppo"):
        lora = me.estimate("llama3_8b", stage, 8, 80, ["lora.r=16"])
        qlora = me.estimate("llama3_8b", stage, 8, 80, ["lora.r=16", "lora.load_in_4bit=true"])
        assert qlora["nf4_parameters"] == linears and qlora["lora_parameters"] == lora["lora_parameters"]
        for ac in ("no_checkpointing", "activation_checkpointing"):
            lo, q = lora[ac], qlora[ac]

            def states(parts):
                return (parts["trained_states"] + parts["frozen_weights"]) * me.GIB

            assert states(q) == pytest.approx(states(lo) - (4 - bytes_per_weight) * linears / 8, rel=1e-4)
            assert q["frozen_weights"] == lo["frozen_weights"]  # only the policy is quantized
            for same in ("activations", "logits", "vllm_engine"):
                assert q[same] == lo[same]
            assert q["dequantized"] * me.GIB == pytest.approx(20.0625 * 4096 * 14336)  # gate or up, from fp32
            if stage == "dpo":  # two gathered policy layers, their linears in NF4
                assert q["layer_buffers"] * me.GIB == pytest.approx(
                    lo["layer_buffers"] * me.GIB - 2 * (2 - bytes_per_weight) * per_layer, rel=1e-4)
            else:  # the critic's bf16 layer is the largest gathered now, and its whole gradient
                layer = per_layer + 2 * 4096  # and the two norms
                assert q["layer_buffers"] * me.GIB == 2 * 2 * layer + 6 * layer
                assert lo["layer_buffers"] * me.GIB == 2 * (2 * layer + 2 * lora["lora_parameters"] / 32) + 6 * layer
    assert qlora["no_checkpointing"]["frozen_weights"] * me.GIB == pytest.approx(4 * (me.parameters(a) + 4096) / 8)


def test_qlora_needs_lora_and_loads_on_every_rank():
    with pytest.raises(ValueError, match="lora.r"):
        me.estimate("llama3_8b", "sft", 8, 80, ["lora.load_in_4bit=true"])
    n = me.parameters(me.Arch.from_config(me.ARCHS["llama3_8b"]))
    assert me.estimate("llama3_8b", "sft", 8, 80, ["lora.r=16"])["host_load_gib"]["now"] * me.GIB == 4 * n
    host = me.estimate("llama3_8b", "sft", 8, 80, ["lora.r=16", "lora.load_in_4bit=true"])["host_load_gib"]
    assert host["now"] * me.GIB == 8 * 4 * n  # each of the node's 8 ranks loads the fp32 model to quantize it


def test_nf4_blocks_are_the_trainers():
    import models

    assert (me.NF4_BLOCK, me.NF4_SCALER_BLOCK) == (models.NF4_BLOCK, models.NF4_SCALE_BLOCK)
