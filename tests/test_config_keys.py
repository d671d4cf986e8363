"""Defaults live only in YAML: every ``config/loss/*.yaml``, composed, holds exactly the ``loss.``
keys of its trainer class's schema (``loss_config``, a dataclass beside the class: the keys and
their types), and the class reads exactly those; no key that does nothing, none read with a
default hidden in code.

What a class reads is found in ``trainers.py``'s source: every ``<...>.cfg.loss.<key>``,
``cfg.loss.<key>`` and ``<name>.<key>`` where ``<name>`` was assigned ``<...>.cfg.loss``, in the
methods that run for the class (its own and inherited ones; an override hides its base's unless
it calls ``super()``'s) and in the module functions those call. ``name`` (the run's label) and ``trainer`` (read by train.py)
are in every file."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import trainers
import overrides
from conftest import REPO, make_cfg

SOURCE = ast.parse(Path(trainers.__file__).read_text())
CLASSES = {n.name: n for n in ast.walk(SOURCE) if isinstance(n, ast.ClassDef)}  # online()'s Online too
FUNCTIONS = {n.name: n for n in SOURCE.body if isinstance(n, ast.FunctionDef)}
LOSS_FILES = sorted((Path(trainers.__file__).parent / "config" / "loss").glob("*.yaml"))


def is_loss_config(node) -> bool:
    """``cfg.loss`` or ``<anything>.cfg.loss``."""
    return (isinstance(node, ast.Attribute) and node.attr == "loss"
            and ((isinstance(node.value, ast.Name) and node.value.id == "cfg")
                 or (isinstance(node.value, ast.Attribute) and node.value.attr == "cfg")))


def reads_of(function, seen: set) -> set[str]:
    """Loss keys ``function`` reads, and those of the module functions it calls."""
    aliases = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(node.value, ast.Tuple) else [(target, node.value)])
                aliases |= {t.id for t, v in pairs if isinstance(t, ast.Name) and is_loss_config(v)}
    reads = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and (is_loss_config(node.value) or (
                isinstance(node.value, ast.Name) and node.value.id in aliases)):
            reads.add(node.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS \
                and node.func.id not in seen:
            seen.add(node.func.id)
            reads |= reads_of(FUNCTIONS[node.func.id], seen)
    return reads


def calls_super(method) -> bool:
    """Whether ``method`` calls ``super().<its own name>``."""
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == method.name
               and isinstance(n.func.value, ast.Call) and isinstance(n.func.value.func, ast.Name)
               and n.func.value.func.id == "super" for n in ast.walk(method))


def class_reads(cls) -> set[str]:
    """The methods that run for ``cls``: for each name, the first definition in the MRO, and the
    next one each time a definition calls ``super()``'s."""
    definitions = {}
    for base in cls.__mro__:
        for node in CLASSES[base.__name__].body if base.__name__ in CLASSES else ():
            if isinstance(node, ast.FunctionDef):
                definitions.setdefault(node.name, []).append(node)
    seen, reads = set(), set()
    for chain in definitions.values():
        for method in chain:
            reads |= reads_of(method, seen)
            if not calls_super(method):
                break
    return reads - {"name"}


def test_the_analysis_sees_what_each_class_reads():
    """The finder is not blind: it sees the keys each class is known to read, and only those."""
    grpo, ppo, dpo, online = (class_reads(trainers.TRAINERS[n]) for n in
                              ("GRPOTrainer", "PPOTrainer", "DPOTrainer", "OnlineDPOTrainer"))
    assert {"scale_rewards", "filter_groups", "clip", "rollout_batch_size", "sampling"} <= grpo
    assert {"critic_lr", "vf_coef", "lam"} <= ppo and not {"scale_rewards", "filter_groups"} & ppo
    assert {"precompute_ref_logps", "reference_free", "label_smoothing"} <= dpo
    # the online loop's reference comes with its pairs: DPOTrainer's reference_mode is overridden
    assert "precompute_ref_logps" not in online and {"epochs_per_iteration", "min_score_gap", "beta"} <= online


@pytest.mark.parametrize("path", LOSS_FILES, ids=lambda p: p.stem)
def test_each_loss_file_holds_exactly_the_keys_its_class_reads(path):
    loss = make_cfg(f"loss={path.stem}").loss
    assert loss.name == path.stem
    assert loss.trainer in trainers.TRAINERS, f"{path.name}: trainer={loss.trainer} is not a trainer class"
    cls = trainers.TRAINERS[loss.trainer]
    schema = {f.name for f in dataclasses.fields(cls.loss_config)}
    keys, reads = set(loss) - {"name", "trainer"}, class_reads(cls)
    assert keys == schema, f"{path.name} vs {cls.loss_config.__name__}: {sorted(keys ^ schema)}"
    overrides.check_schema(loss, cls.loss_config, "loss", "an option")  # the types too
    assert not keys - reads, f"{path.name}: keys {sorted(keys - reads)} are read by nothing in {loss.trainer}"
    assert not reads - keys, f"{path.name}: {loss.trainer} reads loss.{sorted(reads - keys)}, which the file lacks"


def test_a_loss_value_of_the_wrong_type_or_a_key_no_schema_has_is_one_line(tmp_path):
    """The schema checks what the command line's key check cannot: the types, and the keys of a
    loss file a user wrote."""
    grpo = trainers.GRPOConfig
    loss = make_cfg("loss=grpo").loss
    with pytest.raises(overrides.OverrideError, match=r"^loss\.clip: Value 'wide' of type 'str' could not be "
                                                      r"converted to Float$"):
        overrides.check_schema({**loss, "clip": "wide"}, grpo, "loss", "an option of loss=grpo")
    with pytest.raises(overrides.OverrideError, match=r"^loss\.sampling\.stpo is not an option of loss=grpo: "
                                                      r"did you mean loss\.sampling\.stop\?$"):
        overrides.check_schema({**loss, "sampling": {**loss.sampling, "stpo": None}}, grpo, "loss",
                               "an option of loss=grpo")
    with pytest.raises(overrides.OverrideError, match=r"^loss\.filter_groups is missing: GRPOConfig needs it$"):
        overrides.check_schema({k: v for k, v in loss.items() if k != "filter_groups"}, grpo, "loss", "an option")
    out = subprocess.run([sys.executable, "train.py", "loss=grpo", "model=tiny", "datasets=[toy_add_prompts]",
                          "reward.functions=[toy_add]", "loss.clip=wide", f"run_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: loss.clip: Value 'wide' of type 'str' could not be converted to Float"]


def test_every_trainer_class_has_a_loss_file():
    named = {make_cfg(f"loss={p.stem}").loss.trainer for p in LOSS_FILES}
    assert named == set(trainers.TRAINERS)
