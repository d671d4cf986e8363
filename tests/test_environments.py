"""Multi-turn episodes (environments.py): an episode's tokens are the sampler's replies and the
chat template's observation tokens, concatenated, never re-tokenized; only the replies are
trained on; the trainer's log-probs are the sampler's on them; 2 ranks train what 1 does; a run
killed mid-way resumes to the same run; a failing or hanging environment is contained.

A scripted sampler plays the policy where the test must know what it says: a reply is a function
of the conversation so far (and, on the first turn, of the sample's place in its group of
``n_samples_per_prompt``), so that the tokens expected can be written out here."""

import functools
import json
import math
import time

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

import checkpointing
import distributed
from conftest import REPO, make_cfg, run_ranks
from data import load_rows
from data.tokenize import IGNORE, tokenize_prompts
from data.toy_env import ENVIRONMENTS, Calculator
from environments import ChatPieces, EpisodeRunner, call_all, load_environment
from helpers import assert_same_run, metrics, rl_overrides, rl_run, vllm_or_skip, vllm_subprocess
from sampler import Sample, SamplingParams
from sampler_ranks import tokenizer
from trainers import TRAINERS


def reply_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def reply_logps(ids: list[int]) -> list[float]:
    return [-0.25 - 0.01 * j for j in range(len(ids))]


class ScriptedSampler:
    """The calculator's policy, scripted: on the first turn an even sample of its group calls the
    tool and an odd one answers 7 (wrong); after the tool's output it repeats it. Made-up
    log-probs. ``sync_weights`` does nothing: the trainer's weights do not change what it says."""

    def __init__(self, tok, n: int):
        self.tok, self.n, self.calls = tok, n, []

    def sync_weights(self, model):
        return 0.0

    def generate(self, prompts, params):
        self.calls.append(len(prompts))
        out = []
        for i, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            question = text.split("<|user|>")[1].split("<|end|>")[0]
            if "<|tool|>" in text:
                reply = text.split("<|tool|>")[-1].split("<|end|>")[0]
            else:
                reply = "calc " + question.rstrip("=") if i % self.n % 2 == 0 else "7"
            ids = reply_ids(self.tok, reply)
            out.append([Sample(ids, reply, reply_logps(ids), "stop")])
        return out


def calc_examples(tok, n_rows: int) -> list[dict]:
    rows = load_rows("toy_calc_prompts", "test", "prompt")[:n_rows]
    limits = type("Limits", (), {"max_length": 128, "max_prompt_length": 32})
    return tokenize_prompts(rows, tok, limits, "toy_calc_prompts")[0]


def test_episode_tokens_are_the_sampler_replies_then_the_template_observations():
    tok = tokenizer()
    examples = calc_examples(tok, 3)
    runner = EpisodeRunner(Calculator, tok, max_turns=4, max_length=128, max_prompt_length=32, timeout_s=10)
    sampler = ScriptedSampler(tok, 2)
    rollout = runner.rollout(sampler, examples, 2, SamplingParams(max_new_tokens=16, seed=0))
    assert sampler.calls == [6, 3]  # turn 1: all six episodes; turn 2: the three that called the tool
    end, assistant = tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    for i in range(6):
        ex = examples[i // 2]
        question, answer = ex["prompt"][0]["content"], ex["row"]["answer"]
        call = reply_ids(tok, "calc " + question.rstrip("="))
        # what the template puts after the assistant's <|end|>: "<|tool|>" as plain bytes, the output, then
        # the next assistant turn's opening
        observation = tok("<|tool|>" + answer, add_special_tokens=False)["input_ids"] + [end, assistant]
        final = reply_ids(tok, answer)
        if i % 2 == 0:
            expected, policy = call + observation + final, [1] * len(call) + [0] * len(observation) + [1] * len(final)
            logps = reply_logps(call) + [math.nan] * len(observation) + reply_logps(final)
            assert rollout.episodes[i].reward == 1.0 and rollout.episodes[i].info == {"tool_calls": 1, "solved": 1.0}
        else:
            expected, policy, logps = reply_ids(tok, "7"), [1, 1], reply_logps(reply_ids(tok, "7"))
            assert rollout.episodes[i].reward == 0.0
        n = int(rollout.lengths[i])
        assert rollout.prompt_ids[i] == ex["prompt_ids"]
        assert rollout.tokens[i, :n].tolist() == expected
        assert rollout.mask[i, :n].tolist() == policy and rollout.mask[i, n:].sum() == 0
        torch.testing.assert_close(rollout.sampler_logps[i, :n], torch.tensor(logps), equal_nan=True)
        # the training sequence is those tokens; labelled on the policy's replies alone
        seq = rollout.sequence(i)
        assert seq["input_ids"] == ex["prompt_ids"] + expected
        assert seq["labels"] == [IGNORE] * len(ex["prompt_ids"]) + [t if m else IGNORE for t, m in zip(expected, policy)]
        assert rollout.finish_reasons[i] == "stop" and rollout.episodes[i].drift is False
    assert rollout.texts[0] == examples[0]["row"]["answer"]  # reward functions read the last reply...
    assert [m["role"] for m in rollout.prompts[0]] == ["user", "assistant", "tool"]  # ...after the conversation


def test_observations_follow_what_the_template_puts_after_a_reply_and_drift_is_reported():
    """A Qwen-like template ends an assistant turn with a newline after its EOS, which the policy
    never generates: it opens the observation's tokens. A reply holding a special token decodes to
    text that renders to other tokens: the episode is flagged as drifting."""
    tok = tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    pieces = ChatPieces(tok)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert pieces.after_reply == newline
    end, assistant = tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    assert pieces.observation([{"role": "user", "content": "hi"}]) == (
        newline + tok("<|user|>hi", add_special_tokens=False)["input_ids"] + [end] + newline + [assistant])
    examples = calc_examples(tok, 2)
    runner = EpisodeRunner(Calculator, tok, max_turns=4, max_length=128, max_prompt_length=32, timeout_s=10)
    rollout = runner.rollout(ScriptedSampler(tok, 2), examples, 2, SamplingParams(max_new_tokens=16))
    assert [e.drift for e in rollout.episodes] == [False] * 4
    # the re-render ends with the newline after the last reply, which the episode (ending at EOS) lacks
    assert pieces.render(rollout.episodes[0].conversation) == rollout.prompt_ids[0] + rollout.response(0) + newline

    class SpecialInReply(ScriptedSampler):
        def generate(self, prompts, params):
            out = super().generate(prompts, params)
            for (s,) in out:
                s.token_ids.insert(1, tok.bos_token_id)  # decoded with special tokens skipped: the text loses it
                s.logprobs.insert(1, -1.0)
            return out

    rollout = runner.rollout(SpecialInReply(tok, 2), examples, 2, SamplingParams(max_new_tokens=16))
    assert [e.drift for e in rollout.episodes] == [True] * 4


def test_an_episode_ends_at_the_turn_limit_a_cut_reply_or_no_room_to_reply():
    tok = tokenizer()
    examples = calc_examples(tok, 2)
    one_turn = EpisodeRunner(Calculator, tok, max_turns=1, max_length=128, max_prompt_length=32, timeout_s=10)
    rollout = one_turn.rollout(ScriptedSampler(tok, 2), examples, 2, SamplingParams(max_new_tokens=16))
    assert rollout.finish_reasons == ["turns", "stop", "turns", "stop"]
    assert [e.reward for e in rollout.episodes] == [0.0] * 4  # the tool's output came, no answer did

    class Cut(ScriptedSampler):  # every reply stops at 3 tokens, unfinished
        def generate(self, prompts, params):
            return [[Sample(s.token_ids[:3], s.text[:3], s.logprobs[:3], "length")] for (s,) in super().generate(prompts, params)]

    runner = EpisodeRunner(Calculator, tok, max_turns=4, max_length=128, max_prompt_length=32, timeout_s=10)
    rollout = runner.rollout(Cut(tok, 2), examples, 2, SamplingParams(max_new_tokens=3))
    assert rollout.finish_reasons == ["length"] * 4 and rollout.lengths.tolist() == [3, 2, 3, 2]  # ("7", EOS)
    assert all(e.info == {} and len(e.conversation) == 2 for e in rollout.episodes)  # the tool never saw them
    # room for the prompt (10 tokens), a call (11) and the tool's output (12), but not for 16 more
    tight = EpisodeRunner(Calculator, tok, max_turns=4, max_length=48, max_prompt_length=32, timeout_s=10)
    rollout = tight.rollout(ScriptedSampler(tok, 2), examples, 2, SamplingParams(max_new_tokens=16))
    assert rollout.finish_reasons == ["length", "stop", "length", "stop"]
    assert rollout.mask[0, : rollout.lengths[0]].tolist() == [1] * int(rollout.lengths[0])  # the observation dropped
    cut_short = rollout.episodes[0].conversation  # ends at the reply: the observation it never saw is not in it
    assert [m["role"] for m in cut_short] == ["user", "assistant"]
    assert rollout.prompts[0] == cut_short[:1]  # reward functions see the reply once, as the completion


def test_a_failing_or_hanging_environment_fails_its_episode_and_past_the_bound_stops_the_run(tmp_path, envs,
                                                                                               single_process):
    tok = tokenizer()
    examples = calc_examples(tok, 12)
    flaky = load_environment(f"{envs}:Flaky", ENVIRONMENTS)
    runner = EpisodeRunner(flaky, tok, max_turns=4, max_length=128, max_prompt_length=32, timeout_s=0.5)
    start = time.monotonic()
    rollout = runner.rollout(ScriptedSampler(tok, 1), examples, 1, SamplingParams(max_new_tokens=16))
    assert time.monotonic() - start < 10  # the hanging steps were waited for 0.5 s, together
    for ex, episode, finish in zip(examples, rollout.episodes, rollout.finish_reasons):
        answer = int(ex["row"]["answer"])
        if answer % 2:
            assert episode.error == "environment step raised ValueError: odd (turn 2)" and finish == "error"
        elif answer % 4 == 0:
            assert episode.error == "environment step timed out after 0.5 s (turn 2)"
        else:
            assert episode.error is None and episode.reward == 1.0 and episode.turns == 3
        assert (episode.reward is None) == (episode.error is not None)
    assert {int(ex["row"]["answer"]) % 4 for ex in examples} >= {0, 1, 2}  # every case is among them
    assert call_all([lambda: 1, lambda: 1 / 0], 1.0) == [(1, None), (None, "raised ZeroDivisionError: division by zero")]

    # in training: a failed episode scores reward.invalid_score and is reported; too many stop the run
    cfg = make_cfg(*rl_overrides(tmp_path / "flaky", "grpo", f"env={envs}:Flaky", "env_timeout_s=0.5",
                                 "reward.functions=[]", "reward.max_invalid_fraction=1.0", "n_examples=4",
                                 "loss.save_rollouts=true", "max_length=128", "eval_at_end=false"))
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    trainer.sampler = ScriptedSampler(tok, 2)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "flaky" / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    (record,) = [r for r in metrics(tmp_path / "flaky") if "rollout/invalid_fraction" in r]
    failed = [r for r in rows if "error" in r]
    assert failed and record["rollout/invalid_fraction"] == record["rollout/env_error_fraction"] == len(failed) / len(rows)
    assert all(r["score"] == 0.0 and r["scores"] == {"env": None} for r in failed)
    cfg = make_cfg(*rl_overrides(tmp_path / "broken", "grpo", f"env={envs}:Broken", "reward.functions=[]",
                                 "n_examples=4", "max_length=128"))
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    trainer.sampler = ScriptedSampler(tok, 2)
    with pytest.raises(RuntimeError, match=r"8 of 8 samples .*environment step raised TypeError: step returned "
                                           r"\{'reward': 1.0\}, not an environments.Step"):
        trainer.train()


def scripted_run(rank, world, overrides):
    cfg = make_cfg(*overrides)
    trainer = TRAINERS[cfg.loss.trainer](cfg, distributed.device())
    trainer.sampler = ScriptedSampler(trainer.tokenizer, cfg.loss.n_samples_per_prompt)
    trainer.train()
    weights = checkpointing.full_state_dict(trainer.model)
    critic = checkpointing.full_state_dict(trainer.critic) if trainer.critic is not None else None
    return (weights, critic) if rank == 0 else None


@pytest.mark.parametrize("loss", ["grpo", "ppo"])
def test_episodes_of_a_fixed_environment_train_the_same_on_two_ranks_as_on_one(tmp_path, loss):
    """PPO's critic and GAE run over the policy's tokens, the observations between them skipped."""
    results = {}
    for world in (1, 2):
        run_dir = tmp_path / f"w{world}"
        overrides = rl_overrides(run_dir, loss, "env=calculator", "reward.functions=[]", "max_length=128")
        weights = run_ranks(scripted_run, world, tmp_path, overrides)[0]
        results[world] = (metrics(run_dir), weights)
    (m1, (w1, c1)), (m2, (w2, c2)) = results[1], results[2]
    train = [r for r in m1 if "rollout/score_mean" in r]
    assert len(train) == 2 and train[0]["rollout/score_mean"] == 0.5 and train[0]["rollout/turns"] == 1.5
    assert train[0]["rollout/env/tool_calls"] == 0.5 and train[0]["rollout/template_drift"] == 0
    assert train[1]["policy/approx_kl/train"] > 0  # the policy moved
    ignore = ("timing/", "samples_per_s")
    strip = [[{k: v for k, v in r.items() if not k.startswith(ignore)} for r in m] for m in (m1, m2)]
    assert_same_run(strip[1], strip[0], rtol=1e-4)
    for k in w1:  # (Adam turns float noise in a near-zero gradient into a step of up to lr: atol)
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)
    for k in c1 or {}:
        torch.testing.assert_close(c2[k], c1[k], rtol=1e-4, atol=1e-4, msg=k)


# an RL run in ranks (its weights, and critic, from rank 0): HF sampling, no scripted policy
real_run = functools.partial(rl_run, fixed=False)


def echo_overrides(run_dir, envs, stopper, *extra):
    return rl_overrides(run_dir, "grpo", f"env={envs}:Echo", f"model.archive={stopper}", "reward.functions=[]",
                        "max_length=128", "loss.sampling.max_new_tokens=12", *extra)


def test_the_trainer_recomputes_the_samplers_log_probs_on_the_policy_tokens(tmp_path, envs, stopper):
    """Real sampling (HF generate at temperature 0.7) of three-turn episodes: the trainer's
    log-probs of the replies, recomputed on the packed episodes, are the sampler's."""
    run = tmp_path / "run"
    run_ranks(real_run, 2, tmp_path, echo_overrides(run, envs, stopper, "loss.sampling.temperature=0.7"))
    records = [r for r in metrics(run) if "rollout/logp_mismatch" in r]
    assert len(records) == 2 and all(r["rollout/turns"] >= 2 for r in records)  # episodes of several turns
    assert all(r["rollout/logp_mismatch"] < 1e-5 for r in records), records
    assert all(r["rollout/template_drift"] == 0 for r in records)


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_run(tmp_path, envs, stopper):
    base = ["n_examples=12", "save_every=4"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    ref, _ = run_ranks(real_run, 1, tmp_path, echo_overrides(whole, envs, stopper, *base))[0]
    with pytest.raises(ProcessRaisedException, match="Crash: killed at iteration 3"):
        run_ranks(real_run, 1, tmp_path, echo_overrides(broken, envs, stopper, *base), 2)
    assert [p.name for p in checkpointing.complete(broken)] == ["step-1", "step-2"]
    got, _ = run_ranks(real_run, 1, tmp_path, echo_overrides(broken, envs, stopper, *base, "resume=true"))[0]
    strip = [[{k: v for k, v in r.items() if not k.startswith("timing/") and k != "samples_per_s"} for r in metrics(d)]
             for d in (broken, whole)]
    assert any(r.get("rollout/turns", 0) >= 2 for r in strip[1])
    assert_same_run(strip[0], strip[1], rtol=1e-6)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_vllm_episodes_log_probs_are_the_trainers(tmp_path, envs, stopper):
    """The colocated vLLM engine plays the episodes on 2 ranks: its log-probs of the replies are
    the trainer's recomputed ones, iteration after iteration."""
    vllm_or_skip()
    run = tmp_path / "run"
    overrides = [o for o in echo_overrides(run, envs, stopper, "n_examples=12") if o != "sampler=hf"]
    vllm_subprocess([str(REPO / "train.py"), "sampler=vllm", *overrides], tmp_path)
    records = [r for r in metrics(run) if "rollout/logp_mismatch" in r]
    assert len(records) == 3 and all(r["rollout/turns"] >= 2 for r in records)
    assert all(r["rollout/logp_mismatch"] < 1e-4 for r in records), [r["rollout/logp_mismatch"] for r in records]


def test_env_is_refused_where_it_cannot_run(tmp_path):
    from models import ConfigError

    for loss, fix in (("online_dpo", "does not play episodes"), ("raft", "does not play episodes")):
        with pytest.raises(ConfigError, match=fix):
            TRAINERS[make_cfg(f"loss={loss}").loss.trainer](make_cfg(f"loss={loss}", "env=calculator",
                                                                     f"run_dir={tmp_path}"), torch.device("cpu"))
    with pytest.raises(ValueError, match="environment 'nope': not one of"):
        load_environment("nope", ENVIRONMENTS)
