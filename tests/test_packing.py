"""Packing against the unpacked computation: every sequence run alone through the same model."""

import random

import pytest
import torch
from omegaconf import OmegaConf

import models
from data.packing import balanced_bins, first_fit_decreasing, pack, pad, unpack
from data.tokenize import IGNORE
from helpers import alone, random_sequences
from losses import sft_loss
from logprobs import token_logps

TINY = OmegaConf.load(models.REPO / "config" / "model" / "tiny.yaml")


@pytest.fixture(scope="module")
def model():
    return models.load_model(TINY, torch.device("cpu"), seed=0)


def test_ffd_bins_hold_every_index_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    for fn in (first_fit_decreasing, balanced_bins):
        bins = fn(lengths, 64)
        assert sorted(i for b in bins for i in b) == list(range(200))
        assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # FFD on a case worked by hand: 7+3, 6+4, 5+5 -> three full bins of 10
    assert sorted(sorted(b) for b in first_fit_decreasing([7, 6, 5, 5, 4, 3], 10)) == [[0, 5], [1, 4], [2, 3]]
    with pytest.raises(ValueError, match="more than a row holds"):
        first_fit_decreasing([11], 10)


def test_pack_layout_restarts_positions_and_masks_boundaries():
    seqs = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8, 9], "labels": [IGNORE, 9]}]
    b = pack(seqs, row_tokens=8, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # logits at t predict token t+1; the last token of a sequence predicts nothing
    assert b["targets"].tolist() == [[6, 7, IGNORE, 9, IGNORE]]
    assert b["seq_ids"].tolist() == [[0, 0, 0, 1, 1]]
    # two rows of unequal length: the short one gets a padding segment with its own positions
    b = pack(seqs, row_tokens=3, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert b["seq_ids"].tolist() == [[0, 0, 0], [1, 1, -1]]


@pytest.mark.parametrize("row_tokens", [48, 1000])
def test_packed_loss_and_grads_equal_unpacked(model, row_tokens):
    seqs = random_sequences(9, random.Random(1))
    model.zero_grad()
    batch = pack(seqs, row_tokens, pad_id=0)
    assert batch["input_ids"].shape[0] > (1 if row_tokens == 48 else 0)
    logps, mask = token_logps(model, batch)
    packed = sft_loss(logps, mask)
    packed.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    per_seq = torch.zeros(len(seqs)).index_add_(0, batch["seq_ids"].clamp(min=0).flatten(),
                                                (logps * (batch["seq_ids"] >= 0)).flatten().detach())

    model.zero_grad()
    singles = [alone(model, s) for s in seqs]
    reference = -sum(singles)
    reference.backward()
    torch.testing.assert_close(packed.detach(), reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_seq, torch.stack(singles).detach(), rtol=1e-5, atol=1e-5)
    for g, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def test_positions_that_do_not_restart_leak_across_sequences(model):
    """The check above can fail: without restarting positions the packed row is one long sequence."""
    seqs = random_sequences(4, random.Random(2))
    batch = pack(seqs, 1000, pad_id=0)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    with torch.no_grad():
        logps, mask = token_logps(model, batch)
        reference = sum(alone(model, s) for s in seqs)
    assert abs((logps * mask).sum() - reference) > 1e-3


def test_padded_layout_gives_the_same_loss(model):
    seqs = random_sequences(5, random.Random(3))
    with torch.no_grad():
        a = sft_loss(*token_logps(model, pack(seqs, 1000, pad_id=0)))
        b = sft_loss(*token_logps(model, pad(seqs, pad_id=0)))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_per_token_fields_line_up_with_the_targets_they_belong_to(model):
    """RL advantages and old log-probs travel with their tokens: after packing (rows mixing
    sequences in another order) each value sits on the target of the response token it was given
    for, ``unpack`` gives every sequence its values back in order, and log-probs unpacked from a
    packed forward equal each sequence's own unpacked forward, token by token."""
    rng = random.Random(3)
    seqs = random_sequences(9, rng)
    for s in seqs:
        p = sum(label == IGNORE for label in s["labels"])
        s["adv"] = [0.0] * p + [rng.uniform(-1, 1) for _ in s["input_ids"][p:]]
    batch = pack(seqs, 40, pad_id=0, fields=("adv",))
    assert len(batch["input_ids"]) > 1
    n = len(seqs)
    for i, s in enumerate(seqs):
        p = sum(label == IGNORE for label in s["labels"])
        # the values of sequence i, read back by position: the target there is the response token
        where = (batch["seq_ids"] == i) & (batch["targets"] != IGNORE)
        assert batch["targets"][where].tolist() == s["input_ids"][p:]
        assert batch["adv"][where].tolist() == pytest.approx(s["adv"][p:])
        assert unpack(batch["adv"], batch, n)[i].tolist() == pytest.approx(s["adv"][p:])
    assert (batch["adv"][batch["targets"] == IGNORE] == 0).all()
    with torch.no_grad():
        per_token = unpack(token_logps(model, batch)[0], batch, n)
        for i, s in enumerate(seqs):
            ids = torch.tensor([s["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            p = sum(label == IGNORE for label in s["labels"])
            expected = [logp[t, s["input_ids"][t + 1]].item() for t in range(p - 1, len(s["input_ids"]) - 1)]
            assert per_token[i].tolist() == pytest.approx(expected, abs=1e-5)
    padded = pad(seqs, 0, fields=("adv",))
    for i, s in enumerate(seqs):
        assert unpack(padded["adv"], padded, n)[i].tolist() == pytest.approx(unpack(batch["adv"], batch, n)[i].tolist())
