"""The RL trainer end to end: a fixed rollout gives the same run on 2 ranks as on 1, a run killed
between iterations resumes to the uninterrupted run, the advantages it trains on are the
estimators' formulas written out, and bad rewards, empty generations and a reward model with
another tokenizer are handled."""

import json
import math

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import checkpointing
import distributed
import models
from conftest import make_cfg, run_ranks
from data.tokenize import prompt_ids, response_ids
from data.toy import add_answer
from helpers import (FixedCompletions, assert_same_run, metrics, rl_overrides, rl_run, tiny_checkpoint, trained_tiny,
                     with_fixed_completions)
from rollout import Rollout
from sampler import Sample, SamplingParams
from trainers import TRAINERS, GRPOTrainer


def test_fixed_rollout_two_ranks_equal_one(tmp_path):
    """PPO: the critic, GAE and the reference all take part (GRPO's KL-in-the-loss path trains in
    test_failing_reward_functions_are_reported_and_bounded)."""
    results = {}
    for world in (1, 2):
        run_dir = tmp_path / f"w{world}"
        weights = run_ranks(rl_run, world, tmp_path, rl_overrides(run_dir, "ppo"))[0]
        results[world] = (metrics(run_dir), weights)
    (m1, (w1, c1)), (m2, (w2, c2)) = results[1], results[2]
    train = [r for r in m1 if "rollout/score_mean" in r]
    assert len(train) == 2 and train[0]["rollout/empty_fraction"] > 0
    assert train[0]["rollout/score_mean"] == 0.5
    assert train[1]["policy/approx_kl/train"] > 0  # the policy moved
    ignore = ("timing/", "samples_per_s")
    strip = [[{k: v for k, v in r.items() if not k.startswith(ignore)} for r in m] for m in (m1, m2)]
    assert_same_run(strip[1], strip[0], rtol=1e-4)
    # Adam turns float noise in a near-zero gradient into a step of up to lr = 1e-3, hence atol
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)
    assert "critic/value_loss/train" in train[0] and "critic/explained_variance" in train[0]
    for k in c1:
        torch.testing.assert_close(c2[k], c1[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize("loss,extra,metric", [("gspo", (), "policy/clipfrac/train"),
                                                ("gspo", ("loss.token_level=true",), "policy/clipfrac/train"),
                                                ("cispo", (), "policy/clipfrac/train"),
                                                ("sapo", (), "policy/gate_mean/train"),
                                                ("distill", (), "distill/reverse_kl"),
                                                ("distill", ("loss.divergence=jsd", "loss.kl_coef=0.05"), "distill/jsd/train")])
def test_the_2026_objectives_train_the_same_on_two_ranks_as_on_one(tmp_path, loss, extra, metric):
    """GSPO (and GSPO-token), CISPO, SAPO and on-policy distillation through the trainer: the loss
    each sums over a micro-batch, divided by the global count of its units, gives one rank's run on
    two; the second epoch over each rollout is off-policy, so the clip or the gate acts."""
    if loss == "distill":
        extra += (f"loss.teacher={tiny_checkpoint(tmp_path / 'teacher', trained_tiny())}",)
    results = {}
    for world in (1, 2):
        run_dir = tmp_path / f"w{world}"
        overrides = rl_overrides(run_dir, loss, "loss.epochs_per_iteration=2", "batch_size=4", *extra)
        weights = run_ranks(rl_run, world, tmp_path, overrides)[0][0]
        results[world] = (metrics(run_dir), weights)
    (m1, w1), (m2, w2) = results[1], results[2]
    train = [r for r in m1 if "rollout/score_mean" in r]
    assert len(train) == 2 and all(metric in r for r in train) and train[1]["policy/approx_kl/train"] > 0
    ignore = ("timing/", "samples_per_s")
    strip = [[{k: v for k, v in r.items() if not k.startswith(ignore)} for r in m] for m in (m1, m2)]
    assert_same_run(strip[1], strip[0], rtol=1e-4)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)


def test_killed_between_iterations_resumes_to_the_same_run(tmp_path):
    """Real sampling (HF generate, seeded per iteration), PPO with its critic: a run that dies in
    its third iteration and is resumed ends where an uninterrupted run ends."""
    base = ["n_examples=12", "save_every=4"]
    whole = tmp_path / "whole"
    ref = run_ranks(rl_run, 1, tmp_path, rl_overrides(whole, "ppo", *base), None, False)[0]
    broken = tmp_path / "broken"
    with pytest.raises(ProcessRaisedException, match="Crash: killed at iteration 3"):
        run_ranks(rl_run, 1, tmp_path, rl_overrides(broken, "ppo", *base), 2, False)
    assert [p.name for p in checkpointing.complete(broken)] == ["step-1", "step-2"]
    got = run_ranks(rl_run, 1, tmp_path, rl_overrides(broken, "ppo", *base, "resume=true"), None, False)[0]
    assert_same_run([{k: v for k, v in r.items() if not k.startswith("timing/") and k != "samples_per_s"}
                     for r in metrics(broken)],
                    [{k: v for k, v in r.items() if not k.startswith("timing/") and k != "samples_per_s"}
                     for r in metrics(whole)])
    for a, b in zip(got, ref):
        for k in b:
            torch.testing.assert_close(a[k], b[k], msg=k)


class EvenAnswersAllRight(FixedCompletions):
    """Prompts with an even answer get only right answers (their samples all score 1); the others
    alternate the right answer and a wrong one."""

    def generate(self, prompts, params):
        outs = []
        for prompt in prompts:
            answer = self.answers[tuple(prompt)]
            texts = [answer if int(answer) % 2 == 0 or k % 2 == 0 else str(int(answer) + 1) for k in range(params.n)]
            ids = [response_ids(self.tokenizer, t) for t in texts]
            outs.append([Sample(i, t, [-0.5] * len(i), "stop") for i, t in zip(ids, texts)])
        return outs


def filter_run(rank, world, overrides):
    trainer = GRPOTrainer(make_cfg(*overrides), distributed.device())
    trainer.sampler = EvenAnswersAllRight(trainer)
    trainer.train()
    answers = [[trainer.train_examples[i]["row"]["answer"] for i in trainer.global_batch(step)] for step in range(2)]
    weights = checkpointing.full_state_dict(trainer.model)  # collective
    return (weights, answers) if rank == 0 else None


def test_filter_groups_trains_only_on_prompts_whose_samples_differ(tmp_path):
    """loss.filter_groups=true drops the prompts whose samples all score the same before the
    log-probs and the update. With 3 samples per prompt the kept samples split unevenly over 2
    ranks, and with one sample per forward the rank holding fewer runs a forward on nothing of
    its own; that must still give the 1-rank run."""
    extra = ["loss.filter_groups=true", "loss.n_samples_per_prompt=3", "batch_size=2", "loss.save_rollouts=true",
             "eval_batch_size=2"]
    runs = {}
    for world in (1, 2):
        run_dir = tmp_path / f"w{world}"
        weights, batches = run_ranks(filter_run, world, tmp_path, rl_overrides(run_dir, "grpo", *extra))[0]
        runs[world] = (metrics(run_dir), weights)
        train = [r for r in runs[world][0] if "rollout/score_mean" in r]
        assert len(train) == len(batches) == 2
        for step, (record, answers) in enumerate(zip(train, batches), start=1):
            odd = [a for a in answers if int(a) % 2]
            written = [json.loads(line) for line in (run_dir / "rollouts" / f"step-{step}.jsonl").read_text().splitlines()]
            assert sorted(add_answer(r["prompt"][-1]["content"]) for r in written) == sorted(odd * 3)
            assert record["rollout/kept_fraction"] == len(odd) / len(answers)
            # the rollout's metrics are of every sample, dropped or not
            assert record["rollout/score_mean"] == pytest.approx(
                sum(1 if int(a) % 2 == 0 else 2 / 3 for a in answers) / len(answers))
            assert ("policy/loss/train" in record) == (len(odd) > 0)
            # mini-batches of batch_size=2 from the kept samples, a partial one dropped: an iteration
            # that keeps fewer than batch_size samples says it made no update (it used to be silent)
            assert record["iteration/updates"] == len(odd) * 3 // 2
    assert any(0 < r.get("rollout/kept_fraction", 0) < 1 for r in runs[1][0])
    (m1, w1), (m2, w2) = runs[1], runs[2]
    ignore = ("timing/", "samples_per_s")
    assert_same_run(*[[{k: v for k, v in r.items() if not k.startswith(ignore)} for r in m] for m in (m2, m1)], rtol=1e-4)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)


def test_filter_groups_needs_a_per_prompt_baseline(tmp_path):
    """Only GRPO's family (GRPO, RLOO, GSPO, CISPO, SAPO) has a per-prompt baseline, so only their
    configs have the key: under loss=ppo it is refused before anything runs (it was a runtime check
    of loss.advantage)."""
    import overrides

    with pytest.raises(overrides.OverrideError, match="filter_groups .* not an option of loss=ppo: it is one of "
                                                      "loss=cispo, loss=grpo, loss=gspo, loss=rloo, loss=sapo$"):
        overrides.check(rl_overrides(tmp_path, "ppo", "loss.filter_groups=true"))


# --- advantages, written out --------------------------------------------------------------------

def estimated(tmp_path, loss: str, *extra) -> Rollout:
    """Four samples (two prompts x 2) of 3, 1, 2 and 3 response tokens, with made-up log-probs
    and values, through the ``loss`` trainer's KL, advantages and importance weights (kl_coef 0.1,
    k1)."""
    cfg = make_cfg(*rl_overrides(tmp_path / loss, loss, "loss.kl_coef=0.1", "loss.kl_estimator=k1", *extra))
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    lengths, scores = [3, 1, 2, 3], [1.0, 0.0, 0.5, 2.0]
    outs = [Sample([5] * n, "x", [-1.0 - 0.1 * i - 0.2 * t + 0.3 for t in range(n)], "stop")
            for i, n in enumerate(lengths)]
    examples = [{"prompt_ids": [1, 2], "prompt": [], "row": {}}] * 2
    rollout = Rollout.of(examples, [outs[:2], outs[2:]], eos_id=2)
    rollout.scores = torch.tensor(scores)

    def padded(f):
        return torch.tensor([[f(i, t) if t < n else 0.0 for t in range(3)] for i, n in enumerate(lengths)])

    rollout.old_logps = padded(lambda i, t: -1.0 - 0.1 * i - 0.2 * t)
    rollout.ref_logps = padded(lambda i, t: -1.1 - 0.05 * t)
    if trainer.critic is not None:
        rollout.old_values = padded(lambda i, t: 0.2 * t - 0.1 * i)
    if trainer.teacher is not None:
        rollout.teacher_logps = padded(lambda i, t: -0.8 - 0.15 * t + 0.05 * i)
    trainer.estimate(rollout)
    return rollout


def samples_of(rollout: Rollout) -> list[dict]:
    """The rollout as plain per-sample lists, to write the formulas out on."""
    out = []
    for i in range(len(rollout)):
        n = int(rollout.lengths[i])
        row = {"score": rollout.scores[i].item(), "n": n}
        for name in ("old_logps", "ref_logps", "sampler_logps", "old_values", "advantages", "returns", "is_weight",
                     "teacher_logps"):
            if getattr(rollout, name) is not None:
                row[name] = getattr(rollout, name)[i, :n].tolist()
        out.append(row)
    return out


def test_ppo_advantages_are_gae_of_kl_penalised_rewards(tmp_path, single_process):
    samples = samples_of(estimated(tmp_path, "ppo", "loss.whiten_advantages=false", "loss.gamma=1.0", "loss.lam=0.95"))
    gamma, lam, beta = 1.0, 0.95, 0.1
    for s in samples:
        n = s["n"]
        kl = [s["old_logps"][t] - s["ref_logps"][t] for t in range(n)]
        r = [-beta * kl[t] + (s["score"] if t == n - 1 else 0.0) for t in range(n)]
        v = s["old_values"] + [0.0]
        adv, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            running = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * running
            adv[t] = running
        assert s["advantages"] == pytest.approx(adv, abs=1e-5)
        assert s["returns"] == pytest.approx([a + b for a, b in zip(adv, v)], abs=1e-5)
        w = [min(math.exp(s["old_logps"][t] - s["sampler_logps"][t]), 2.0) for t in range(n)]
        assert s["is_weight"] == pytest.approx(w, abs=1e-6)


def test_grpo_and_rloo_advantages_are_per_prompt_baselines_broadcast_over_tokens(tmp_path, single_process):
    samples = samples_of(estimated(tmp_path, "grpo", "loss.kl_in_reward=false"))
    for group in (samples[:2], samples[2:]):
        a, b = (s["score"] for s in group)
        mean, std = (a + b) / 2, abs(a - b) / math.sqrt(2)  # the unbiased std of two numbers
        for s in group:
            assert s["advantages"] == pytest.approx([(s["score"] - mean) / (std + 1e-6)] * s["n"], abs=1e-5)
    samples = samples_of(estimated(tmp_path, "rloo", "loss.whiten_advantages=false"))
    for group in (samples[:2], samples[2:]):
        # the sequence's KL (k1, summed) comes off its score; the other sample is the baseline
        net = [s["score"] - 0.1 * sum(o - r for o, r in zip(s["old_logps"], s["ref_logps"])) for s in group]
        for s, mine, other in zip(group, net, net[::-1]):
            assert s["advantages"] == pytest.approx([mine - other] * s["n"], abs=1e-5)


# --- bad input ----------------------------------------------------------------------------------

BAD_REWARDS = '''
def sometimes(prompt, completion, **row):
    if completion.startswith("1"):
        raise ValueError("no ones")
    return float("nan") if completion.endswith("9") else 1.0

def always(prompt, completion, **row):
    raise KeyError("answer_key")
'''


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_distillation_advantage_is_minus_the_sampled_reverse_kl(tmp_path, single_process, weight):
    """On-policy distillation: A_t = -(log pi_student(y_t) - log pi_teacher(y_t)) per token, plus
    reward_weight x GRPO's group advantage (s_i - mean) / (unbiased std + 1e-6) of the prompt's
    samples, written out."""
    teacher = tiny_checkpoint(tmp_path / "teacher")
    samples = samples_of(estimated(tmp_path, "distill", f"loss.teacher={teacher}", f"loss.reward_weight={weight}"))
    for group in (samples[:2], samples[2:]):
        mean = sum(s["score"] for s in group) / 2
        std = math.sqrt(sum((s["score"] - mean) ** 2 for s in group) / (2 - 1))
        for s in group:
            want = [-(old - teach) + weight * (s["score"] - mean) / (std + 1e-6)
                    for old, teach in zip(s["old_logps"], s["teacher_logps"])]
            assert s["advantages"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_failing_reward_functions_are_reported_and_bounded(tmp_path, single_process):
    path = tmp_path / "bad_rewards.py"
    path.write_text(BAD_REWARDS)
    cfg = make_cfg(*rl_overrides(tmp_path / "some", "grpo", "n_examples=4", "eval_at_end=false", "loss.save_rollouts=true",
                                 f"reward.functions=[{path}:sometimes]", "reward.max_invalid_fraction=1.0"))
    with_fixed_completions(cfg).train()
    (record,) = [r for r in metrics(tmp_path / "some") if "rollout/invalid_fraction" in r]
    rows = [json.loads(line) for line in (tmp_path / "some" / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    failed = [r for r in rows if "error" in r]
    assert failed and record["rollout/invalid_fraction"] == len(failed) / len(rows)
    assert all(r["score"] == 0.0 for r in failed)
    assert any("raised ValueError: no ones" in r["error"] for r in failed)
    assert all(r["text"].startswith("1") or r["text"].endswith("9") for r in failed)
    cfg = make_cfg(*rl_overrides(tmp_path / "all", "grpo", "n_examples=4", f"reward.functions=[{path}:always]"))
    with pytest.raises(RuntimeError, match=r"8 of 8 samples .*always raised KeyError: 'answer_key'"):
        with_fixed_completions(cfg).train()
    cfg = make_cfg(*rl_overrides(tmp_path / "typo", "grpo", f"reward.functions=[{path}:sometime]"))
    with pytest.raises(ValueError, match="has no function 'sometime'"):
        with_fixed_completions(cfg)
    # the step-0 eval scores as training does: it used to log eval/reward=0.0 over samples that all failed
    cfg = make_cfg(*rl_overrides(tmp_path / "eval", "grpo", "eval_at_start=true", f"reward.functions=[{path}:always]"))
    with pytest.raises(RuntimeError, match=r"^step 0: 4 of 4 samples have no valid score .*always raised KeyError: 'answer_key'"):
        with_fixed_completions(cfg).train()
    assert not (tmp_path / "eval" / "metrics.jsonl").exists() or "eval/reward" not in (tmp_path / "eval" / "metrics.jsonl").read_text()


def test_reward_model_with_another_tokenizer_reads_retokenized_text(tmp_path, single_process):
    """Two exported reward models, one with the policy's tokenizer and one whose chat template
    differs: each scores what it would score on its own tokenization of the conversation."""
    cfg = make_cfg(*rl_overrides(tmp_path / "x", "grpo"))
    policy_tok = models.load_tokenizer(cfg.model)
    dirs = {}
    for name, template in (("same", policy_tok.chat_template),
                           ("other", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                     "{% if add_generation_prompt %}[assistant] {% endif %}")):
        rm = models.load_reward_model(cfg.model, torch.device("cpu"), seed=len(name))
        weights, config = rm.export_weights(rm.state_dict())
        tok = AutoTokenizer.from_pretrained(models.resolve(cfg.model.tokenizer_name_or_path))
        tok.chat_template = template
        dirs[name] = tmp_path / name
        checkpointing.write_hf(dirs[name], weights, config, tok)
    cfg = make_cfg(*rl_overrides(tmp_path / "x", "grpo", f"reward.models=[{dirs['same']},{dirs['other']}]",
                                 "reward.functions=[]"))
    trainer = with_fixed_completions(cfg)
    examples = trainer.train_examples[:3]
    outs = trainer.sampler.generate([ex["prompt_ids"] for ex in examples], SamplingParams(n=2))
    cut = outs[0][1]  # cut before the end-of-turn token
    outs[0][1] = Sample(cut.token_ids[:-1], cut.text, cut.logprobs[:-1], cut.finish_reason)
    rollout = Rollout.of(examples, outs, trainer.tokenizer.eos_token_id)
    trainer.rewards.score(rollout)
    samples = [{"prompt": p, "text": t, "scores": sc} for p, t, sc in zip(rollout.prompts, rollout.texts, rollout.reward_scores)]
    assert [trainer.rewards.models[str(d)][2] for d in dirs.values()] == [True, False]
    for name, d in dirs.items():
        model = AutoModelForSequenceClassification.from_pretrained(d).eval()
        tok = AutoTokenizer.from_pretrained(d)
        for s in samples:
            ids = prompt_ids(tok, s["prompt"]) + response_ids(tok, s["text"])
            with torch.no_grad():
                expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            assert s["scores"][str(d)] == pytest.approx(expected, abs=1e-4), (name, s["text"])
    assert rollout.scores[0].item() == pytest.approx(sum(samples[0]["scores"].values()))


def test_rollout_logprobs_are_the_tempered_policy_token_by_token(tmp_path, single_process):
    """pi_old and the reference are the distribution sampled from, softmax(logits / T), which is
    also what the sampler reports (test_sampler). Checked against a plain unpacked forward of each
    sample."""
    cfg = make_cfg(*rl_overrides(tmp_path / "t", "grpo", "loss.sampling.temperature=2.0"))
    trainer = with_fixed_completions(cfg)
    examples = trainer.train_examples[:3]
    outs = trainer.sampler.generate([ex["prompt_ids"] for ex in examples], SamplingParams(n=2))
    rollout = Rollout.of(examples, outs, trainer.tokenizer.eos_token_id)
    trainer.score_tokens(rollout)
    samples = [{"prompt_ids": rollout.prompt_ids[i], "response_ids": rollout.response(i),
                "old_logps": rollout.old_logps[i, : rollout.lengths[i]].tolist(),
                "ref_logps": rollout.ref_logps[i, : rollout.lengths[i]].tolist()} for i in range(len(rollout))]
    model = models.load_model(cfg.model, torch.device("cpu"), seed=cfg.seed).eval()
    for s in samples:
        ids = s["prompt_ids"] + s["response_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(ids[1:])[len(s["prompt_ids"]) - 1 :]
        at = slice(len(s["prompt_ids"]) - 1, None)
        tempered = torch.log_softmax(logits[at] / 2.0, -1).gather(1, targets[:, None])[:, 0]
        assert s["old_logps"] == pytest.approx(tempered.tolist(), abs=1e-5)
        assert s["ref_logps"] == pytest.approx(tempered.tolist(), abs=1e-5)


@pytest.mark.parametrize("truncate", [True, False])
def test_under_top_p_the_trainer_computes_the_distribution_the_sampler_drew_from(tmp_path, truncate):
    """With top_p = 0.9 the HF sampler draws from the truncated, renormalised softmax; with
    loss.truncate_like_sampler the trainer's pi_old is that distribution too (the log-probs agree
    per token, the importance weight is 1), without it the full softmax (the weight is the kept
    mass S < 1 and the log-probs differ by log S)."""
    run_dir = tmp_path / str(truncate)
    overrides = rl_overrides(run_dir, "grpo", "loss.sampling.top_p=0.9", "loss.sampling.temperature=0.7",
                             f"loss.truncate_like_sampler={str(truncate).lower()}", "n_examples=4")
    run_ranks(rl_run, 1, tmp_path, overrides, None, False)
    (record,) = [r for r in metrics(run_dir) if "rollout/logp_mismatch" in r]
    if truncate:
        assert record["rollout/logp_mismatch"] < 1e-4 and record["rollout/is_weight_mean"] == pytest.approx(1, abs=1e-4)
    else:
        assert record["rollout/logp_mismatch"] > 1e-2 and record["rollout/is_weight_mean"] < 0.99


@pytest.mark.parametrize("divergence,metric", [("sampled_reverse_kl", "distill/reverse_kl"),
                                                ("jsd", "distill/jsd")])
def test_on_policy_distillation_moves_the_student_toward_the_teacher(tmp_path, divergence, metric):
    """loss=distill: a random-init student samples, the trained tiny model (helpers.trained_tiny)
    scores each sampled position, and the student moves toward it: with minus the per-token reverse
    KL as the advantage, or GKD's JSD over the vocabulary minimised directly, the divergence the run
    minimises falls by a third in 12 iterations, and so does the sampled reverse KL. No reward is
    needed (reward_weight 0)."""
    teacher = tiny_checkpoint(tmp_path / "teacher", trained_tiny())
    run_dir = tmp_path / "student"
    overrides = [f"run_dir={run_dir}", "loss=distill", f"loss.teacher={teacher}", "datasets=[toy_sort_prompts]",
                 "sampler=hf", "loss.rollout_batch_size=8", "loss.n_samples_per_prompt=4", "batch_size=16",
                 "n_examples=96", "n_eval_examples=0", "lr=3e-3", "warmup_steps=1", "max_length=64",
                 "max_prompt_length=40", "loss.sampling.max_new_tokens=12", "eval_at_start=false",
                 f"loss.divergence={divergence}"]
    run_ranks(rl_run, 1, tmp_path, overrides, None, False)
    # nothing scores the samples: no score metric at all (it used to be logged as 0)
    assert not any("rollout/score_mean" in r or "rollout/score_std" in r for r in metrics(run_dir))
    for name in {metric, "distill/reverse_kl"}:
        name = name if name == "distill/reverse_kl" else name + "/train"
        values = [r[name] for r in metrics(run_dir) if name in r]
        assert len(values) == 12 and sum(values[-3:]) / 3 < 0.67 * sum(values[:3]) / 3, (name, values)


def test_distillation_refuses_a_teacher_with_another_tokenizer(tmp_path, real_model, single_process):
    """The real model's tokenizer is not the tiny model's: the log-probs of the two cannot be
    compared token by token, and the run says so before anything is built."""
    from models import ConfigError

    cfg = make_cfg(*rl_overrides(tmp_path / "x", "distill", f"loss.teacher={real_model}"))
    with pytest.raises(ConfigError, match="its tokenizer is not the policy's"):
        TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    with pytest.raises(ConfigError, match=r"^loss=distill needs a teacher: loss\.teacher="):
        TRAINERS[cfg.loss.trainer](make_cfg(*rl_overrides(tmp_path / "y", "distill")), distributed.device())
