"""Preference and reward-model trainers: packed per-sequence quantities against sequences run
alone, the reward head's token, rank invariance, the precomputed reference, exports, bad input."""

import json
import random

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import distributed
import models
from conftest import fast_overrides, make_cfg, run_ranks
from data import DataError
from data.packing import pack
from helpers import alone, assert_same_run, metrics, random_sequences, train_run
from logprobs import token_logps
from trainers import TRAINERS, last_positions, per_sequence

TINY = OmegaConf.load(models.REPO / "config" / "model" / "tiny.yaml")


def test_last_positions_and_per_sequence_on_a_hand_made_layout():
    seq_ids = torch.tensor([[0, 0, 0, 2, 2], [1, 1, 3, -1, -1]])
    assert last_positions(seq_ids, 4).tolist() == [2, 6, 4, 7]  # flat indices into [2, 5]
    values = torch.arange(10.0).view(2, 5)
    assert per_sequence(values, seq_ids, 4).tolist() == [0 + 1 + 2, 5 + 6, 3 + 4, 7]


def test_packed_pair_logps_equal_each_sequence_alone():
    model = models.load_model(TINY, torch.device("cpu"), seed=0)
    seqs = random_sequences(10, random.Random(5))  # five pairs: chosen 2i, rejected 2i+1
    batch = pack(seqs, 40, pad_id=0)
    with torch.no_grad():
        got = per_sequence(token_logps(model, batch)[0], batch["seq_ids"], len(seqs))
        want = torch.stack([alone(model, s) for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reward_head_reads_the_last_token_of_each_packed_sequence():
    rm = models.RewardModel(models.load_model(TINY, torch.device("cpu"), seed=0))
    torch.nn.init.normal_(rm.score.weight)  # a head that tells tokens apart
    seqs = random_sequences(7, random.Random(6))
    batch = pack(seqs, 30, pad_id=0)
    with torch.no_grad():
        scores, _ = rm(batch["input_ids"], batch["position_ids"])
        got = scores.flatten()[last_positions(batch["seq_ids"], len(seqs))]
        want = [rm(torch.tensor([s["input_ids"]]), torch.arange(len(s["input_ids"]))[None])[0][0, -1] for s in seqs]
        first = [rm(torch.tensor([s["input_ids"]]), torch.arange(len(s["input_ids"]))[None])[0][0, 0] for s in seqs]
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, torch.stack(first), atol=1e-3)  # the test tells tokens apart


PREF = ["datasets=[toy_add_pref]", "lr=1e-3"]


@pytest.mark.parametrize("loss", ["dpo", "rm"])
def test_two_ranks_equal_one_process(tmp_path, loss):
    """DPO's 2 ranks keep each layer's weights gathered (reshard_after_forward=false), its frozen
    reference too: the same numbers."""
    runs = []
    for world, accum in ((1, 2), (2, 1)):
        run_dir = tmp_path / f"{loss}-w{world}"
        overrides = fast_overrides(run_dir) + PREF + [f"loss={loss}", f"gradient_accumulation_steps={accum}"]
        overrides += ["reshard_after_forward=false"] if world == 2 and loss == "dpo" else []
        runs.append((run_ranks(train_run, world, tmp_path, overrides)[0], metrics(run_dir)))
    (w1, m1), (w2, m2) = runs
    assert_same_run(m1, m2)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def pair_logps_of_few(rank, world, overrides):
    """The trainer's pair log-probs of 1, 2 and 3 pairs: fewer pairs than ranks x eval batch."""
    cfg = make_cfg(*overrides)
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    return [trainer.pair_logps(trainer.eval_examples[:n]) for n in (1, 2, 3)]


def test_pair_logps_of_fewer_pairs_than_ranks_equal_one_process(tmp_path):
    """Online DPO's iteration can keep a single pair: each rank still runs its forwards (the last
    round filled with repeats) and the values are one process's. It used to leave rank 1 an empty
    share, whose packing raised ``max() arg is an empty sequence``."""
    overrides = fast_overrides(tmp_path / "run") + PREF + ["loss=dpo", "eval_batch_size=64"]
    one, two = (run_ranks(pair_logps_of_few, world, tmp_path, overrides)[0] for world in (1, 2))
    assert [len(x) for x in two] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(two[2]), torch.tensor(one[2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(two[0]), torch.tensor(one[2][:1]), rtol=1e-5, atol=1e-5)


def test_precomputed_reference_equals_resident_reference(tmp_path):
    runs = {}
    for precompute in (False, True):
        run_dir = tmp_path / f"pre{precompute}"
        overrides = fast_overrides(run_dir) + PREF + ["loss=dpo", f"loss.precompute_ref_logps={precompute}"]
        run_ranks(train_run, 1, tmp_path, overrides)
        runs[precompute] = metrics(run_dir)
    assert_same_run(runs[True], runs[False])
    assert (tmp_path / "preTrue" / "reference_logps.pt").exists()


@pytest.mark.parametrize("loss", ["cdpo", "ipo", "kto", "simpo", "orpo"])
def test_every_preference_loss_trains(tmp_path, loss, single_process):
    # a preference a random-init model can pick up in a few steps, and that held-out pairs share
    pairs = [{"prompt": f"{i}+{i}=", "chosen": "yes", "rejected": "no"} for i in range(200)]
    path = write_jsonl(tmp_path / "easy.jsonl", pairs)
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), f"datasets=[{path}]", "lr=1e-3", f"loss={loss}", "n_examples=64")
    TRAINERS[cfg.loss.trainer](cfg, distributed.device()).train()
    records = metrics(tmp_path / "run")
    assert all(r["grad_norm"] > 0 for r in records if "grad_norm" in r)
    assert records[-1]["eval/loss"] < records[0]["eval/loss"]
    assert records[-1]["eval/rewards/margin"] > records[0]["eval/rewards/margin"]


def test_reward_model_export_loads_as_sequence_classification(tmp_path, single_process):
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), *PREF, "loss=rm", "loss.lm_coef=0.5", "n_examples=16")
    trainer = TRAINERS["RewardTrainer"](cfg, distributed.device())
    trainer.train()
    assert "eval/lm/nll_chosen" in metrics(tmp_path / "run")[-1]
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "LATEST")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "LATEST")
    ids = torch.tensor([tok("<|user|>1+2=<|end|><|assistant|>3<|end|>", add_special_tokens=False)["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(ids, torch.arange(ids.shape[1])[None])[0][0, -1]
        got = exported(input_ids=ids).logits[0, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"row 2: field 'rejected': identical to 'chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, r"row 2: field 'rejected': empty"),
    ({"prompt": "q", "chosen": "a"}, r"row 2: field 'rejected': missing"),
])
def test_bad_pairs_fail_before_training(tmp_path, bad, message, single_process):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), f"datasets=[{path}]", "loss=dpo")
    with pytest.raises(DataError, match=f"{path}: {message}"):
        TRAINERS["DPOTrainer"](cfg, distributed.device())


def test_sft_rows_given_to_a_preference_loss(tmp_path, single_process):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "a"}] * 3)
    cfg = make_cfg(*fast_overrides(tmp_path / "run"), f"datasets=[{path}]", "loss=rm")
    with pytest.raises(DataError, match=r"sft.jsonl: holds 'sft' rows, but this loss needs 'pref' rows"):
        TRAINERS["RewardTrainer"](cfg, distributed.device())


def test_rpo_adds_alpha_times_the_chosen_nll(tmp_path, single_process):
    evals = {}
    for alpha in (0.0, 2.0):
        cfg = make_cfg(*fast_overrides(tmp_path / f"a{alpha}"), *PREF, "loss=dpo", f"loss.rpo_alpha={alpha}", "n_examples=8")
        evals[alpha] = TRAINERS["DPOTrainer"](cfg, distributed.device()).evaluate()  # before any step
    nll = evals[2.0]["eval/nll/chosen"]
    assert nll > 0.1  # random init: the chosen replies are unlikely
    assert evals[2.0]["eval/loss"] == pytest.approx(evals[0.0]["eval/loss"] + 2.0 * nll, rel=1e-6)
