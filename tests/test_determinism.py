"""Two identical runs give identical results: every trainer, 2 ranks, started from an exported model
(``model.archive``, as the stages chain), metrics.jsonl line for line (timings aside) and weights
bit for bit.

Ranks forked by ``conftest.run_ranks`` inherit the fork server's RNG state, so two runs there would
agree even if something drew from the process's global RNG; a fresh ``torchrun`` process starts
from a random seed. Each run here therefore scrambles the global RNGs first, as a new process would
find them.
"""

import json
import os
import random

import numpy as np
import pytest
import torch

import models
from conftest import fast_overrides, run_ranks
from helpers import online_overrides, rl_overrides, train_run

TIMING = ("tokens_per_s", "samples_per_s", "memory/peak_gb")


def fresh_process_run(rank, world, overrides):
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    return train_run(rank, world, overrides)


def lines(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if not k.startswith("timing/") and k not in TIMING})
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The tiny model exported as a previous stage would (an HF directory with its tokenizer)."""
    from omegaconf import OmegaConf

    out = tmp_path_factory.mktemp("archive")
    cfg = OmegaConf.load(models.REPO / "config" / "model" / "tiny.yaml")
    models.load_model(cfg, torch.device("cpu"), seed=1).save_pretrained(out)
    models.load_tokenizer(cfg).save_pretrained(out)
    return out


RUNS = {
    "sft": lambda d: fast_overrides(d),
    "rm": lambda d: fast_overrides(d) + ["loss=rm", "datasets=[toy_add_pref]"],
    "dpo": lambda d: fast_overrides(d) + ["loss=dpo", "datasets=[toy_add_pref]"],
    "grpo": lambda d: rl_overrides(d, "grpo", "loss.sampling.temperature=0.7"),
    "online_dpo": lambda d: online_overrides(d, "online_dpo"),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_identical_runs_are_bit_identical(tmp_path, archive, name):
    results = []
    for attempt in ("a", "b"):
        run_dir = tmp_path / attempt
        weights = run_ranks(fresh_process_run, 2, tmp_path, RUNS[name](run_dir) + [f"model.archive={archive}"])[0]
        results.append((lines(run_dir), weights))
    (m1, w1), (m2, w2) = results
    assert m1 == m2
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
