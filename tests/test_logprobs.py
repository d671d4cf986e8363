"""Chunked log-probs (logprobs.py): the LM head a few positions at a time gives the numbers and the
gradients of the full logits, written out plainly here, for the SFT, DPO and GRPO losses; no
[tokens, vocab] tensor is kept for backward; a model whose logits are more than its LM head is
refused; a sharded 2-rank run equals the unchunked one."""

import math
import random

import pytest
import torch
from omegaconf import OmegaConf

import logprobs
import models
from conftest import fast_overrides, run_ranks
from data.packing import pack, per_sequence
from helpers import assert_same_run, metrics, random_sequences, train_run
from losses import sft_loss
from losses.preference import dpo_loss
from losses.rl import generalized_jsd, ppo_policy_loss

CHUNK = 5  # far below a batch's tokens, and not dividing them: chunks of several sizes


def tiny(**init):
    cfg = OmegaConf.create({"name": "t", "name_or_path": None, "archive": None, "fsdp_policy_mp": "float32",
                            "attn_implementation": "auto",
                            "init": {"model_type": "llama", "vocab_size": 262, "hidden_size": 64, "intermediate_size": 128,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "tie_word_embeddings": True, **init}})
    return models.load_model(cfg, torch.device("cpu"), seed=0)


def plain_logps(model, batch, temperature=1.0):
    """log softmax(logits / T)[target] and the entropy -sum p log p at every position, from the
    model's own full logits, with nothing of logprobs.py."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    mask = (batch["targets"] >= 0).float()
    picked = logp_all.gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0]
    return picked * mask, mask, -(logp_all.exp() * logp_all).sum(-1) * mask


def sft(logps, mask, entropy, batch, n):
    return sft_loss(logps, mask)


def dpo(logps, mask, entropy, batch, n):
    seq = per_sequence(logps, batch["seq_ids"], n)
    ref = torch.linspace(-30, -10, n)  # a fixed reference, as precomputed log-probs would be
    losses, _, _ = dpo_loss(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.1)
    return losses.sum()


def grpo(logps, mask, entropy, batch, n):
    g = torch.Generator().manual_seed(1)
    old = (logps.detach() + 0.05 * torch.randn(logps.shape, generator=g)) * mask  # ratios off 1, some clipped
    advantages = torch.randn(logps.shape, generator=g) * mask
    per_token, _ = ppo_policy_loss(logps, old, advantages, mask, 0.2, 0.28, is_weight=torch.ones_like(logps))
    return (per_token * mask).sum() - 0.01 * (entropy * mask).sum()  # with the entropy bonus, as loss.entropy_coef


@pytest.mark.parametrize("loss", [sft, dpo, grpo])
def test_chunked_logps_and_gradients_equal_the_full_logits(loss):
    temperature = 0.7 if loss is grpo else 1.0  # RL's policy is the tempered one
    model = tiny()
    batch = pack(random_sequences(10, random.Random(0)), 48, pad_id=0)
    assert batch["input_ids"].numel() > 4 * CHUNK
    n = 10

    want_logps, mask, want_entropy = plain_logps(model, batch, temperature)
    want = loss(want_logps, mask, want_entropy, batch, n)
    want_grads = torch.autograd.grad(want, list(model.parameters()))

    got_logps, got_mask, got_entropy = logprobs.token_logps(model, batch, chunk=CHUNK, temperature=temperature,
                                                            with_entropy=True)
    got = loss(got_logps, got_mask, got_entropy, batch, n)
    got_grads = torch.autograd.grad(got, list(model.parameters()))

    torch.testing.assert_close(got_logps, want_logps, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_entropy, want_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_jsd_and_its_gradients_equal_the_full_logits(beta):
    """On-policy distillation's JSD (trainers.DistillTrainer, divergence=jsd): the teacher's
    whole distribution at the scored positions and the student's divergence from it, chunked,
    equal generalized_jsd of the two models' own full logits at those positions, values and
    gradients; zero where there is no target."""
    student, teacher, temperature = tiny(), tiny(hidden_size=32, intermediate_size=64), 0.8
    torch.manual_seed(1)
    teacher.apply(lambda m: torch.nn.init.normal_(m.weight, std=0.3) if isinstance(m, torch.nn.Embedding) else None)
    batch = pack(random_sequences(6, random.Random(2)), 40, pad_id=0)
    mask = (batch["targets"] >= 0)

    def full(model):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return torch.log_softmax(logits.float() / temperature, -1)[mask]

    want = torch.zeros(batch["targets"].shape)
    want[mask] = generalized_jsd(full(student), full(teacher).detach(), beta)
    want_grads = torch.autograd.grad(want.sum(), list(student.parameters()))

    with torch.no_grad():
        teacher_logps = logprobs.vocab_logps(teacher, batch, CHUNK, temperature)
    torch.testing.assert_close(teacher_logps, full(teacher), rtol=0, atol=1e-5)
    got = logprobs.jsd(student, batch, teacher_logps, beta, CHUNK, temperature)
    got_grads = torch.autograd.grad(got.sum(), list(student.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[~mask] == 0).all() and (got[mask] > 0).all()
    for (name, _), g, w in zip(student.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=name)
    unchunked = logprobs.jsd(student, batch, logprobs.vocab_logps(teacher, batch, None, temperature), beta, None,
                             temperature)
    torch.testing.assert_close(unchunked, want, rtol=1e-5, atol=1e-6)


def kept_set(probs: list[float], top_k: int, top_p: float) -> set[int]:
    """The tokens a top-k/top-p sampler may draw, from the warpers' definition written out: the
    top_k most likely (all if 0); of those, remove the least likely while their total probability,
    renormalised over what top-k kept, is at most 1 - top_p; the most likely always stays."""
    order = sorted(range(len(probs)), key=lambda i: probs[i], reverse=True)
    kept = order[:top_k] if top_k else order
    total = sum(probs[i] for i in kept)
    removed, mass = set(), 0.0
    for i in reversed(kept[1:]):  # least likely first
        mass += probs[i] / total
        if mass > 1 - top_p:
            break
        removed.add(i)
    return set(kept) - removed


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (20, 1.0), (20, 0.7), (3, 0.95)])
def test_truncated_logps_are_the_samplers_distribution(top_k, top_p):
    """With top_k/top_p the log-prob of a target is log(p / S) over the sampler's kept set (S its
    mass), and the entropy that of the renormalised kept set; the chunked path and the full logits
    agree, values and gradients, and a target outside the set (a rounding at the boundary) stays."""
    model = tiny()
    batch = pack(random_sequences(6, random.Random(1)), 48, pad_id=0)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits.float()
    probs = torch.softmax(logits / 0.7, dim=-1)[0].tolist()
    targets = batch["targets"][0].tolist()
    want, want_entropy = [], []
    for position, target in enumerate(targets):
        if target < 0:
            want.append(0.0), want_entropy.append(0.0)
            continue
        kept = kept_set(probs[position], top_k, top_p) | {target}
        mass = sum(probs[position][i] for i in kept)
        want.append(math.log(probs[position][target] / mass))
        want_entropy.append(-sum(probs[position][i] / mass * math.log(probs[position][i] / mass) for i in kept))
    for chunk in (None, CHUNK):
        got, _, entropy = logprobs.token_logps(model, batch, chunk=chunk, temperature=0.7, with_entropy=True,
                                               top_k=top_k, top_p=top_p)
        torch.testing.assert_close(got[0], torch.tensor(want), rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy[0], torch.tensor(want_entropy), rtol=0, atol=1e-4)
    grads = [torch.autograd.grad(logprobs.token_logps(model, batch, chunk=chunk, temperature=0.7, top_k=top_k,
                                                      top_p=top_p)[0].sum(), list(model.parameters()))
             for chunk in (None, CHUNK)]
    for g_full, g_chunked in zip(*grads):
        assert torch.isfinite(g_chunked).all()
        torch.testing.assert_close(g_chunked, g_full, rtol=1e-4, atol=1e-6)
    assert any(len(kept_set(p, top_k, top_p)) < len(p) for p in probs)  # the truncation removed something


def test_no_tokens_by_vocab_tensor_is_kept_for_backward():
    """What autograd saves during the forward: with full logits a [tokens, vocab] tensor; chunked,
    nothing larger than a chunk's rows of it."""
    model = tiny()
    batch = pack(random_sequences(10, random.Random(0)), 48, pad_id=0)
    tokens, vocab = batch["input_ids"].numel(), model.config.vocab_size

    def largest_logits_saved(chunk):
        """The most positions of any saved tensor over the vocabulary (shape [..., vocab])."""
        rows = [0]
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: rows.append(t.numel() // vocab if t.dim() and t.shape[-1] == vocab else 0) or t, lambda t: t):
            logprobs.token_logps(model, batch, chunk=chunk, with_entropy=True)
        return max(rows)

    assert largest_logits_saved(None) == tokens
    assert largest_logits_saved(CHUNK) == 0  # checkpointed: even a chunk's logits are recomputed


def test_soft_capped_logits_are_honoured_and_a_scaled_head_is_refused():
    """Gemma-2's soft-capping is applied as its forward applies it; Cohere multiplies its logits by
    ``logit_scale``, which the chunked path does not know: head_error sees it."""
    capped = tiny(model_type="gemma2", head_dim=16, final_logit_softcapping=0.5)  # a cap that bends every logit
    assert logprobs.head_error(capped, torch.device("cpu")) < 1e-5
    scaled = tiny(model_type="cohere", logit_scale=0.25)
    assert logprobs.head_error(scaled, torch.device("cpu")) > logprobs.HEAD_TOLERANCE["float32"]


def build(rank, world, overrides):
    from conftest import make_cfg
    from trainers import TRAINERS

    try:
        TRAINERS[make_cfg(*overrides).loss.trainer](make_cfg(*overrides), torch.device("cpu"))
    except models.ConfigError as e:
        return str(e)
    return "built"


def test_trainer_refuses_a_head_it_cannot_chunk_and_builds_it_unchunked(tmp_path):
    overrides = fast_overrides(tmp_path / "run") + ["model=blank_model", "model.fsdp_policy_mp=float32",
                                                   "model.tokenizer_name_or_path=tokenizer/tiny"]
    overrides += [f"+model.init.{k}={v}" for k, v in dict(model_type="cohere", logit_scale=0.25, vocab_size=262,
                                                           hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                           num_attention_heads=4, num_key_value_heads=2).items()]
    refused = run_ranks(build, 1, tmp_path, overrides)[0]
    assert refused.startswith("CohereForCausalLM (model_type cohere) computes its logits from more than its LM head")
    assert "set logprob_chunk_tokens=null" in refused
    assert run_ranks(build, 1, tmp_path, overrides + ["logprob_chunk_tokens=null"]) == ["built"]


def test_chunked_sharded_run_equals_full_logits(tmp_path):
    """2 ranks under FSDP2, the log-probs a registered forward of the root: the run's metrics and
    weights are those of the full logits."""
    runs = {}
    for chunk in ("null", "7"):
        run = tmp_path / f"chunk{chunk}"
        weights = run_ranks(train_run, 2, tmp_path, fast_overrides(run) + [f"logprob_chunk_tokens={chunk}"])[0]
        runs[chunk] = (metrics(run), weights)
    assert_same_run(runs["null"][0], runs["7"][0])
    for name, w in runs["null"][1].items():
        # fp32 rounding of the summed gradients differs; Adam's lr * m / sqrt(v) turns that into up to
        # ~3e-6 on entries whose gradient is near zero, against steps of lr = 1e-3
        torch.testing.assert_close(runs["7"][1][name], w, rtol=0, atol=1e-5, msg=name)
