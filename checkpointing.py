"""Sharded checkpoints that are either complete or absent, and the Hugging Face export.

``step-<N>/`` holds the model and optimizer as a ``torch.distributed.checkpoint`` (each rank writes
its own shards), every rank's RNG state, and ``trainer_state.json`` (step, counters, scheduler).
Everything is written into ``step-<N>.tmp/`` first; rank 0 renames it to ``step-<N>/`` only after
every rank has finished, and the rename is atomic, so a directory named ``step-<N>`` is always
complete and a run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

import distributed

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _states(model, optimizer, extra: dict | None) -> dict:
    """The DCP state of the trained model and of any others trained alongside (PPO's critic)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    for name, (m, o) in (extra or {}).items():
        m_sd, o_sd = get_state_dict(m, o)
        state[name] = {"model": m_sd, "optim": o_sd}
    return state


def save(run_dir: str | Path, step: int, model, optimizer, trainer_state: dict, keep: int | None = None,
         extra: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. ``extra``: {name: (model,
    optimizer)} of models trained alongside, saved in the same checkpoint."""
    final = Path(run_dir) / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if distributed.is_main() and tmp.exists():
        shutil.rmtree(tmp)  # left by a run that died while saving
    distributed.barrier()
    dcp.save(_states(model, optimizer, extra), checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main():
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in complete(run_dir)[:-keep]:
                shutil.rmtree(old)
    distributed.barrier()
    return final


def write_jsonl(path: str | Path, rows: list[dict]):
    """One JSON object per line, atomically: a reader finds the whole file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for p in Path(run_dir).glob("step-*"):
        m = STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def load(path: str | Path, model, optimizer, extra: dict | None = None) -> dict:
    """Collective: restore model, optimizer (and ``extra``, as in ``save``) and this rank's RNG;
    returns the trainer state."""
    path = Path(path)
    state = _states(model, optimizer, extra)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, (m, o) in (extra or {}).items():
        set_state_dict(m, o, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optim"])
    rng_file = path / f"rng-rank{distributed.rank()}.pt"
    if rng_file.exists():  # absent when resuming on a different number of ranks
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def full_state_dict(model) -> dict:
    """Collective: the unsharded weights, on CPU, on rank 0 (empty elsewhere)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def write_hf(out_dir: str | Path, weights: dict, config, tokenizer, generation_config=None):
    """Rank 0: a ``from_pretrained`` directory (sharded safetensors, config, tokenizer), written
    beside the target and swapped in, so a reader never sees a half-written export."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    # a tensor that is a view into a larger buffer (one rank's shard is the whole) is copied out,
    # else safetensors would refuse it or save the whole buffer
    weights = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in weights.items()}
    save_torch_state_dict(weights, tmp, max_shard_size="5GB")
    config = copy.deepcopy(config)
    config.use_cache = True  # training turns the KV cache off; whoever loads the export generates
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def hf_config(model):
    """A copy of a (possibly FSDP-wrapped) HF model's config that names its architecture: a model
    built with ``from_config`` has none, and loaders (vLLM, Auto classes) pick the class by it."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.use_cache = True  # training turns the KV cache off; whoever loads the export generates
    return config


def export_hf(model, tokenizer, out_dir: str | Path):
    """Collective: export a causal LM for ``AutoModelForCausalLM.from_pretrained``."""
    weights = full_state_dict(model)
    if distributed.is_main():
        tied = getattr(model, "_tied_weights_keys", None)
        if model.config.tie_word_embeddings and isinstance(tied, dict):
            for key in tied:  # e.g. lm_head.weight: the embedding is saved once and tied on load
                weights.pop(key, None)
        write_hf(out_dir, weights, hf_config(model), tokenizer, getattr(model, "generation_config", None))
    distributed.barrier()
