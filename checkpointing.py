"""Sharded checkpoints that are either complete or absent, the Hugging Face export, and the lock
that keeps one job at a time in a run_dir.

``step-<N>/`` holds the model's trained parameters (a LoRA policy's adapters, not its frozen
base) and optimizer as a ``torch.distributed.checkpoint`` (each rank writes its own shards),
every rank's RNG state, ``trainer_state.json`` (step, counters, scheduler, the config) and
``manifest.json``: every file of the checkpoint with its size. Everything is written
into ``step-<N>.tmp/`` first; rank 0 writes the manifest and renames the directory to ``step-<N>/``
only after every rank has finished, and the rename is atomic, so a run killed mid-save resumes
from the previous checkpoint. A checkpoint counts as complete only if every file its manifest
lists is there with the size it had when written (a file truncated or lost since, by a full disk
or a broken filesystem, is found before anything is loaded).

A write that fails (disk full, I/O error, permissions) on any rank stops every rank with one
``RunDirError`` that names the path, the error and the free space; the partial ``.tmp`` is
removed and the previous checkpoints are not touched.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import math
import logging
import os
import random
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

import distributed
import models
from overrides import RENAMED

log = logging.getLogger("train")

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
EXPORTED = "checkpoint.json"  # in an export (LATEST/): {"step": N}, the checkpoint whose weights it holds
LOCK_FILE = "lock"


RETRY = "free space (or fix the permissions) and run again with resume=true"  # after a failed write


class RunDirError(Exception):
    """run_dir cannot be used as asked: another job holds it, a write into it failed, or it has
    checkpoints but none is complete. The message says what, where, and how to go on."""


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


# What trains, and nothing frozen: a LoRA policy's checkpoint holds its adapters (and their
# optimizer states), not the base, which resume reads again from the model it started from
# (``Trainer.check_base`` makes sure it is the same)
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True)
# the state loaded back came from get_state_dict(TRAINED_ONLY) of this model, so its keys are
# exactly the trained ones, and dcp.load has already refused a checkpoint that lacks any of them
LOAD_TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def _trained_state(model, optimizer) -> tuple[dict, dict]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINED_ONLY)
    # a frozen weight tied to another (a LoRA policy's LM head, tied to its frozen embedding)
    # is still listed under its second name
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def _states(model, optimizer, extra: dict | None) -> dict:
    """The DCP state of the trained model and of any others trained alongside (PPO's critic)."""
    model_sd, optim_sd = _trained_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    for name, (m, o) in (extra or {}).items():
        m_sd, o_sd = _trained_state(m, o)
        state[name] = {"model": m_sd, "optim": o_sd}
    return state


def save(run_dir: str | Path, step: int, model, optimizer, trainer_state: dict, keep: int | None = None,
         extra: dict | None = None, files: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. ``extra``: {name: (model,
    optimizer)} of models trained alongside, saved in the same checkpoint; ``files``: {file name:
    object}, rank 0's, saved with ``torch.save`` beside the state (the rollouts generated ahead)."""
    final = Path(run_dir) / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    failure = None
    if distributed.is_main() and tmp.exists():
        failure = _attempt(tmp, shutil.rmtree, tmp)  # left by a run that died while saving
    _agree(failure, tmp)
    # collective: a write that fails on one rank raises on every rank
    failure = _attempt(tmp, dcp.save, _states(model, optimizer, extra), checkpoint_id=str(tmp))
    if failure is None:
        failure = _attempt(tmp, torch.save, rng_state(), tmp / f"rng-rank{distributed.rank()}.pt")
    _agree(failure, tmp)
    if distributed.is_main():
        for name, value in (files or {}).items():
            failure = failure or _attempt(tmp, torch.save, value, tmp / name)
        failure = failure or _attempt(tmp, _seal, tmp, final, trainer_state)
        if failure is None and keep:
            prune(run_dir, keep)
    _agree(failure, tmp)
    return final


def _seal(tmp: Path, final: Path, trainer_state: dict):
    """Rank 0, once every rank has written its files: the state, the manifest, the rename."""
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    if final.exists():  # a damaged checkpoint of the same step, which the run resumed before
        shutil.rmtree(final)
    os.replace(tmp, final)


def prune(run_dir: str | Path, keep: int):
    """Rank 0: delete every checkpoint older than the newest ``keep`` complete ones. A failure is
    only warned about: the checkpoint just written is complete, and the next save tries again."""
    kept = complete(run_dir)[-keep:]
    if not kept:
        return
    for old in checkpoints(run_dir):
        if step_of(old) < step_of(kept[0]):
            try:
                shutil.rmtree(old)
            except OSError as exc:
                log.warning(f"could not delete the old checkpoint {old}: {exc}")


def _attempt(path: Path, write, *args, **kwargs) -> str | None:
    """Run ``write``; None, or what failed (``write_failure``) if it raised."""
    try:
        write(*args, **kwargs)
        return None
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        return write_failure(path, exc)


def _agree(failure: str | None, tmp: Path):
    """Collective: if a write failed on any rank, every rank raises its message; rank 0 first
    removes the partial ``tmp``, so that only complete checkpoints and exports stay."""
    failure = distributed.first_failure(failure)
    if failure is None:
        return
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    raise RunDirError(f"{failure}; removed the partial {tmp.name}, the previous checkpoints are untouched: {RETRY}")


def write_failure(path: str | Path, exc: BaseException) -> str:
    """``cannot write <path>: <the OS's error> (<free space> free there)``. torch's own writer
    reports a full disk as "unexpected pos 704 vs 598": the OS error it hides is in the context."""
    cause, seen = exc, exc
    if isinstance(exc, CheckpointException) and exc.failures:
        cause = seen = next(iter(exc.failures.values()))[0]
    while seen is not None and not isinstance(cause, OSError):
        seen = seen.__cause__ or seen.__context__
        if isinstance(seen, OSError):
            cause = seen
    said = (str(cause).splitlines() or [type(cause).__name__])[0]
    return f"cannot write {path}: {said} ({free_space(path)} free there)"


def free_space(path: str | Path) -> str:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024


@contextlib.contextmanager
def writing(path: str | Path):
    """A write of this rank alone (metrics, config): its OSError as a ``RunDirError`` naming the
    path, the error and the free space."""
    try:
        yield
    except OSError as exc:
        raise RunDirError(f"{write_failure(path, exc)}: {RETRY}") from exc


def replace_text(path: Path, text: str):
    """Write ``path`` atomically: a reader, or a run killed meanwhile, finds the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows: list[dict]):
    """One JSON object per line, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def truncate_jsonl(path: str | Path, n: int) -> int:
    """Keep the first ``n`` lines of a JSON-lines file, atomically; returns how many lines it had."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    replace_text(path, "".join(lines[:n]))
    return len(lines)


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Every ``step-<N>`` directory of a run, complete or not, oldest first."""
    found = [p for p in Path(run_dir).glob("step-*") if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=step_of)


def damage(path: Path) -> str | None:
    """Why the checkpoint ``path`` is not complete, or None if every file its manifest lists is
    there with the size it was written with."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path / MANIFEST} cannot be read ({exc})"
    for name, size in files.items():
        try:
            found = (path / name).stat().st_size
        except FileNotFoundError:
            return f"{path / name} is missing"
        if found != size:
            return f"{path / name} has {found} bytes, {size} when it was written"
    return None


def complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in checkpoints(run_dir) if damage(p) is None]


def resumable(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, warning (rank 0) of each damaged one newer than it; None
    if run_dir has no checkpoint at all; a ``RunDirError`` if it has some but none is complete."""
    found = checkpoints(run_dir)
    damaged = []
    for path in reversed(found):
        why = damage(path)
        if why is None:
            return path
        damaged.append(f"{path.name}: {why}")
        if distributed.is_main():
            log.warning(f"checkpoint {path} is damaged ({why}): resuming from the one before it")
    if found:
        raise RunDirError(f"resume=true but no checkpoint in run_dir={run_dir} is complete ({'; '.join(damaged)}): "
                          f"restore the damaged files, or start again in another run_dir")
    return None


def load(path: str | Path, model, optimizer, extra: dict | None = None) -> dict:
    """Collective: restore model, optimizer (and ``extra``, as in ``save``) and this rank's RNG;
    returns the trainer state."""
    path = Path(path)
    state = _states(model, optimizer, extra)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as exc:  # its message is every rank's traceback; the first error says it
        cause = next(iter(exc.failures.values()))[0] if exc.failures else exc
        raise RuntimeError(f"cannot read checkpoint {path}: {type(cause).__name__}: {cause}") from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=LOAD_TRAINED)
    for name, (m, o) in (extra or {}).items():
        set_state_dict(m, o, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optim"],
                       options=LOAD_TRAINED)
    rng_file = path / f"rng-rank{distributed.rank()}.pt"
    if rng_file.exists():  # absent when resuming on a different number of ranks
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


def full_state_dict(model) -> dict:
    """Collective: the unsharded weights, on CPU, on rank 0 (empty elsewhere). A QLoRA model's
    NF4 weights come dequantized, gathered one at a time by ``models.full_tensor``."""
    if not any(models.is_nf4(getattr(p, "_local_tensor", p)) for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = {}
    for name, value in model.state_dict().items():
        whole = models.full_tensor(value)
        if distributed.is_main():
            weights[name] = whole.cpu()
    return weights


def write_hf(out_dir: str | Path, weights: dict, config, tokenizer, generation_config=None, step: int | None = None,
             adapter: tuple | None = None):
    """Rank 0: a ``from_pretrained`` directory (sharded safetensors, config, tokenizer; with
    ``step``, ``checkpoint.json`` naming the checkpoint it is; with ``adapter``, a peft
    (config, weights) pair, ``adapter/`` for ``PeftModel.from_pretrained``), written beside the
    target and swapped in, so a reader never sees a half-written export."""
    from huggingface_hub import save_torch_state_dict

    out = Path(out_dir)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    if old.exists() and not out.exists():  # a swap cut short by a kill: the previous export stays until this is done
        os.replace(old, out)
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
    if adapter is not None:
        from safetensors.torch import save_file

        adapter_config, adapter_weights = adapter
        adapter_config.save_pretrained(tmp / "adapter")
        save_file({k: v.contiguous() for k, v in adapter_weights.items()}, tmp / "adapter" / "adapter_model.safetensors")
    if step is not None:
        (tmp / EXPORTED).write_text(json.dumps({"step": step}) + "\n")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def exported_step(out_dir: str | Path) -> int | None:
    """The step of the checkpoint an export holds (``write_hf(step=...)``), None if unknown."""
    try:
        return json.loads((Path(out_dir) / EXPORTED).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def on_main(out_dir: str | Path, write, *args, **kwargs):
    """Collective: rank 0 runs ``write(*args, **kwargs)``, an export into ``out_dir``; if it fails,
    every rank raises a ``RunDirError`` and the partial ``<out_dir>.tmp`` is removed."""
    out = Path(out_dir)
    failure = _attempt(out, write, *args, **kwargs) if distributed.is_main() else None
    _agree(failure, out.with_name(out.name + ".tmp"))


def hf_config(model):
    """A copy of a (possibly FSDP-wrapped) HF model's config that names its architecture: a model
    built with ``from_config`` has none, and loaders (vLLM, Auto classes) pick the class by it."""
    model = models.under_adapters(model)  # a LoRA model's architecture is the one under its adapters
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.use_cache = True  # training turns the KV cache off; whoever loads the export generates
    return config


def export_hf(model, tokenizer, out_dir: str | Path, step: int | None = None):
    """Collective: export a causal LM for ``AutoModelForCausalLM.from_pretrained``; a LoRA model
    merged (``models.merged_lora_weights``), with its adapter alone in ``adapter/`` for peft."""
    weights = full_state_dict(model)
    adapter = None
    if distributed.is_main():
        if models.is_lora(model):
            from peft.utils import get_peft_model_state_dict

            adapter = (model.peft_config["default"], get_peft_model_state_dict(model, state_dict=weights))
            weights = models.merged_lora_weights(weights, model)
        tied = getattr(models.under_adapters(model), "_tied_weights_keys", None)
        if model.config.tie_word_embeddings and isinstance(tied, dict):
            for key in tied:  # e.g. lm_head.weight: the embedding is saved once and tied on load
                weights.pop(key, None)
    on_main(out_dir, write_hf, out_dir, weights, hf_config(model), tokenizer, getattr(model, "generation_config", None),
            step=step, adapter=adapter)


def lock(run_dir: str | Path):
    """Collective: rank 0 takes an exclusive lock on ``run_dir/lock`` and holds it while it keeps
    the returned file open, and writes there who holds it; every rank raises a ``RunDirError``
    naming the holder if another process has it. The kernel drops the lock when its process ends,
    however it ends, so a job that died leaves nothing in the way."""
    held, refusal = None, None
    if distributed.is_main():
        path = Path(run_dir) / LOCK_FILE
        held = open(path, "a+")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            holder = held.read().strip() or "another process"
            held.close()
            held = None
            refusal = (f"run_dir={run_dir} is in use by {holder} (it holds {path}): wait for that job to end or "
                       f"stop it, or give this run another run_dir")
        except OSError as exc:  # a filesystem without flock (Lustre mounted without -o flock)
            log.warning(f"cannot lock {path} ({exc}): nothing stops a second job from using this run_dir at once")
        else:
            job = os.environ.get("SLURM_JOB_ID")
            held.truncate(0)
            held.write(f"pid {os.getpid()} on {socket.gethostname()}{f' (slurm job {job})' if job else ''}, "
                       f"started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            held.flush()
    refusal = distributed.from_main(refusal)
    if refusal is not None:
        raise RunDirError(refusal)
    return held


# Config keys that may differ when a run resumes: they change how long it trains (the schedule then
# follows the new length), what it evaluates, logs and keeps, or how it is launched, but not what
# the steps it has done would compute. Every other key (loss, model, data, batch sizes, lr and
# schedule, seed, lengths, sampler, ...) must equal what the checkpoint was trained with.
MAY_CHANGE_ON_RESUME = ("n_examples", "n_epochs", "eval_every", "eval_at_start", "eval_at_end", "eval_sampling",
                        "n_eval_model_samples", "save_every", "keep_checkpoints", "loss.save_rollouts",
                        "loss.save_iteration_models", "wandb", "exp_name", "run_dir", "resume", "debug",
                        "dist_timeout_minutes", "requeue_on_timeout", "activation_checkpointing", "packing_check",
                        "reshard_after_forward", "profile_steps", "monitors", "rollout.sync_timeout_s",
                        # how a judge is reached, not what it answers (the address is reward.judges')
                        "judge.api_key_env", "judge.max_concurrency", "judge.timeout_s", "judge.max_retries",
                        "judge.backoff_s", "judge.cache_dir")
# keys added to the config files since a checkpoint may have been written, with the value the code
# used before they existed: a saved config without them ran with that value
ADDED_AT = {"loss.sampling.top_k": 0, "loss.sampling.stop": None, "reward.judges": [], "loss.self_judge": False,
            "loss.divergence": "sampled_reverse_kl", "loss.jsd_beta": 0.5, "rollout.max_staleness": 0,
            "rollout.sampler_ranks": 0}
# keys added since that are read only where a key of ADDED_AT turns them on (reward.judges,
# loss.self_judge): whatever their value now, a saved config without them computed the same
ADDED_UNUSED = ("judge.", "loss.principle")


def config_differences(saved: dict, now: dict) -> list[str]:
    """``key=<saved> (now <now>)`` for every key outside ``MAY_CHANGE_ON_RESUME`` whose value differs.
    A key the saved config lacks and that is null now (or at its ``ADDED_AT`` value) is no
    difference: a key added to the config files since the checkpoint, whose value is what the run
    did before it existed; a key renamed since (``overrides.RENAMED``) is compared under its new name."""

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    def may_change(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)

    a, b = flat(saved), flat(now)
    loss = a.get("loss.name")
    for old_key, per_loss in RENAMED.items():  # a checkpoint from before a key's rename
        if old_key in a and per_loss.get(loss) and per_loss[loss] not in a:
            a[per_loss[loss]] = a.pop(old_key)
    unset = "(unset)"
    return [f"{k}={a.get(k, unset)} (now {b.get(k, unset)})" for k in sorted(a.keys() | b.keys())
            if not may_change(k) and a.get(k, unset) != b.get(k, unset)
            and not (k not in a and (b[k] == ADDED_AT.get(k) or k.startswith(ADDED_UNUSED)))]

def to_resume(run_dir: Path, cfg) -> Path | None:
    """The checkpoint ``resume=true`` continues from (None: a fresh start), once its files and the
    config it was trained with are checked; without ``resume=true``, run_dir must hold none."""
    from models import ConfigError
    from omegaconf import OmegaConf

    if not cfg.resume:
        if checkpoints(run_dir):
            raise ConfigError(f"run_dir={run_dir} already holds checkpoints: pass resume=true or another run_dir")
        return None
    path = resumable(run_dir)
    if path is None:
        return None
    saved = json.loads((path / STATE_FILE).read_text()).get("config")
    if saved is None:
        log.warning(f"{path} records no config (an older checkpoint): resuming without checking that the "
                    f"config is the one it was trained with")
        return path
    differences = config_differences(saved, OmegaConf.to_container(cfg, resolve=True))
    if differences:
        raise ConfigError(
            f"resume=true: {path} was trained with another config: {', '.join(differences)}. These keys shape "
            f"what the run computes: resume with the checkpoint's values (its trainer_state.json lists them all), "
            f"or start a new run_dir (model.archive={run_dir / 'LATEST'} starts it from these weights). Keys that may "
            f"change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}")
    return path


# --- a trainer's checkpoints --------------------------------------------------------------------

def save_run(trainer, export: bool):
    """Collective: a checkpoint of ``trainer`` at its step (the policy, its optimizer, the models
    of ``extra_models`` and ``trainer_state``), and with ``export`` the HF directory ``LATEST``."""
    path = save(trainer.run_dir, trainer.step, trainer.model, trainer.optimizer, trainer.trainer_state(),
                keep=trainer.cfg.keep_checkpoints, extra=trainer.extra_models(), files=trainer.checkpoint_files())
    log.info(f"saved {path}")
    if export:
        trainer.export(trainer.run_dir / "LATEST", step=trainer.step)


def last_checkpoint(run_dir: str | Path) -> str:
    """The newest complete checkpoint, for a message ("none" if there is none)."""
    found = complete(run_dir)
    return str(found[-1]) if found else "none"


def resume_run(trainer):
    """Collective: ``trainer`` as its newest complete checkpoint left it (``trainer.resume_from``),
    its metrics log cut back to that step; then what the killed run may have left undone after
    writing it: ``LATEST`` (at the last step the whole remaining run), and deleting the
    checkpoints it replaces."""
    path, run_dir = trainer.resume_from, trainer.run_dir
    if path is None:
        log.info(f"resume=true but {run_dir} has no complete checkpoint: starting fresh")
        return
    state = load(path, trainer.model, trainer.optimizer, extra=trainer.extra_models())
    check_base(state.get("base_fingerprint"), trainer.base_fingerprint, trainer.cfg, path)
    trainer.restore_state(state)
    trainer.restore_files(path)
    trainer.metrics.truncate(state["metric_lines"], path)  # what the killed run logged after it goes
    step = trainer.step
    log.info(f"resumed from {path} at step {step}")
    latest = run_dir / "LATEST"
    if distributed.from_main(exported_step(latest)) != step:
        trainer.export(latest, step=step)
        log.info(f"exported {latest} (step {step})")
    if distributed.is_main() and trainer.cfg.keep_checkpoints:
        prune(run_dir, trainer.cfg.keep_checkpoints)


def check_base(saved: list[float] | None, now: list[float], cfg, path: Path):
    """Refuse to resume from weights other than those the checkpoint's run started from. A
    checkpoint holds only what trains; the frozen base of a LoRA policy and the reference are read
    again from ``model``, which may have been overwritten since."""
    if saved is None or all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, now)):
        return
    where = models.weights_path(cfg.model) or f"random init from seed={cfg.seed}"
    raise models.ConfigError(f"resume=true: {path} was trained from other starting weights than those at {where} now "
                             f"(they changed since: an overwritten export?): put those weights back, or start a new "
                             f"run_dir from these")
