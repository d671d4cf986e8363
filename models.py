"""Models and tokenizers from a ``config/model/*.yaml``, and FSDP2 sharding.

A model config names either pretrained weights (``name_or_path``, or ``archive``: the HF
directory a previous stage exported, e.g. ``<run_dir>/LATEST``) or an architecture to build with
random init (``init``: a transformers config dict, used by ``model=tiny`` and the tests).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import distributed
import logprobs


def _import_torchao_quietly():
    """torchao (QLoRA's NF4), imported now without its warnings about the CUDA and triton kernels
    a CPU build lacks (NF4 needs neither): transformers and peft import it anyway where installed."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        import torchao.prototype.mx_formats.config  # noqa: F401 (transformers imports it; it registers an enum noisily)
    except ImportError:
        pass
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


_import_torchao_quietly()

REPO = Path(__file__).resolve().parent
log = logging.getLogger("train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(path: str | None) -> str | None:
    """Paths in configs may be relative to the repository (e.g. the shipped ``tokenizer/tiny``)."""
    if path and not Path(path).is_absolute() and (REPO / path).exists():
        return str(REPO / path)
    return path


def weights_path(model_cfg) -> str | None:
    return resolve(model_cfg.get("archive") or model_cfg.get("name_or_path"))


class ConfigError(ValueError):
    """A model configuration that cannot be computed as asked."""


# sdpa has no logit soft-capping: on a model that soft-caps attention logits (Gemma-2) it would
# silently compute another function; these implementations apply the cap
SOFTCAP_ATTENTION = ("eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def attn_implementation(requested: str, device: torch.device, config) -> str:
    """The attention implementation to build the model with, for ``model.attn_implementation``.

    ``auto``: flash-attention 2 on CUDA where it is installed, else sdpa, except that a model whose
    attention logits are soft-capped (``attn_logit_softcapping``) gets eager, the one CPU
    implementation that applies the cap. An explicit choice that would drop the cap is refused.
    """
    softcap = getattr(config, "attn_logit_softcapping", None)
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash else ("eager" if softcap else "sdpa")
    if softcap and requested not in SOFTCAP_ATTENTION:
        raise ConfigError(f"model.attn_implementation={requested} ignores {config.model_type}'s attention logit "
                          f"soft-capping (attn_logit_softcapping={softcap}): use auto or one of {', '.join(SOFTCAP_ATTENTION)}")
    if requested.startswith("flash_attention") and not flash:
        raise ConfigError(f"model.attn_implementation={requested} needs CUDA and the flash_attn package: use auto, sdpa or eager")
    return requested


def bf16_slowdown(device: torch.device) -> float:
    """How many times longer a bf16 matmul takes than an fp32 one here (256^3, best of 3 after a
    warm-up, ~50 ms): about 0.4 on CPUs that compute bf16 (AMX, AVX-512-BF16), 40-70 on CPUs that
    emulate it (AVX2 only: 0.8-2 GFLOP/s against 56-86)."""
    def seconds(dtype) -> float:
        a = torch.randn(256, 256, device=device).to(dtype)
        a @ a
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
        return best
    return seconds(torch.bfloat16) / seconds(torch.float32)


def compute_dtype(requested: str, device: torch.device) -> str:
    """The dtype for ``model.fsdp_policy_mp``. ``auto``: bfloat16 on a GPU that supports it and on a
    CPU that computes it at least as fast as fp32 (measured, ``bf16_slowdown``), else float32. An
    explicit bfloat16 that this CPU computes slower is kept and warned about."""
    if requested not in ("auto", *DTYPES):
        raise ConfigError(f"model.fsdp_policy_mp={requested}: expected auto, {', '.join(DTYPES)}")
    if device.type == "cuda" and requested == "auto":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cuda" or requested not in ("auto", "bfloat16"):
        return requested
    slowdown = bf16_slowdown(device)
    if requested == "auto":
        return "bfloat16" if slowdown <= 1 else "float32"
    if slowdown > 2:
        log.warning(f"model.fsdp_policy_mp=bfloat16: this CPU computes bf16 matmuls {slowdown:.0f}x slower than "
                    f"fp32 (measured): set model.fsdp_policy_mp=auto or float32 unless bf16 is what you test")
    return requested


def is_local(path: str) -> bool:
    """A local path rather than a hub id (``name`` or ``namespace/name``): it exists, starts with
    / . or ~, or has two slashes or more (``runs/sft/LATEST``)."""
    return Path(path).exists() or path.startswith(("/", ".", "~")) or path.count("/") > 1


# how the local directories we make come to exist, for the one-line error when one is missing
MADE_BY = {"SmolLM2-135M-Instruct": "run python scripts/get_real_model.py to make it",
           "LATEST": "a stage writes it when it finishes: did that run end?"}


def check_local_dir(path: str, key: str):
    """A ``ConfigError`` naming ``key`` when ``path`` is meant as a local directory and is none."""
    if is_local(path) and not Path(path).is_dir():
        hint = MADE_BY.get(Path(path).name)
        raise ConfigError(f"{key}={path}: no such directory" + (f" ({hint})" if hint else ""))


def weights_key(model_cfg) -> str:
    return "model.archive" if model_cfg.get("archive") else "model.name_or_path"


def model_config(model_cfg, key: str | None = None):
    """The transformers config of the weights ``model_cfg`` names, or of its ``init`` architecture.
    A path that is no model directory is a ``ConfigError`` naming ``key`` (default: the model
    config's key that holds it)."""
    path = weights_path(model_cfg)
    if path is not None:
        key = key or weights_key(model_cfg)
        if Path(path).is_file():
            raise ConfigError(f"{key}={path} is a file: expected a Hugging Face model directory (config.json and "
                              f"weights, e.g. <run_dir>/LATEST); a DPO-repo policy.pt is not one")
        check_local_dir(path, key)
        if Path(path).is_dir() and not (Path(path) / "config.json").exists():
            raise ConfigError(f"{key}={path}: not a Hugging Face model directory (no config.json)")
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:  # a hub id that cannot be fetched (offline, gated, mistyped)
            raise ConfigError(f"{key}={path}: cannot load its config: {str(e).splitlines()[0]}") from e
    if model_cfg.get("init") is None:
        raise ValueError("model config has neither name_or_path/archive nor init: nothing to load or build")
    # to plain containers: strict transformers configs refuse omegaconf lists and dicts (layer_types, rope_scaling)
    init = OmegaConf.to_container(model_cfg.init, resolve=True) if OmegaConf.is_config(model_cfg.init) else dict(model_cfg.init)
    return AutoConfig.for_model(init.pop("model_type"), **init)


def load_tokenizer(model_cfg):
    path = resolve(model_cfg.get("tokenizer_name_or_path")) or weights_path(model_cfg)
    if path is None:
        raise ValueError("model config names no tokenizer: set model.tokenizer_name_or_path or model.name_or_path")
    from data.tokenize import end_of_turn

    key = "model.tokenizer_name_or_path" if model_cfg.get("tokenizer_name_or_path") else weights_key(model_cfg)
    check_local_dir(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no tokenizer files; a hub id that cannot be fetched (offline, gated, mistyped)
        raise ConfigError(f"{key}={path}: cannot load a tokenizer from it: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None:  # packing never attends to padding, so any token will do
        tok.pad_token = tok.eos_token
    # Sampling stops, and a reply ends, at eos_token_id everywhere: it must be the token the chat
    # template ends a turn with (Gemma's <end_of_turn>, not its <eos>; <|eot_id|> for a Llama-3
    # tokenizer whose EOS is <|end_of_text|>).
    eot = end_of_turn(tok)
    if eot != tok.eos_token_id:
        eot = tok.convert_ids_to_tokens(eot)
        log.info(f"tokenizer {path}: the chat template ends a turn with {eot!r}, used as the EOS token "
                 f"instead of {tok.eos_token!r}")
        tok.eos_token = eot
    return tok


def load_model(model_cfg, device: torch.device, seed: int = 0, meta: bool = False):
    """Full-precision (fp32 master) weights on CPU; FSDP moves each rank's shard to ``device``.

    Pretrained weights are read from their directory; random init, and any weight a checkpoint
    lacks, is drawn from ``seed`` (the process's global RNG is restored afterwards, so loading
    neither depends on nor changes it). ``meta``: the architecture alone, on the meta device
    (nothing allocated, nothing read but the config), for ``build_sharded``.
    """
    path = weights_path(model_cfg)
    config = model_config(model_cfg)
    attn = attn_implementation(model_cfg.get("attn_implementation") or "auto", device, config)
    dtype = DTYPES[model_cfg.get("load_dtype", "float32")]
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        model.config.use_cache = False
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path is not None:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False  # packing needs it off; generation turns it back on
    return model


def add_lora(model, lora_cfg, seed: int = 0):
    """``model`` with peft LoRA adapters (``lora``: r, alpha, dropout, target_modules,
    modules_to_save): the base frozen, the adapters trainable, B = 0 so that it starts as the
    base model. The adapters' random A is drawn from ``seed``; the global RNG is left as it was.
    On a ``RewardModel``, the adapters go on the LM inside it: they train the backbone, and the
    score head (outside peft) trains fully."""
    from peft import LoraConfig, get_peft_model

    if isinstance(model, RewardModel):
        model.lm = add_lora(model.lm, lora_cfg, seed)
        return model

    targets = lora_cfg.target_modules
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, task_type="CAUSAL_LM",
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        modules_to_save=list(lora_cfg.modules_to_save) if lora_cfg.modules_to_save else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


NF4_BLOCK = 64  # weights per NF4 block (QLoRA's): each block's absmax is its scale
# scales per block of the second quantization (QLoRA's 256 would refuse small test models on 2
# ranks); fixed, not chosen per world size, so that the quantized base is the same on any number
# of ranks and a resume on another one trains the same model
NF4_SCALE_BLOCK = 64


def quantize_base(model, world: int, block_name: str | None = None):
    """QLoRA (``lora.load_in_4bit``): every frozen linear weight inside the decoder layers becomes
    a torchao ``NF4Tensor`` (4 bits a weight, a double-quantized scale per 64), which FSDP2
    shards by rows and all-gathers in NF4; each linear dequantizes its weight to the compute
    dtype only while it runs. Embeddings, norms and the LM head stay as loaded, and so does
    everything that trains (the adapters).

    The scales are statistics of the whole tensor, so every rank quantizes the whole model
    itself (``build_sharded(load_once=False)``): the shards are then slices of one quantization.
    A weight whose rows or blocks do not split evenly over ``world`` ranks is refused."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError as e:
        raise ConfigError(f"lora.load_in_4bit=true needs torchao (pip install torchao): {e}") from e
    cls = block_class(model, block_name)
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, cls):
            continue
        for name, linear in layer.named_modules():
            if not isinstance(linear, torch.nn.Linear) or linear.weight.requires_grad:
                continue
            rows, cols = linear.weight.shape
            groups = rows * cols // (NF4_BLOCK * NF4_SCALE_BLOCK)
            if rows % world or (rows * cols) % (NF4_BLOCK * NF4_SCALE_BLOCK) or groups % world:
                raise ConfigError(f"lora.load_in_4bit=true: {layer_name}.{name}.weight [{rows}, {cols}] does not split "
                                  f"into {world} shards of whole groups of {NF4_BLOCK * NF4_SCALE_BLOCK} weights (NF4 "
                                  f"blocks of {NF4_BLOCK}, their scales quantized {NF4_SCALE_BLOCK} at a time): run on a "
                                  f"number of ranks that divides {rows} and {groups}, or set lora.load_in_4bit=false")
            linear.weight = torch.nn.Parameter(to_nf4(linear.weight.detach(), NF4_BLOCK, NF4_SCALE_BLOCK), requires_grad=False)
    return model


def is_nf4(weight) -> bool:
    return hasattr(weight, "get_original_weight")


def dense(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a plain tensor: an NF4 one (``quantize_base``) dequantized, any other as is."""
    return weight.get_original_weight() if is_nf4(weight) else weight


def fingerprint(model) -> list[float]:
    """Two numbers that change when any weight of ``model`` (unsharded) changes: the float64 sum
    of its parameters and of their squares. What a resumed run checks its starting model by, since
    a checkpoint holds only what trains."""
    total, squares = 0.0, 0.0
    with torch.no_grad():
        for p in model.parameters():
            for piece in p.detach().reshape(-1).split(1 << 22):  # float64 copies of 4M values at most
                piece = piece.double()
                total, squares = total + piece.sum().item(), squares + piece.square().sum().item()
    return [total, squares]


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")


def under_adapters(model):
    """The transformers model a LoRA model wraps (its ``generate`` and forward hooks run there);
    any other model itself."""
    return model.get_base_model() if is_lora(model) else model


def merged_lora_weights(weights: dict, model) -> dict:
    """The full state dict of a LoRA model (``add_lora``) as the plain model's: each adapted
    weight W + (alpha / r) B A, a module trained fully (``modules_to_save``) in place of its
    original, peft's prefixes dropped. What transformers and vLLM load as the trained model."""
    scaling = model.peft_config["default"].lora_alpha / model.peft_config["default"].r
    merged = {}
    for key, value in weights.items():
        if ".lora_A." in key or ".lora_B." in key or ".original_module." in key:
            continue
        value = dense(value)  # QLoRA's base is merged as the model it trained against: dequantized
        if key.endswith(".base_layer.weight"):
            prefix = key.removesuffix(".base_layer.weight")
            value = value + scaling * weights[f"{prefix}.lora_B.default.weight"] @ weights[f"{prefix}.lora_A.default.weight"]
        name = key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        merged[name] = value
    return merged


class AdapterOff:
    """A LoRA policy with its adapters switched off: the model it started from, so the reference
    of DPO and of the KL costs no second copy (``Trainer.token_logps`` runs it)."""

    def __init__(self, policy):
        self.policy = policy


def block_class(model, block_name: str | None = None) -> type:
    """The decoder-layer class to shard: ``model.block_name`` or the model's ``_no_split_modules``."""
    names = [block_name] if block_name else list(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in names:
            return type(module)
    found = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__ or "Block" in type(m).__name__})
    raise ValueError(f"no module of class {names} in {type(model).__name__}; set model.block_name to one of {found}")


def shard(model, mesh, param_dtype: str = "float32", cpu_offload: bool = False, block_name: str | None = None,
          activation_checkpointing: bool = False, reshard_after_forward: bool = True):
    """``fully_shard`` each decoder layer, then the root, with mixed precision and optional offload;
    a causal LM gets ``model.chunked_logps`` (``logprobs.register``).

    Parameters stay fp32 (the optimizer's master copy); ``param_dtype`` is what forward and
    backward compute in, gradients are reduced in fp32.
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "mp_policy": policy}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if mesh.size() == 1:
        # one rank has nothing to shard, and torch 2.13's one-rank FSDP2 path assumes a parameter
        # gathers as one tensor, which an NF4 weight (three) does not: FSDP leaves those alone
        kwargs["ignored_params"] = ignored = set()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and is_nf4(module.weight):
                module.weight = torch.nn.Parameter(module.weight.to(mesh.device_type), requires_grad=False)
                ignored.add(module.weight)
    cls = block_class(model, block_name)
    for module in model.modules():
        if isinstance(module, cls):
            fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    if not isinstance(model, RewardModel):
        logprobs.register(model)
    if is_lora(model):  # peft's generate calls the model under the adapters, not the root FSDP hooks
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    return model


def build_sharded(load, mesh, device: torch.device, load_once: bool = True, **shard_kwargs):
    """Collective: the model ``load(meta)`` returns, sharded over ``mesh`` (``shard``), with about
    one copy of its weights in host memory at most: every rank builds the architecture on the meta
    device (nothing allocated) and shards it; rank 0 also loads the model itself (reads the
    weights, or draws the random init) and sends each rank its shard of each parameter
    (``distribute_tensor``), one parameter at a time, freeing each once sent; buffers are
    broadcast. The weights are rank 0's, bitwise, on every rank, as when each rank loaded the
    whole model itself. With ``cpu_offload`` (shards kept on the host), one rank, or
    ``load_once=false`` (QLoRA: ``quantize_base``), every rank loads the model itself."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    if not load_once or not dist.is_initialized() or dist.get_world_size() == 1 or shard_kwargs.get("cpu_offload"):
        return shard(load(False), mesh, **shard_kwargs)
    main = dist.get_rank() == 0
    model = shard(load(True), mesh, **shard_kwargs)
    model.to_empty(device=device)
    source = load(False) if main else None
    with torch.no_grad():
        params = dict(source.named_parameters()) if main else {}
        for name, param in model.named_parameters():  # the same order on every rank
            full = params.pop(name).detach() if main else torch.empty(param.shape, dtype=param.dtype, device=device)
            param.copy_(distribute_tensor(full.to(device), mesh, param.placements, src_data_rank=0))
            del full
            if main:  # drop the source's reference too: its memory goes as its shards go out
                owner, _, attr = name.rpartition(".")
                source.get_submodule(owner)._parameters[attr] = None
        buffers = dict(source.named_buffers()) if main else {}
        for name, buffer in model.named_buffers():
            if main:
                buffer.copy_(buffers[name])
            dist.broadcast(buffer, src=0)
        sources = dict(source.named_modules()) if main else {}
        for module_name, module in model.named_modules():  # tensors kept as plain attributes
            for key, value in list(vars(module).items()):
                if torch.is_tensor(value) and not isinstance(value, torch.nn.Parameter):
                    real = getattr(sources[module_name], key).to(device) if main else torch.empty_like(value, device=device)
                    dist.broadcast(real, src=0)
                    setattr(module, key, real)
    return model


# How much a probe sequence's output may differ between two rows where it follows different
# sequences of the same length. Without a leak the two computations are the same arithmetic on the
# same numbers (a masked key contributes an exact zero), so they agree to the last bit in any dtype,
# or to a kernel's own noise; leaking attention moves log-probs by ~0.2 (OPT, Falcon in
# transformers 5.19, fp32 and bf16). Comparing the packed sequence against itself alone instead mixes in the other
# shape's rounding: 3e-6 in fp32 but 0.10 in bf16 on SmolLM2-135M, which reads as a leak.
PACKING_TOLERANCE = 1e-3


@torch.no_grad()
def packing_error(model, device: torch.device) -> float:
    """How much packing changes the model's output: the same probe sequence B packed behind two
    different sequences A1 and A2 of the same length, in two rows of one batch (``position_ids``
    restarting at B, as ``data.packing.pack`` lays them out). Returns the largest difference
    between the two rows over B's tokens of the log-probs (a causal LM) or the scores (a
    ``RewardModel``): zero up to kernel noise unless B attends to what precedes it. One forward of
    a [2, 11] batch; under FSDP every rank runs it (it is collective)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    a1, a2, b = (torch.randint(vocab, (n,), generator=g) for n in (6, 6, 5))
    input_ids = torch.stack([torch.cat([a1, b]), torch.cat([a2, b])]).to(device)
    position_ids = torch.cat([torch.arange(6), torch.arange(5)]).expand(2, -1).to(device)
    was_training = model.training
    model.eval()  # no dropout: the two rows must differ only by what precedes B
    try:
        if isinstance(model, RewardModel):
            out = model(input_ids, position_ids)[0].float()
        else:
            out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float().log_softmax(-1)
    finally:
        model.train(was_training)
    return (out[0, 6:] - out[1, 6:]).abs().max().item()


class RewardModel(torch.nn.Module):
    """A causal LM with a scalar head: ``score(h_t)`` read at the last token of each sequence.

    The LM head stays so that a reward model can also keep an LM loss (seed 000's
    ``logexpwithlm``). ``export_weights`` renames the weights to the layout of transformers'
    ``<Arch>ForSequenceClassification`` (backbone + ``score``), so the export loads with
    ``AutoModelForSequenceClassification``.
    """

    def __init__(self, lm, seed: int = 0):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self._no_split_modules = lm._no_split_modules
        hidden = lm.config.hidden_size
        self.score = torch.nn.Linear(hidden, 1, bias=False, dtype=lm.dtype)
        # from the run's seed: the process's global RNG differs run to run (torch seeds it randomly)
        if self.score.weight.is_meta:  # build_sharded fills it from rank 0
            return
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=generator) / (hidden + 1))

    def gradient_checkpointing_enable(self, **kwargs):
        self.lm.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids, position_ids, with_logits: bool = False):
        """(per-token scores [R, L], LM logits [R, L, V] or None). The root's forward is what FSDP
        wraps, so every use of the backbone goes through here."""
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        # a copy, not a view of [R, L, 1]: FSDP2 warns that an in-place op on a view output would drop its hook
        scores = self.score(hidden).squeeze(-1).clone()
        logits = self.lm.get_output_embeddings()(hidden) if with_logits else None
        return scores, logits

    def export_weights(self, weights: dict) -> tuple[dict, object]:
        """Full state dict of this module -> (weights, config) of the sequence-classification model."""
        lm = under_adapters(self.lm)
        if is_lora(self.lm):  # the backbone as trained: W + (alpha / r) B A
            merged = merged_lora_weights({k.removeprefix("lm."): v for k, v in weights.items() if k.startswith("lm.")}, self.lm)
            weights = {**{f"lm.{k}": v for k, v in merged.items()}, "score.weight": weights["score.weight"]}
        prefix = lm.base_model_prefix
        out = {}
        for k, v in weights.items():
            if k.startswith(f"lm.{prefix}."):
                out[k[len("lm."):]] = v
            elif k == "score.weight":
                out[k] = v
        config = copy.deepcopy(lm.config)
        arch = type(lm).__name__.replace("ForCausalLM", "ForSequenceClassification")
        config.architectures, config.num_labels = [arch], 1
        return out, config


def load_reward_model(model_cfg, device: torch.device, seed: int = 0, meta: bool = False) -> RewardModel:
    """A reward model initialised from a causal LM (e.g. the SFT export) with a fresh head, or
    resumed from a reward-model export (which has a ``score`` head already). ``meta``: as in
    ``load_model``."""
    path = weights_path(model_cfg)
    lm = load_model(model_cfg, device, seed=seed, meta=meta)
    if meta:
        with torch.device("meta"):
            return RewardModel(lm, seed=seed)
    rm = RewardModel(lm, seed=seed)
    if path is not None and (lm.config.architectures or [""])[0].endswith("ForSequenceClassification"):
        from transformers import AutoModelForSequenceClassification

        trained = AutoModelForSequenceClassification.from_pretrained(path, dtype=lm.dtype)
        rm.score.weight.data.copy_(trained.score.weight.data)
    return rm


def config_for(cfg, path: str):
    """The policy's model config (``cfg.model``: dtype, sharding) pointed at another model's directory."""
    return OmegaConf.create({**OmegaConf.to_container(cfg.model, resolve=True), "archive": path,
                             "name_or_path": None, "tokenizer_name_or_path": None})


class Builder:
    """Builds every model of a run the same way: loaded once, FSDP2-sharded over the run's mesh in
    the policy's compute dtype, then self-checked (packing, the log-prob head). ``packs`` is whether
    the run's batches are packed: ``packing=auto`` turns it off for a model that cannot pack."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.packs = cfg.packing in (True, "auto")

    def policy(self, scalar_head: bool = False):
        """The model being trained (``scalar_head``: a reward model), with LoRA adapters where
        ``lora.r`` is set and its frozen base in NF4 with ``lora.load_in_4bit`` (QLoRA); and the
        ``fingerprint`` of the weights it starts from, rank 0's on every rank (a resumed run must
        start from the same ones)."""
        cfg, found = self.cfg, {}

        def load(model_cfg, meta: bool):
            model = (load_reward_model if scalar_head else load_model)(model_cfg, self.device, seed=cfg.seed, meta=meta)
            if not meta and distributed.is_main():
                found["fingerprint"] = fingerprint(model)
            if cfg.lora.r:
                model = add_lora(model, cfg.lora, seed=cfg.seed)
            if cfg.lora.load_in_4bit and not meta:
                model = quantize_base(model, distributed.world(), model_cfg.block_name)
            return model

        model = self.build(cfg.model, load, load_once=not cfg.lora.load_in_4bit)
        return model, distributed.from_main(found.get("fingerprint"))

    def scorer(self, model_cfg):
        """A reward model (or a critic): a scalar head on the last token."""
        return self.build(model_cfg, lambda c, meta: load_reward_model(c, self.device, seed=self.cfg.seed, meta=meta))

    def frozen(self, model_cfg, policy=None):
        """A model that is only read (a reference): sharded the same way, no gradients. With LoRA,
        the ``policy`` itself with its adapters off (``AdapterOff``)."""
        if self.cfg.lora.r and policy is not None:
            return AdapterOff(policy)
        return self.build(model_cfg).requires_grad_(False).eval()

    def build(self, model_cfg, load=None, load_once: bool = True):
        """Collective: ``load(model_cfg, meta)`` (default: the causal LM), sharded over all ranks
        (``load_once``: as ``build_sharded``), then self-checked."""
        cfg = self.cfg
        load = load or (lambda c, meta: load_model(c, self.device, seed=cfg.seed, meta=meta))
        model = build_sharded(lambda meta: load(model_cfg, meta), distributed.mesh(cfg.fsdp_shard_ranks), self.device,
                              load_once=load_once, param_dtype=model_cfg.fsdp_policy_mp, cpu_offload=cfg.cpu_offload,
                              block_name=model_cfg.block_name, activation_checkpointing=cfg.activation_checkpointing,
                              reshard_after_forward=cfg.reshard_after_forward)
        if self.packs and cfg.packing_check:
            self.check_packing(model)
        if cfg.logprob_chunk_tokens and not isinstance(model, RewardModel):
            self.check_logprob_head(model, model_cfg)
        return model

    def check_packing(self, model):
        """Collective: refuse (``packing=true``) or stop packing (``packing=auto``) if ``model``'s
        output for a sequence changes when another sequence precedes it in the row: an
        architecture whose attention mask ignores ``position_ids`` (OPT, Falcon, BioGPT in
        transformers 5.19) lets packed sequences attend to each other, silently."""
        error = packing_error(model, self.device)
        distributed.reshard(model)
        if error <= PACKING_TOLERANCE:
            return
        config = model.config
        what = (f"{type(model).__name__.removeprefix('FSDP')} (model_type {config.model_type}, attention "
                f"{config._attn_implementation}) attends across packed sequences: a probe sequence's output changes "
                f"by {error:.3g} (> {PACKING_TOLERANCE}) when another sequence precedes it in the row")
        if self.cfg.packing == "auto":
            log.warning(f"{what}; packing=auto: using padded batches instead")
            self.packs = False
            return
        raise ConfigError(f"{what}: set packing=false (or packing=auto to fall back to padding), "
                          f"or a model.attn_implementation whose mask honours position_ids")

    def check_logprob_head(self, model, model_cfg):
        """Collective: refuse a model whose logits are not ``lm_head(last hidden state)`` (soft-capped
        or scaled after the head), which chunked log-probs would silently get wrong."""
        error = logprobs.head_error(model, self.device)
        distributed.reshard(model)
        if error > logprobs.HEAD_TOLERANCE[model_cfg.fsdp_policy_mp]:
            raise ConfigError(
                f"{type(model).__name__.removeprefix('FSDP')} (model_type {model.config.model_type}) computes its "
                f"logits from more than its LM head (chunked log-probs differ from its own logits by {error:.3g}): "
                f"set logprob_chunk_tokens=null to compute log-probs from the model's full logits")


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """Collective for a DTensor (every rank gets the whole parameter, dense); a plain tensor as is.

    A QLoRA shard (an NF4 tensor, ``quantize_base``) is dequantized on its rank and then
    gathered as a dense tensor: its blocks and their scales never straddle shards, so that is
    exactly the dequantized whole. (Gathering the NF4 tensor itself goes through torchao's
    functional all-gather of its three parts, which corrupted the heap about one run in five on
    gloo: ``malloc(): unaligned tcache chunk detected`` mid-run.)"""
    from torch.distributed.tensor import DTensor

    p = p.detach()
    if not isinstance(p, DTensor):
        return dense(p)
    local = p.to_local()
    quantized = is_nf4(local)
    local = dense(local)
    if quantized or local.device.type != p.device_mesh.device_type:  # cpu_offload: gather on the mesh's device
        p = DTensor.from_local(local.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                               shape=p.shape, stride=p.stride())
    return p.full_tensor()
