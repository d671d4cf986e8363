"""LoRA (lora.r > 0, peft): SFT learns with a fraction of the parameters trainable, 2 ranks = 1,
the DPO reference is the policy with its adapters off (equal to an explicit frozen copy), and the
merged export and the adapter export load in transformers / peft with the trained model's logits."""

import pytest
import torch

import models
from data.packing import pack
from conftest import REPO, fast_overrides, make_cfg, run_ranks
from helpers import (LENGTH_REWARD, assert_same_run, metrics, online_overrides, rl_overrides, train_run, vllm_or_skip,
                     vllm_subprocess)

LORA = ["lora.r=8", "lora.alpha=16", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
PREF = ["datasets=[toy_add_pref]", "loss=dpo"]


def trainable(rank, world, overrides):
    from trainers import TRAINERS

    cfg = make_cfg(*overrides)
    trainer = TRAINERS[cfg.loss.trainer](cfg, torch.device("cpu"))
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731 (DTensor numel is the full size)
    return (count(p for p in trainer.model.parameters() if p.requires_grad),
            count(p for g in trainer.optimizer.param_groups for p in g["params"]))


def test_lora_sft_learns_with_only_the_adapters_trained(tmp_path):
    runs = {}
    for name, extra in (("full", []), ("lora", LORA + ["lr=3e-2"])):
        run = tmp_path / name
        run_ranks(train_run, 1, tmp_path, fast_overrides(run) + ["n_examples=96"] + extra)
        runs[name] = metrics(run)
    evals = {name: [r["eval/loss"] for r in records if "eval/loss" in r] for name, records in runs.items()}
    # a random-init model: full fine-tuning 5.50 -> 3.59, rank-8 adapters 5.50 -> 4.54 in 12 steps
    assert evals["full"][-1] < 0.8 * evals["full"][0]
    assert evals["lora"][-1] < 0.9 * evals["lora"][0]
    # r (d_in + d_out) per adapted linear, written out from tiny.yaml's shapes: hidden 128, 4 heads of
    # 32, 2 kv heads, intermediate 384, 4 layers
    h, kv, ff, r = 128, 64, 384, 8
    per_layer = r * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + ff) + (h + ff) + (ff + h))
    lora_params, in_optimizer = run_ranks(trainable, 1, tmp_path, fast_overrides(tmp_path / "count") + LORA)[0]
    assert lora_params == in_optimizer == 4 * per_layer


def test_lora_two_ranks_equal_one(tmp_path):
    out = {}
    for world in (1, 2):
        run = tmp_path / f"w{world}"
        weights = run_ranks(train_run, world, tmp_path, fast_overrides(run) + LORA)[0]
        out[world] = (metrics(run), weights)
    # gradients summed in another order: ~1e-5 apart in fp32 after Adam's steps, as in full fine-tuning
    assert_same_run(out[1][0], out[2][0], rtol=1e-4)
    for name, w in out[1][1].items():
        torch.testing.assert_close(out[2][1][name], w, rtol=0, atol=1e-5, msg=name)


def reference_vs_explicit(rank, world, overrides):
    """After training, the reference log-probs of the adapter-off policy and of a separately
    loaded copy of the starting model, and the trained policy's, on one batch."""
    from trainers import TRAINERS

    cfg = make_cfg(*overrides)
    trainer = TRAINERS[cfg.loss.trainer](cfg, torch.device("cpu"))
    trainer.train()
    assert isinstance(trainer.reference, models.AdapterOff)
    explicit = trainer.models.build(cfg.model).requires_grad_(False).eval()  # tiny's random init, seed 0
    batch = trainer.collate(trainer.eval_examples[:8])
    with torch.no_grad():
        got, want, policy = (trainer.token_logps(m, batch)[0] for m in (trainer.reference, explicit, trainer.model))
    return got, want, policy


def test_adapter_off_reference_equals_an_explicit_reference(tmp_path):
    overrides = fast_overrides(tmp_path / "run") + PREF + LORA + ["lr=1e-2"]
    got, want, policy = run_ranks(reference_vs_explicit, 2, tmp_path, overrides)[0]
    assert (policy - want).abs().max() > 1e-2  # the adapters did train: the check below can fail
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_merged_and_adapter_exports_give_the_trained_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    weights = run_ranks(train_run, 2, tmp_path, fast_overrides(run) + LORA + ["lr=1e-2"])[0]
    cfg = make_cfg(*fast_overrides(run), *LORA)
    trained = models.add_lora(models.load_model(cfg.model, torch.device("cpu"), seed=0), cfg.lora)
    trained.load_state_dict(weights)
    assert any((w != 0).any() for k, w in weights.items() if "lora_B" in k)  # B moved off its zero init
    merged = AutoModelForCausalLM.from_pretrained(run / "LATEST")
    base = models.load_model(cfg.model, torch.device("cpu"), seed=0)
    adapter = PeftModel.from_pretrained(base, run / "LATEST" / "adapter")
    ids = torch.randint(3, 262, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(input_ids=ids).logits
        for model in (merged, adapter):
            torch.testing.assert_close(model.eval()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_lora_reward_model_trains_adapters_and_head_and_exports_what_trained(tmp_path):
    """The adapters go on the backbone, the score head trains whole; the export (merged) loads with
    AutoModelForSequenceClassification and scores as the trained model does."""
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "run"
    overrides = fast_overrides(run) + ["loss=rm", "datasets=[toy_add_pref]", *LORA, "lr=1e-2"]
    weights = run_ranks(train_run, 2, tmp_path, overrides)[0]
    cfg = make_cfg(*overrides)
    trained = models.add_lora(models.load_reward_model(cfg.model, torch.device("cpu"), seed=0), cfg.lora)
    start = {k: v.clone() for k, v in trained.state_dict().items()}
    moved = {k for k, w in weights.items() if not torch.equal(w, start[k])}
    assert "score.weight" in moved and any("lora_B" in k for k in moved)
    assert all("lora_" in k or k == "score.weight" for k in moved), sorted(moved)[:5]
    trained.load_state_dict(weights)
    exported = AutoModelForSequenceClassification.from_pretrained(run / "LATEST").eval()
    ids = torch.randint(3, 262, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.eval()(ids, torch.arange(20).expand(2, 20))[0][:, -1]
        torch.testing.assert_close(exported(input_ids=ids).logits[:, 0], want, rtol=1e-4, atol=1e-4)


def grpo_reference_vs_explicit(rank, world, overrides):
    """GRPO with LoRA on the HF sampler: after training, the KL's reference log-probs (adapters
    off) and an explicit copy's, at the sampling temperature, and the policy's; and the metrics."""
    from trainers import TRAINERS

    cfg = make_cfg(*overrides)
    trainer = TRAINERS[cfg.loss.trainer](cfg, torch.device("cpu"))
    trainer.train()
    explicit = trainer.models.build(cfg.model).requires_grad_(False).eval()
    examples = [{"input_ids": ex["prompt_ids"] + [5, 6, 7, 8], "labels": [-100] * len(ex["prompt_ids"]) + [5, 6, 7, 8]}
                for ex in trainer.eval_examples[:4]]
    batch = pack(examples, 256, pad_id=0)
    with torch.no_grad():
        got, want, policy = (trainer.policy_logps(m, batch)[0] for m in (trainer.reference, explicit, trainer.model))
    return got, want, policy


def test_grpo_with_lora_adapter_off_reference_equals_an_explicit_reference(tmp_path):
    run = tmp_path / "run"
    overrides = rl_overrides(run, "grpo", *LORA, "lr=3e-2", "loss.sampling.temperature=0.7", "n_examples=12")
    got, want, policy = run_ranks(grpo_reference_vs_explicit, 2, tmp_path, overrides)[0]
    assert (policy - want).abs().max() > 1e-3  # the adapters moved the policy
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    records = [r for r in metrics(run) if "rollout/logp_mismatch" in r]
    assert len(records) == 3 and all(r["rollout/logp_mismatch"] < 1e-5 for r in records)  # HF samples from the policy


def test_grpo_with_qlora_on_vllm_samples_the_merged_policy(tmp_path):
    """After each update the engine gets W + (alpha/r) B A, W the NF4 base dequantized: its
    log-probs of what it sampled are the trainer's (a QLoRA policy's, recomputed) at every
    iteration, as without LoRA. (Plain LoRA merges the same way, W as loaded.)"""
    vllm_or_skip()
    run = tmp_path / "run"
    overrides = [o for o in rl_overrides(run, "grpo", *LORA, "lora.load_in_4bit=true", "lr=3e-2", "n_examples=16")
                 if o != "sampler=hf"]
    vllm_subprocess([str(REPO / "train.py"), "sampler=vllm", *overrides], tmp_path)
    records = [r for r in metrics(run) if "rollout/logp_mismatch" in r]
    assert len(records) == 4
    assert all(r["rollout/logp_mismatch"] < 1e-4 for r in records), [r["rollout/logp_mismatch"] for r in records]
    assert records[-1]["rollout/kl"] > 1e-6  # the policy had moved from the base the engine started with


# GRPO is tested above; RLOO and REINFORCE++ differ from it only in their advantages
@pytest.mark.parametrize("loss", ["ppo", "online_dpo", "raft"])
def test_every_other_sampling_trainer_trains_the_adapters_alone(tmp_path, loss):
    """PPO (its critic trained whole) and the online loops with LoRA: the
    adapters move, the base does not, and the HF sampler's log-probs are the trainer's."""
    run = tmp_path / "run"
    reward = tmp_path / "length_reward.py"  # a random-init model never adds right: reward the length, which varies
    reward.write_text(LENGTH_REWARD)
    overrides = (online_overrides(run, loss, *LORA, "lr=3e-2") if loss in ("online_dpo", "raft")
                 else rl_overrides(run, loss, *LORA, "lr=3e-2", f"reward.functions=[{reward}:length]"))
    weights = run_ranks(train_run, 2, tmp_path, overrides)[0]
    cfg = make_cfg(*overrides)
    start = models.add_lora(models.load_model(cfg.model, torch.device("cpu"), seed=0), cfg.lora).state_dict()
    moved = {k for k, w in weights.items() if not torch.equal(w, start[k])}
    assert moved and all("lora_" in k for k in moved), sorted(moved)[:5]
    for r in metrics(run):
        assert r.get("rollout/logp_mismatch", 0) < 1e-4
