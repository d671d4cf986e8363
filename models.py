"""Models and tokenizers from a ``config/model/*.yaml``, and FSDP2 sharding.

A model config names either pretrained weights (``name_or_path``, or ``archive``: the HF
directory a previous stage exported, e.g. ``<run_dir>/LATEST``) or an architecture to build with
random init (``init``: a transformers config dict, used by ``model=tiny`` and the tests).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(path: str | None) -> str | None:
    """Paths in configs may be relative to the repository (e.g. the shipped ``tokenizer/tiny``)."""
    if path and not Path(path).is_absolute() and (REPO / path).exists():
        return str(REPO / path)
    return path


def weights_path(model_cfg) -> str | None:
    return resolve(model_cfg.get("archive") or model_cfg.get("name_or_path"))


def attn_implementation(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(model_cfg):
    path = resolve(model_cfg.get("tokenizer_name_or_path")) or weights_path(model_cfg)
    if path is None:
        raise ValueError("model config names no tokenizer: set model.tokenizer_name_or_path or model.name_or_path")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:  # packing never attends to padding, so any token will do
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_cfg, device: torch.device, seed: int = 0, head: str = "causal_lm"):
    """Full-precision (fp32 master) weights on CPU; FSDP moves each rank's shard to ``device``.

    Every rank builds the same model: pretrained weights are read by each rank, random init is
    seeded identically.
    """
    attn = attn_implementation(device)
    path = weights_path(model_cfg)
    if path is None and model_cfg.get("init") is None:
        raise ValueError("model config has neither name_or_path/archive nor init: nothing to load or build")
    dtype = DTYPES[model_cfg.get("load_dtype", "float32")]
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    else:
        init = dict(model_cfg.init)
        config = AutoConfig.for_model(init.pop("model_type"), **init)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False  # packing needs it off; generation turns it back on
    return model


def block_class(model, block_name: str | None = None) -> type:
    """The decoder-layer class to shard: ``model.block_name`` or the model's ``_no_split_modules``."""
    names = [block_name] if block_name else list(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in names:
            return type(module)
    found = sorted({type(m).__name__ for m in model.modules() if "Layer" in type(m).__name__ or "Block" in type(m).__name__})
    raise ValueError(f"no module of class {names} in {type(model).__name__}; set model.block_name to one of {found}")


def shard(model, mesh, param_dtype: str = "float32", cpu_offload: bool = False, block_name: str | None = None,
          activation_checkpointing: bool = False):
    """``fully_shard`` each decoder layer, then the root, with mixed precision and optional offload.

    Parameters stay fp32 (the optimizer's master copy); ``param_dtype`` is what forward and
    backward compute in, gradients are reduced in fp32.
    """
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32)
    kwargs = {"mesh": mesh, "mp_policy": policy}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    cls = block_class(model, block_name)
    for module in model.modules():
        if isinstance(module, cls):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model
