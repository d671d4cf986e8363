"""The command line's Hydra overrides, checked before Hydra and anything heavy runs.

Hydra refuses an unknown key with a traceback and no hint, accepts ``+key=`` for a key no code
reads, and knows nothing of the DPO repo's keys (seed 002) its users type. ``check(argv)``
answers each with one line: an unknown key names the closest valid one, a DPO-repo key names
what to write here instead (or is accepted where it means what FSDP already does), a ``+key``
nothing reads is warned about. It returns the argv Hydra should see.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "config"
GROUPS = ("loss", "model", "sampler")  # config groups: loss=dpo picks config/loss/dpo.yaml
# keys under these hold whatever a user names: a transformers config, dataset names
OPEN = ("model.init.", "data.paths.", "hydra.")

# The DPO repo's keys (seed 002) with no key of the same meaning here
DPO_REPO = {
    "data_fraction": "train on part of the data with n_examples=<number of examples> (counts are in examples)",
    "prefs_path": "a file of preference pairs is a dataset here: datasets=[<path to .jsonl/.json/.parquet>]",
    "trainer=TensorParallelTrainer": "there is no tensor-parallel trainer: every model is sharded with FSDP2; drop trainer=",
    "trainer=BasicTrainer": "BasicTrainer (one process, no sharding) is a world of one here: run "
                            "`python train.py ...` or `torchrun --nproc_per_node 1 train.py ...` and drop trainer=",
}


# Keys renamed so that one name means one thing: per loss, the old name and the new one. (beta was
# DPO's KL strength, IPO's tau, SimPO's scale and ORPO's weight; gamma SimPO's margin and a discount;
# margin the reward model's and online DPO's score gap; ppo_epochs and epochs_per_iteration one thing.)
RENAMED = {
    "loss.beta": {"ipo": "loss.tau", "simpo": "loss.reward_scale", "orpo": "loss.odds_ratio_weight"},
    "loss.gamma": {"simpo": "loss.target_margin"},
    "loss.margin": {"online_dpo": "loss.min_score_gap"},
    "loss.ppo_epochs": {name: "loss.epochs_per_iteration" for name in ("ppo", "grpo", "rloo", "reinforce_pp")},
}


class OverrideError(ValueError):
    """An override that cannot mean what the user wants."""


def known_keys(node, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in node.items():
        name = f"{prefix}{k}"
        keys.add(name)
        if OmegaConf.is_dict(v):
            keys |= known_keys(v, name + ".")
    return keys


def compose(groups: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=groups)


def check(argv: list[str], warn=print) -> list[str]:
    """``argv`` (sys.argv[1:]) as Hydra should see it; raises OverrideError for a mistake."""
    kept, groups, others = [], [], []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            kept.append(arg)  # Hydra's own flags (--multirun, --cfg job, ...)
            continue
        key, value = arg.split("=", 1)
        bare = key.lstrip("+~")
        if bare == "trainer":  # the DPO repo's trainer class
            if f"trainer={value}" in DPO_REPO:
                raise OverrideError(f"trainer={value}: {DPO_REPO[f'trainer={value}']}")
            if value != "FSDPTrainer":
                raise OverrideError(f"trainer={value}: not a trainer here; the trainer is picked by loss= "
                                    f"(config/loss/*.yaml names it)")
            warn("trainer=FSDPTrainer: FSDP is how every run here is sharded; the override is dropped")
            continue
        if bare in DPO_REPO:
            raise OverrideError(f"{bare}= (a DPO-repo option) does not exist here: {DPO_REPO[bare]}")
        if bare in GROUPS:
            if not (CONFIG_DIR / bare / f"{value}.yaml").exists():
                have = sorted(p.stem for p in (CONFIG_DIR / bare).glob("*.yaml"))
                raise OverrideError(f"{arg}: there is no config/{bare}/{value}.yaml; choose one of {', '.join(have)}")
            groups.append(arg)
        else:
            others.append((arg, key, bare))
        kept.append(arg)
    cfg = compose(groups)
    keys = known_keys(cfg)
    # keys of the other loss files: loss.beta under loss=sft is a known key of the wrong loss
    elsewhere: dict[str, list[str]] = {}
    for path in sorted((CONFIG_DIR / "loss").glob("*.yaml")):
        for k in known_keys(OmegaConf.load(path), "loss."):
            elsewhere.setdefault(k, []).append(path.stem)
    for arg, key, bare in others:
        if bare in keys or bare.startswith(OPEN):
            continue
        if key.startswith("+"):
            warn(f"warning: {arg} adds the key {bare}, which no config file has: nothing may read it")
            continue
        renamed = RENAMED.get(bare, {}).get(cfg.loss.name)
        if renamed:
            raise OverrideError(f"{bare} (in {arg}) is called {renamed} under loss={cfg.loss.name} (renamed: the old name "
                                f"meant different things in different losses): write {renamed}={arg.split('=', 1)[1]}")
        if bare in elsewhere:
            raise OverrideError(f"{bare} (in {arg}) is not an option of loss={cfg.loss.name}: it is one of "
                                f"loss={', loss='.join(elsewhere[bare])}")
        close = difflib.get_close_matches(bare, sorted(keys | set(elsewhere)), n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}?" if close else ": see config/config.yaml and the loss= and model= files"
        raise OverrideError(f"unknown key {bare} (in {arg}){hint}")
    return kept


def epochs_to_examples(save_every, n_train: int):
    """``save_every``: a number of examples, or the DPO repo's ``epoch_N`` (every N epochs)."""
    if save_every is None or isinstance(save_every, int):
        return save_every
    match = re.fullmatch(r"epoch_(\d+)", str(save_every))
    if not match:
        raise OverrideError(f"save_every={save_every}: expected a number of examples or epoch_<N>")
    return int(match.group(1)) * n_train


def check_schema(node, schema, key: str, what: str):
    """``node``, the config section named ``key``, against ``schema``: a dataclass of exactly its
    keys with their types (a nested dataclass for a nested section). Returns the section as a
    ``schema`` instance (its ``__post_init__`` checks run); a mistake is an ``OverrideError`` of one
    line: a key that is not ``what`` (with the closest one), a value of the wrong type, a missing key."""
    import dataclasses
    import typing

    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    given = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    given = {k: v for k, v in given.items() if k not in ("name", "trainer")}  # the loss's label and class
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), given))
    except ConfigKeyError as e:
        *path, bad = e.full_key.split(".")
        inner = schema
        for part in path:  # the nested section the key is in, for its valid names
            inner = typing.get_type_hints(inner)[part]
        close = difflib.get_close_matches(bad, [f.name for f in dataclasses.fields(inner)], n=1, cutoff=0.6)
        hint = f"did you mean {'.'.join([key, *path, close[0]])}?" if close else f"see {schema.__name__}"
        raise OverrideError(f"{key}.{e.full_key} is not {what}: {hint}") from None
    except MissingMandatoryValue as e:
        raise OverrideError(f"{key}.{e.full_key} is missing: {schema.__name__} needs it") from None
    except ValidationError as e:
        raise OverrideError(f"{key}.{e.full_key}: {str(e).splitlines()[0]}") from None
