"""Expected memory per GPU of SFT, DPO and PPO with the default configs: computed, not measured.

    python scripts/memory_estimate.py [--gpus 8] [--gpu-gib 80] [--ranks-per-node 8] \
        [--models llama3_8b,qwen2_5_7b,mistral7b,llama3_70b] [--out memory_estimate.json] \
        [-- extra hydra overrides, e.g. batch_size=128]

The training config of each stage is what ``train.py model=<m> loss=<sft|dpo|ppo|grpo> <overrides>``
would run (config/config.yaml, config/loss/, config/sampler/), on ``--gpus`` ranks. The model
shapes are in ``ARCHS`` (each model's config.json on the hub; nothing is downloaded), or a model
config's ``init`` (model=tiny). Every model is sharded with FSDP2 over all ranks, keeps fp32
parameters and computes in bf16 (``model.fsdp_policy_mp``). Counted, at the peak of a training
step (the policy's LM head, at the end of its forward or the start of its backward), P
parameters, N ranks, T tokens in a rank's micro-batch, C = ``logprob_chunk_tokens``:

- trained model (the policy; PPO's critic): fp32 parameters, fp32 gradients and AdamW's two fp32
  states, sharded: 16 P / N bytes. The critic is the reward model's class, whose LM head is kept
  but gets no gradient, so neither gradient nor optimizer state;
- with LoRA (``-- lora.r=16``): the policy's base frozen in fp32 (4 P / N) and 16 bytes per adapter
  parameter (r (d_in + d_out) per adapted linear), gradients only for the adapters, and no
  reference model (the policy with its adapters off);
- with QLoRA (``-- lora.r=16 lora.load_in_4bit=true``; needs ``lora.r`` > 0): as LoRA, but every
  nn.Linear weight inside the policy's decoder layers (q, k, v, o, gate, up, down, adapted or not;
  their biases not) is a torchao ``NF4Tensor`` quantized from the loaded weights (``model.load_dtype``):
  4 bits a weight, an int8 absmax scaler per block of ``NF4_BLOCK`` (64) weights, one factor in
  load_dtype per ``NF4_SCALER_BLOCK`` (64) scalers, and per tensor the scalers' mean and the
  16-entry NF4 table (``nf4_bytes``: 0.5166 bytes a weight). Embeddings, LM head, norms and biases
  stay in load_dtype; the other models (critic, reward model) are not quantized. FSDP2 shards the
  NF4 tensors by rows and all-gathers them in NF4, so a gathered policy layer is ``nf4_bytes`` for
  its linears plus 2 bytes for the rest. Each linear dequantizes its whole weight while it runs
  and again in its backward (torchao's ``LinearNF4`` saves only the NF4 weight), both transient,
  never at once: ``dequantize_bytes``, 8 + 3 x load_dtype bytes a weight of the largest linear
  (20 in fp32: torchao's eager ``get_original_weight`` holds the two int64 nibble indices, the
  looked-up values, the scaled values and the result at once; the cast to bf16, 6, comes after),
  the CPU allocator's peak, measured in tests/test_memory_estimate.py. It happens inside a decoder
  layer, not at the LM head, but is counted on top (``dequantized``): an upper bound by that much;
- frozen model (DPO's and PPO's reference, PPO's reward model): fp32 parameters, 4 P / N;
- root of every model (embeddings, LM head, final norm), gathered in bf16: 2 x its parameters.
  FSDP2 does not reshard the root after forward (it expects the backward pass), so a frozen
  model's root stays gathered after its first forward;
- decoder-layer buffers: two layers gathered in bf16 (the current one and the prefetched next;
  the largest of the stage's models') and one layer's gradient in bf16 and again in fp32 for the
  reduce-scatter: 10 x layer params (a LoRA policy's gradient: the adapters' only). With
  ``reshard_after_forward=false`` every model keeps all its layers gathered after a forward (a
  frozen model for good): 2 x layers x layer params per model (QLoRA's policy: in NF4), plus the
  one layer's gradient;
- activations: the tensors autograd saves, per token and decoder layer in bf16 (``layer_activation_bytes``:
  the count matches what a layer saves, measured in tests/test_memory_estimate.py); with
  activation checkpointing each layer keeps only its input (2 x hidden) and one layer is
  recomputed at a time. T is the bound: every sequence of the micro-batch at full length;
- logits (``head_bytes``), bytes per [position, vocab] entry over min(T, C) positions (T with
  ``logprob_chunk_tokens=null``). Chunked, each chunk runs under a non-reentrant checkpoint, so
  forward keeps only per-token log-probs; the peak is one chunk's backward, which recomputes the
  chunk and then holds the fp32 log-softmax the recomputation saved, cross-entropy's gradient of
  it and log-softmax's gradient of the logits: 12 bytes (the bf16 logits and their fp32 copy are
  freed when the recomputation ends; the fp32-to-bf16 gradient, 6 bytes, comes after). RL's
  entropy without a gradient (``entropy_coef=0``) is transient in forward (fp32 logits, softmax,
  their product: 12 bytes); with a gradient the recomputation also keeps the fp32 logits and
  the softmax, and their gradients: 24. After the first chunk the LM head's bf16 gradient,
  accumulated over the chunks, exists too: + 2 x vocab x hidden. Full logits (C = null): 12 for
  SFT; DPO's reference runs its forward while the policy's log-softmax is kept: 4 + 10 = 14; RL's
  entropy of the full logits takes another fp32 copy, a softmax and their product while the
  bf16 logits and the kept log-softmax exist: 18 (24 with its gradient). Each of these is the CPU
  allocator's peak, measured in tests/test_memory_estimate.py; CUDA runs the same decomposition
  (log_softmax + nll_loss, each backward allocating its output), not yet measured there;
- PPO's vLLM engine on every GPU: ``sampler.gpu_memory_utilization`` x GPU memory when
  ``sampler.kv_cache_memory_bytes`` is null (the GPU setting), at least its bf16 weights (2 P,
  one whole model per GPU: ``tensor_parallel_size`` is not modelled); with the config's default
  (an explicit KV cache size, for CPU) bf16 weights (2 P) plus that cache; nothing with
  ``sampler.sleep_mode=true`` (freed while training) or ``sampler=hf``.

Not counted: the CUDA context, NCCL's buffers, allocator fragmentation, vLLM's own activations,
the hidden state's gradient (2 T hidden bytes), and the optimizer step's temporaries, which come
after activations and logits are freed.

Host memory per node while loading (``host_load``), ``--ranks-per-node`` ranks: ``models.build_sharded``
has every rank build the model on the meta device and rank 0 alone load it (``model.load_dtype``,
fp32) and send each rank its shard one parameter at a time, so the node holds rank 0's one copy
(load_dtype bytes x P; the page cache of the safetensors files comes on top, reclaimable); the
shards go to the GPUs, and stay on the host only when the ranks compute on CPU (then another
ranks-per-node / N of a copy). Before, every rank loaded the whole model: ranks-per-node copies.
With ``cpu_offload=true`` every rank still does (not modelled here). With QLoRA
(``lora.load_in_4bit=true``) there is no load-once either: the NF4 scalers' statistics (the mean
above all) are of the whole tensor, so every rank loads the whole model in load_dtype and quantizes
it itself, and the node's peak (``now``) is ranks-per-node whole copies in load_dtype, as before
load-once (the NF4 copy, about 0.13 of it, and one weight's quantization temporaries on top).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# The keys of each model's config.json on the hub that fix its parameter count.
ARCHS = {
    "llama3_8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False),
    "qwen2_5_7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
    "mistral7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      tie_word_embeddings=False),
    "llama3_70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       tie_word_embeddings=False),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# QLoRA's NF4 (torchao ``to_nf4(weight, NF4_BLOCK, NF4_SCALER_BLOCK)``): weights per absmax block,
# and absmax scalers per block of their own int8 quantization
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 64  # models.NF4_SCALE_BLOCK (tests/test_memory_estimate.py checks they agree)


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder (Llama, Mistral, Qwen2): pre-norm RMSNorm, rotary GQA attention, SwiGLU."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool  # Qwen2 always; Llama with attention_bias
    o_bias: bool  # Llama with attention_bias

    @classmethod
    def from_config(cls, c: dict) -> Arch:
        """From a transformers config dict (config.json's keys, or a model config's ``init``)."""
        if c["model_type"] not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"model_type={c['model_type']!r}: only llama, mistral and qwen2 are modelled")
        llama_bias = c["model_type"] == "llama" and c.get("attention_bias", False)
        return cls(model_type=c["model_type"], vocab=c["vocab_size"], hidden=c["hidden_size"],
                   intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   tied=c.get("tie_word_embeddings", False), qkv_bias=c["model_type"] == "qwen2" or llama_bias,
                   o_bias=llama_bias)


# --- parameters ---------------------------------------------------------------------------------


def layer_params(a: Arch) -> int:
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    attention = a.hidden * q + 2 * a.hidden * kv + q * a.hidden
    attention += (q + 2 * kv) * a.qkv_bias + a.hidden * a.o_bias
    return attention + 3 * a.hidden * a.intermediate + 2 * a.hidden  # gate, up, down; two norms


def head_params(a: Arch) -> int:
    """The LM head's own parameters: none when tied to the embeddings."""
    return 0 if a.tied else a.vocab * a.hidden


def root_params(a: Arch) -> int:
    """What FSDP2's root module holds: embeddings, LM head, final norm."""
    return a.vocab * a.hidden + head_params(a) + a.hidden


def parameters(a: Arch) -> int:
    return a.layers * layer_params(a) + root_params(a)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_sizes(a: Arch) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each nn.Linear in a decoder layer."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return {"q_proj": (a.hidden, q), "k_proj": (a.hidden, kv), "v_proj": (a.hidden, kv), "o_proj": (q, a.hidden),
            "gate_proj": (a.hidden, a.intermediate), "up_proj": (a.hidden, a.intermediate),
            "down_proj": (a.intermediate, a.hidden)}


def linear_weight_params(a: Arch) -> int:
    """A decoder layer's nn.Linear weights (no biases): what QLoRA stores in NF4."""
    return sum(i * o for i, o in linear_sizes(a).values())


def nf4_bytes(numel: int, dtype_bytes: int = 4, block: int = NF4_BLOCK, scaler_block: int = NF4_SCALER_BLOCK) -> int:
    """Storage of one torchao ``NF4Tensor`` of ``numel`` weights quantized from ``dtype_bytes``
    floats: two 4-bit indices a byte, an int8 scaler per block, a factor per block of (up to)
    ``scaler_block`` scalers, and per tensor the scalers' mean and the 16-entry NF4 table, the
    last three in the input's dtype. About 0.5166 bytes a weight."""
    blocks = numel // block
    scaler_blocks = -(-blocks // min(scaler_block, blocks))
    return numel // 2 + blocks + dtype_bytes * (scaler_blocks + 1 + 16)


def nf4_layer_bytes(a: Arch, dtype_bytes: int = 4) -> int:
    """A QLoRA decoder layer's linear weights in NF4, each its own tensor."""
    return sum(nf4_bytes(i * o, dtype_bytes) for i, o in linear_sizes(a).values())


def largest_linear(a: Arch) -> int:
    return max(i * o for i, o in linear_sizes(a).values())


def dequantize_bytes(numel: int, dtype_bytes: int = 4) -> int:
    """The peak of torchao's dequantization of an NF4 weight (``get_original_weight``, in the
    dtype it was quantized from): the int64 high and low nibbles (8 bytes a weight), the values
    looked up in the NF4 table, them scaled and the interleaved result (3 x dtype_bytes), and the
    dequantized scalers. The cast to bf16 comes after the temporaries are freed (dtype_bytes + 2)."""
    return (8 + 3 * dtype_bytes) * numel + dtype_bytes * (numel // NF4_BLOCK)


def lora_layer_params(a: Arch, r: int, targets) -> int:
    """A decoder layer's LoRA parameters: r (d_in + d_out) for each adapted linear (peft's
    ``all-linear`` is all seven; the LM head never)."""
    sizes = linear_sizes(a)
    names = LINEARS if targets == "all-linear" else list(targets)
    if unknown := set(names) - set(LINEARS):
        raise ValueError(f"lora.target_modules: {sorted(unknown)} not modelled (one of {', '.join(LINEARS)})")
    return sum(r * sum(sizes[n]) for n in names)


# --- activations (bytes per token, bf16 compute) -------------------------------------------------


def layer_activation_bytes(a: Arch) -> int:
    """What one decoder layer saves for backward, per token."""
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    norm = 4 * a.hidden + 4 + 2 * a.hidden + 2 * a.hidden  # fp32 input, rsqrt, normalised, scaled (bf16)
    attention = 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * a.heads  # q, k after RoPE, v, output; fp32 logsumexp
    mlp = 4 * 2 * a.intermediate  # gate, up, silu(gate), their product
    return 2 * norm + attention + mlp


def model_activation_bytes(a: Arch) -> int:
    """Saved once per model, per token: RoPE's cos and sin, the final norm, the token ids."""
    return 2 * 2 * a.head_dim + (8 * a.hidden + 4) + 8


def activation_bytes(a: Arch, checkpointing: bool) -> int:
    if checkpointing:  # every layer keeps its bf16 input; backward recomputes one layer at a time
        return a.layers * 2 * a.hidden + layer_activation_bytes(a) + model_activation_bytes(a)
    return a.layers * layer_activation_bytes(a) + model_activation_bytes(a)


# --- one stage ----------------------------------------------------------------------------------


@dataclass
class Stage:
    """The models a stage holds on every rank, and a rank's micro-batch."""

    name: str
    trained: tuple[str, ...]  # trained with AdamW: "policy", "critic"
    frozen: tuple[str, ...]  # "reference", "reward_model"
    tokens: int  # T: a rank's micro-batch, every sequence at full length
    chunk: int | None  # logprob_chunk_tokens; None: the full logits at once
    head_bytes: int  # per [position, vocab] entry at the LM head's peak; see the module docstring
    vllm_bytes: float = 0.0
    lora_layer: int = 0  # LoRA parameters per decoder layer of the policy (lora.r > 0); 0: full fine-tuning
    nf4_dtype_bytes: int = 0  # QLoRA (lora.load_in_4bit): bytes of the load_dtype the policy's base is quantized from


def head_bytes(name: str, chunked: bool, resident_reference: bool = False, entropy_grad: bool = False) -> int:
    if entropy_grad:
        return 24
    if chunked:
        return 12
    return {"sft": 12, "dpo": 14 if resident_reference else 12}.get(name, 18)  # RL: the entropy of the full logits


def stage_from_config(name: str, cfg, world: int, gpu_bytes: float, a: Arch) -> Stage:
    """The models and token counts ``train.py`` would run with ``cfg`` on ``world`` ranks."""
    if cfg.model.fsdp_policy_mp not in ("bfloat16", "auto") or cfg.cpu_offload:  # auto is bf16 on a GPU
        raise ValueError("modelled: model.fsdp_policy_mp=bfloat16 and cpu_offload=false only")
    per_rank = cfg.batch_size // world // cfg.gradient_accumulation_steps
    if per_rank == 0:
        raise ValueError(f"batch_size={cfg.batch_size} over {world} ranks x {cfg.gradient_accumulation_steps} "
                         f"micro-batches: an empty micro-batch")
    chunk, lora = cfg.logprob_chunk_tokens, cfg.lora
    if lora.get("load_in_4bit") and not lora.r:
        raise ValueError("lora.load_in_4bit=true quantizes the frozen base of a LoRA run: set lora.r (e.g. lora.r=16)")
    lora_layer = lora_layer_params(a, lora.r, lora.target_modules) if lora.r else 0
    nf4_dtype_bytes = DTYPE_BYTES[cfg.model.load_dtype] if lora.get("load_in_4bit") else 0
    lora_kw = dict(lora_layer=lora_layer, nf4_dtype_bytes=nf4_dtype_bytes)
    # with LoRA the reference is the policy with its adapters off: no model of its own
    reference = ("reference",) * (not lora.r)
    if name == "sft":
        return Stage("SFT", ("policy",), (), tokens=per_rank * cfg.max_length, chunk=chunk,
                     head_bytes=head_bytes(name, bool(chunk)), **lora_kw)
    if name == "dpo":
        resident = not cfg.loss.precompute_ref_logps and not cfg.loss.reference_free
        return Stage("DPO", ("policy",), reference * resident, tokens=2 * per_rank * cfg.max_length, chunk=chunk,
                     head_bytes=head_bytes(name, bool(chunk), resident_reference=resident), **lora_kw)
    if name in ("ppo", "grpo"):
        loss = cfg.loss
        return Stage(name.upper(), ("policy",) + ("critic",) * (loss.trainer == "PPOTrainer"),
                     reference * (loss.kl_coef > 0) + ("reward_model",),  # one reward model
                     tokens=per_rank * (cfg.max_prompt_length + loss.sampling.max_new_tokens), chunk=chunk,
                     head_bytes=head_bytes(name, bool(chunk), entropy_grad=loss.entropy_coef > 0),
                     vllm_bytes=vllm_bytes(cfg.sampler, gpu_bytes, a), **lora_kw)
    raise ValueError(f"stage {name!r}: one of sft, dpo, ppo, grpo")


def vllm_bytes(sampler, gpu_bytes: float, a: Arch) -> float:
    if sampler.name == "hf" or sampler.get("sleep_mode"):  # auto: vLLM, as on a GPU machine that has it
        return 0.0
    if sampler.get("kv_cache_memory_bytes") is None:  # vLLM refuses to start if its weights exceed the fraction
        return max(sampler.gpu_memory_utilization * gpu_bytes, 2 * parameters(a))
    return 2 * parameters(a) + sampler.kv_cache_memory_bytes


def sharded_state_bytes(role: str, a: Arch, lora_layer: int = 0, nf4_dtype_bytes: int = 0) -> int:
    """Bytes over all ranks of one model's parameters (and, if trained, gradients and AdamW states).
    The critic and the reward model are the reward model's class: the LM plus a scalar head; the
    critic's LM head gets no gradient, so neither gradient nor optimizer state. A LoRA policy:
    its frozen fp32 base, and 16 bytes per adapter parameter; QLoRA's base has its decoder
    linears' weights in NF4 (``nf4_dtype_bytes``: of the dtype they were quantized from)."""
    p = parameters(a)
    if role == "policy" and nf4_dtype_bytes:
        linears = a.layers * linear_weight_params(a)
        return 4 * (p - linears) + a.layers * nf4_layer_bytes(a, nf4_dtype_bytes) + 16 * a.layers * lora_layer
    if role == "policy":
        return 4 * p + 16 * a.layers * lora_layer if lora_layer else 16 * p
    if role == "critic":
        return 16 * (p + a.hidden - head_params(a)) + 4 * head_params(a)
    return 4 * (p + a.hidden * (role == "reward_model"))


def logits_bytes(stage: Stage, a: Arch) -> int:
    positions = min(stage.tokens, stage.chunk or stage.tokens)
    # the LM head's gradient is allocated by the first chunk's backward and accumulates while the others run
    head_gradient = 2 * a.vocab * a.hidden if positions < stage.tokens else 0
    return stage.head_bytes * positions * a.vocab + head_gradient


def gathered_layer_bytes(role: str, stage: Stage, a: Arch) -> int:
    """One decoder layer of ``role`` all-gathered: in bf16, its linears' weights in NF4 for QLoRA's policy."""
    if role != "policy":
        return 2 * layer_params(a)
    if stage.nf4_dtype_bytes:
        return (nf4_layer_bytes(a, stage.nf4_dtype_bytes) + 2 * (layer_params(a) - linear_weight_params(a))
                + 2 * stage.lora_layer)
    return 2 * layer_params(a) + 2 * stage.lora_layer


def components(stage: Stage, a: Arch, world: int, checkpointing: bool, reshard_after_forward: bool = True
               ) -> dict[str, float]:
    """Bytes per GPU at the peak of a training step, by kind (see the module docstring)."""
    roles = stage.trained + stage.frozen
    # a layer's gradient, in bf16 and again in fp32 for the reduce-scatter: only the adapters' with LoRA
    grad = 6 * (stage.lora_layer if stage.lora_layer and "critic" not in stage.trained else layer_params(a))
    gathered = {r: gathered_layer_bytes(r, stage, a) for r in roles}
    layer_buffers = (2 * max(gathered.values()) if reshard_after_forward else a.layers * sum(gathered.values())) + grad
    return {
        "trained_states": sum(sharded_state_bytes(r, a, stage.lora_layer, stage.nf4_dtype_bytes)
                              for r in stage.trained) / world,
        "frozen_weights": sum(sharded_state_bytes(r, a) for r in stage.frozen) / world,
        "gathered_roots": sum(2 * (root_params(a) + a.hidden * (r in ("critic", "reward_model"))) for r in roles),
        "layer_buffers": layer_buffers,
        "activations": len(stage.trained) * stage.tokens * activation_bytes(a, checkpointing),
        "logits": logits_bytes(stage, a),
        "dequantized": dequantize_bytes(largest_linear(a), stage.nf4_dtype_bytes) if stage.nf4_dtype_bytes else 0,
        "vllm_engine": stage.vllm_bytes,
    }


def host_load(a: Arch, load_dtype: str, world: int, ranks_per_node: int, load_in_4bit: bool = False
              ) -> dict[str, float]:
    """Host bytes per node while one model loads (see the module docstring); ``now``: this
    config's peak, the ranks on GPUs (rank 0's one copy; with QLoRA, every rank's)."""
    copy = DTYPE_BYTES[load_dtype] * parameters(a)
    every_rank = min(ranks_per_node, world) * copy
    return {"rank0_copy": copy, "cpu_shards": every_rank / world,
            "every_rank_a_copy": every_rank, "now": every_rank if load_in_4bit else copy}


# --- the report ---------------------------------------------------------------------------------


def compose(model: str, loss: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        return hydra_compose(config_name="config", overrides=[f"model={model}", f"loss={loss}", *overrides])


def arch_of(model: str, cfg) -> Arch:
    if model in ARCHS:
        return Arch.from_config(ARCHS[model])
    if cfg.model.get("init") is not None:
        return Arch.from_config(dict(cfg.model.init))
    raise ValueError(f"model={model}: no architecture in ARCHS and no init in config/model/{model}.yaml")


def totals(cfg, stage_name: str, a: Arch, world: int, gpu_gib: float) -> dict[bool, dict[str, float]]:
    """GiB per GPU by kind, and their total, without (False) and with (True) activation checkpointing."""
    stage = stage_from_config(stage_name, cfg, world, gpu_gib * GIB, a)
    out = {}
    for ac in (False, True):
        parts = components(stage, a, world, ac, cfg.reshard_after_forward)
        out[ac] = {"total_gib": sum(parts.values()) / GIB, **{k: v / GIB for k, v in parts.items()}}
    return out


def gpus_needed(cfg, stage_name: str, a: Arch, gpu_gib: float, checkpointing: bool) -> int | None:
    """The fewest GPUs, in whole nodes of 8, over which the stage fits: the sharded states shrink
    and so does each rank's micro-batch. None: not at any count the batch allows."""
    world = 8
    while cfg.batch_size // world // cfg.gradient_accumulation_steps > 0:
        if totals(cfg, stage_name, a, world, gpu_gib)[checkpointing]["total_gib"] <= gpu_gib:
            return world
        world *= 2
    return None


def estimate(model: str, stage_name: str, world: int, gpu_gib: float, overrides: list[str],
             ranks_per_node: int = 8) -> dict:
    cfg = compose(model, stage_name, overrides)
    a = arch_of(model, cfg)
    stage = stage_from_config(stage_name, cfg, world, gpu_gib * GIB, a)
    parts = totals(cfg, stage_name, a, world, gpu_gib)
    return {"model": model, "stage": stage.name, "parameters": parameters(a), "tokens_per_micro_batch": stage.tokens,
            "lora_parameters": a.layers * stage.lora_layer, "load_in_4bit": bool(stage.nf4_dtype_bytes),
            "nf4_parameters": a.layers * linear_weight_params(a) if stage.nf4_dtype_bytes else 0,
            "logprob_chunk_tokens": stage.chunk, "default_activation_checkpointing": bool(cfg.activation_checkpointing),
            "arch": asdict(a), "no_checkpointing": parts[False], "activation_checkpointing": parts[True],
            "gpus_needed": {"no_checkpointing": gpus_needed(cfg, stage_name, a, gpu_gib, False),
                            "activation_checkpointing": gpus_needed(cfg, stage_name, a, gpu_gib, True)},
            "host_load_gib": {k: v / GIB for k, v in host_load(a, cfg.model.load_dtype, world, ranks_per_node,
                                                                bool(stage.nf4_dtype_bytes)).items()}}


def fits(r: dict, key: str, gpu_gib: float) -> str:
    if r[key]["total_gib"] <= gpu_gib:
        return "yes"
    needed = r["gpus_needed"][key]
    return f"no ({needed} GPUs)" if needed else "no (at no count)"


def print_table(rows: list[dict], world: int, gpu_gib: float, ranks_per_node: int):
    qlora = any(r["load_in_4bit"] for r in rows)  # a column for the NF4 dequantization only where there is one
    print(f"Computed memory per GPU, {world} GPUs x {gpu_gib:g} GiB (GiB; activation checkpointing off / on)")
    print(f"| model | stage | params | tokens/micro-batch | states | frozen | roots+buffers | activations off/on | "
          f"logits | {'NF4 dequantized | ' * qlora}vLLM | total off | total on | "
          f"fits {world}x{gpu_gib:g} GiB, off / on |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | " + "---: | " * qlora
          + "---: | ---: | ---: | --- |")
    for r in rows:
        off, on = r["no_checkpointing"], r["activation_checkpointing"]
        def mark(total):  # bold: more than the GPU holds
            return f"**{total:.1f}**" if total > gpu_gib else f"{total:.1f}"

        dequantized = f"{off['dequantized']:.1f} | " if qlora else ""
        print(f"| {r['model']} | {r['stage']} | {r['parameters'] / 1e9:.2f}B | {r['tokens_per_micro_batch']} | "
              f"{off['trained_states']:.1f} | {off['frozen_weights']:.1f} | "
              f"{off['gathered_roots'] + off['layer_buffers']:.1f} | {off['activations']:.1f} / {on['activations']:.1f} | "
              f"{off['logits']:.1f} | {dequantized}{off['vllm_engine']:.1f} | {mark(off['total_gib'])} | "
              f"{mark(on['total_gib'])} | "
              f"{fits(r, 'no_checkpointing', gpu_gib)} / {fits(r, 'activation_checkpointing', gpu_gib)} |")
    print(f"\nHost memory per node while loading, {ranks_per_node} ranks per node (GiB)")
    models = dict.fromkeys(r["model"] for r in rows)
    if qlora:  # no load-once: every rank loads the whole model and quantizes it
        print("| model | every rank a copy in load_dtype (now: QLoRA quantizes on every rank) |")
        print("| --- | ---: |")
        for model in models:
            print(f"| {model} | {next(r['host_load_gib'] for r in rows if r['model'] == model)['now']:.0f} |")
        return
    print("| model | rank 0's copy (now) | + the shards, ranks on CPU | every rank a copy (before) |")
    print("| --- | ---: | ---: | ---: |")
    for model in models:
        h = next(r["host_load_gib"] for r in rows if r["model"] == model)
        print(f"| {model} | {h['rank0_copy']:.0f} | {h['rank0_copy'] + h['cpu_shards']:.0f} | "
              f"{h['every_rank_a_copy']:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--models", default="llama3_8b,qwen2_5_7b,mistral7b,llama3_70b")
    parser.add_argument("--stages", default="sft,dpo,ppo")
    parser.add_argument("--out", default="memory_estimate.json")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every stage (after --)")
    args = parser.parse_args()
    rows = [estimate(m, s, args.gpus, args.gpu_gib, args.overrides, args.ranks_per_node)
            for m in args.models.split(",") for s in args.stages.split(",")]
    print_table(rows, args.gpus, args.gpu_gib, args.ranks_per_node)
    report = {"gpus": args.gpus, "gpu_gib": args.gpu_gib, "ranks_per_node": args.ranks_per_node,
              "overrides": args.overrides, "computed_not_measured": True, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
