"""Models and tokenizers from a ``config/model/*.yaml``, and FSDP2 sharding.

A model config names either pretrained weights (``name_or_path``, or ``archive``: the HF
directory a previous stage exported, e.g. ``<run_dir>/LATEST``) or an architecture to build with
random init (``init``: a transformers config dict, used by ``model=tiny`` and the tests).
"""

from __future__ import annotations

import copy
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


class RewardModel(torch.nn.Module):
    """A causal LM with a scalar head: ``score(h_t)`` read at the last token of each sequence.

    The LM head stays so that a reward model can also keep an LM loss (seed 000's
    ``logexpwithlm``). ``export_weights`` renames the weights to the layout of transformers'
    ``<Arch>ForSequenceClassification`` (backbone + ``score``), so the export loads with
    ``AutoModelForSequenceClassification``.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self._no_split_modules = lm._no_split_modules
        hidden = lm.config.hidden_size
        self.score = torch.nn.Linear(hidden, 1, bias=False, dtype=lm.dtype)
        torch.nn.init.normal_(self.score.weight, std=1 / (hidden + 1))

    def gradient_checkpointing_enable(self, **kwargs):
        self.lm.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids, position_ids, with_logits: bool = False):
        """(per-token scores [R, L], LM logits [R, L, V] or None). The root's forward is what FSDP
        wraps, so every use of the backbone goes through here."""
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        scores = self.score(hidden).squeeze(-1)
        logits = self.lm.get_output_embeddings()(hidden) if with_logits else None
        return scores, logits

    def export_weights(self, weights: dict) -> tuple[dict, object]:
        """Full state dict of this module -> (weights, config) of the sequence-classification model."""
        prefix = self.lm.base_model_prefix
        out = {}
        for k, v in weights.items():
            if k.startswith(f"lm.{prefix}."):
                out[k[len("lm."):]] = v
            elif k == "score.weight":
                out[k] = v
        config = copy.deepcopy(self.lm.config)
        arch = type(self.lm).__name__.replace("ForCausalLM", "ForSequenceClassification")
        config.architectures, config.num_labels = [arch], 1
        return out, config


def load_reward_model(model_cfg, device: torch.device, seed: int = 0) -> RewardModel:
    """A reward model initialised from a causal LM (e.g. the SFT export) with a fresh head, or
    resumed from a reward-model export (which has a ``score`` head already)."""
    path = weights_path(model_cfg)
    lm = load_model(model_cfg, device, seed=seed)
    rm = RewardModel(lm)
    if path is not None and (AutoConfig.from_pretrained(path).architectures or [""])[0].endswith("ForSequenceClassification"):
        from transformers import AutoModelForSequenceClassification

        trained = AutoModelForSequenceClassification.from_pretrained(path, dtype=lm.dtype)
        rm.score.weight.data.copy_(trained.score.weight.data)
    return rm
