"""Off-policy by design (``rollout:``): one-step-off and bounded-staleness RL, colocated and split
into trainer and sampler ranks, in one launch.

The identities: the split layout trains what the colocated layout trains (1 trainer + 1 sampler
rank against one rank that does both: the same samples, bit for bit, and the same weights), with
and without staleness; off-policy with samples that do not depend on the weights trains exactly
as on-policy. Each sample's policy version follows the schedule max(0, step - k). A split one-step-off
run SIGKILLed at random moments resumes to the uninterrupted run; a weight sync that hangs stops
the run within its timeout, in one line.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

import models
from conftest import REPO, make_cfg, run_ranks
from helpers import LENGTH_REWARD, metrics, rl_run, vllm_subprocess
from kill_points import choose, killed, outcome, run, small_datasets
from trainers import TRAINERS, check_rollout

SPLIT = ("rollout.sampler_ranks=1",)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    (directory / "length_reward.py").write_text(LENGTH_REWARD)
    return {**small_datasets(directory), "length": directory / "length_reward.py"}


def grpo(run_dir, data, *extra):
    """GRPO that learns something from the first step: the reward is the completion's length."""
    return [f"run_dir={run_dir}", "loss=grpo", f"datasets=[{data['prompt']}]", f"reward.functions=[{data['length']}:length]",
            "sampler=hf", "loss.rollout_batch_size=4", "loss.n_samples_per_prompt=2", "batch_size=4",
            "n_examples=20", "save_every=8", "n_eval_examples=4", "eval_batch_size=4", "eval_every=1000",
            "eval_at_start=false", "lr=1e-2", "warmup_steps=1", "max_length=48", "max_prompt_length=24",
            "loss.sampling.max_new_tokens=6", "eval_sampling.max_new_tokens=6", "loss.sampling.temperature=2.0",
            "loss.save_rollouts=true", *extra]


def finished(tmp_path, overrides, world):
    tmp_path.mkdir(parents=True, exist_ok=True)
    done = run(tmp_path, overrides, world=world)
    assert done.codes == [None] * world, done.output
    return done


def rollout_versions(run_dir) -> dict[int, set[int]]:
    """{step: the policy versions of its samples} from rollouts/step-<N>.jsonl."""
    return {int(f.stem.split("-")[1]): {json.loads(line)["policy_version"] for line in f.read_text().splitlines()}
            for f in (run_dir / "rollouts").glob("step-*.jsonl")}


def samples(run_dir) -> dict:
    """Every sample the run trained on: its text, score and policy version, by step."""
    return {f.name: [{k: row[k] for k in ("prompt", "text", "score", "policy_version")}
                     for row in map(json.loads, f.read_text().splitlines())]
            for f in sorted((run_dir / "rollouts").glob("*.jsonl"))}


def assert_same_metrics(a, b):
    """Every metric but wall-clock time, to rounding: the trainer computes the same, but the sampler
    ranks' copy of the policy (HF generate) rounds its log-probs unlike the trainer's own model, by
    ~1e-7 per token, which the importance weights carry into the losses."""
    wall = ("timing/", "tokens_per_s", "samples_per_s", "memory/")
    ra, rb = metrics(a), metrics(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        x, y = ({k: v for k, v in r.items() if not k.startswith(wall)} for r in (x, y))
        assert x.keys() == y.keys()
        assert x == {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in y.items()}


def assert_close_weights(a, b):
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)  # Adam scales rounding up where a gradient is ~0


@pytest.mark.parametrize("k, extra", [(0, ()), (1, ()), (1, ("lora.r=8", "lr=5e-2"))], ids=["sync", "one_step_off",
                                                                                          "one_step_off_lora"])
def test_the_split_layout_trains_what_the_colocated_layout_trains(tmp_path, data, k, extra):
    """A sampler rank samples what a colocated rank 0 samples (its engine seeded by its rank among
    the samplers) and one trainer rank trains as one rank does: everything the runs log and export
    is equal, whichever layout generated the samples and however old they are. With LoRA the sync
    sends the adapters alone, onto the sampler's own copy of the frozen base."""
    stale = f"rollout.max_staleness={k}"
    finished(tmp_path / "c", grpo(tmp_path / "colocated", data, stale, *extra), world=1)
    finished(tmp_path / "s", grpo(tmp_path / "split", data, stale, *extra, *SPLIT), world=2)
    assert samples(tmp_path / "split") == samples(tmp_path / "colocated")
    assert_same_metrics(tmp_path / "split", tmp_path / "colocated")
    assert_close_weights(tmp_path / "split" / "LATEST", tmp_path / "colocated" / "LATEST")
    records = [r for r in metrics(tmp_path / "colocated") if "rollout/staleness_max" in r]
    assert len(records) == 5 and records[-1]["loss/train"] != 0  # it trained on something
    # each sample is at most k updates old, exactly as the schedule says: step s samples from max(0, s - k)
    for directory in ("colocated", "split"):
        assert rollout_versions(tmp_path / directory) == {s: {max(0, s - 1 - k)} for s in range(1, 6)}
    assert [r["rollout/staleness_max"] for r in records] == [min(s, k) for s in range(5)]


def test_staleness_two_samples_from_two_updates_back(tmp_path, data):
    finished(tmp_path, grpo(tmp_path / "run", data, "rollout.max_staleness=2"), world=1)
    assert rollout_versions(tmp_path / "run") == {s: {max(0, s - 3)} for s in range(1, 6)}


def test_off_policy_with_samples_that_do_not_depend_on_the_weights_trains_as_on_policy(tmp_path):
    """``FixedCompletions`` returns the same samples (and sampler log-probs) whatever the weights:
    then one-step-off differs from on-policy only in which weights the samples are attributed to.
    Everything trained must be equal; only the staleness differs (and the sampler-mismatch
    monitor, which off-policy samples do not feed)."""
    from helpers import rl_overrides

    runs = {}
    for k in (0, 1):
        run_dir = tmp_path / f"k{k}"
        weights = run_ranks(rl_run, 2, tmp_path, rl_overrides(run_dir, "grpo", "n_examples=12",
                                                             f"rollout.max_staleness={k}"))[0][0]
        runs[k] = (metrics(run_dir), weights)
    (on, w_on), (off, w_off) = runs[0], runs[1]
    differ = ("timing/", "samples_per_s", "tokens_per_s", "memory/", "rollout/staleness", "monitor/sampler_mismatch")
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith(differ)}  # noqa: E731
    assert [keep(r) for r in off] == [keep(r) for r in on]
    assert all(w_on[name].equal(w_off[name]) for name in w_on)
    assert [r["rollout/staleness_max"] for r in off if "rollout/staleness_max" in r] == [0, 1, 1]
    assert off[1]["loss/train"] != 0


def test_a_split_one_step_off_run_sigkilled_anywhere_resumes_to_the_uninterrupted_run(tmp_path, data):
    """Killed whole (trainer and sampler rank) at moments drawn from the trainer's writes, including
    inside the checkpoint that holds the rollout already generated for the next step; resumed each
    time, the run ends as the uninterrupted one did. A resume that regenerated that rollout from the
    checkpoint's weights (one update newer) would train on other samples."""
    overrides = lambda run_dir: grpo(run_dir, data, "rollout.max_staleness=1", *SPLIT)  # noqa: E731
    whole = finished(tmp_path / "w", overrides(tmp_path / "whole"), world=2)
    forced = [(0, 2, "torch.save", 0)]  # step-2's rollouts_ahead.pt written, its manifest not
    plan = choose(whole.traces, random.Random(31), 2, forced)
    run_dir = tmp_path / "killed"
    for at in plan:
        assert killed(tmp_path, [*overrides(run_dir), "resume=true"], at), f"the run never reached {at}"
    finished(tmp_path, [*overrides(run_dir), "resume=true"], world=2)
    assert outcome(run_dir) == outcome(tmp_path / "whole")


def test_a_stop_signal_to_every_rank_of_a_split_run_checkpoints_and_resumes(tmp_path, data):
    """Preemption signals every process of the job, the sampler rank too: it must keep answering
    until the trainers have checkpointed (with the rollout it was generating), then stop."""
    overrides = lambda run_dir: grpo(run_dir, data, "rollout.max_staleness=1", *SPLIT)  # noqa: E731
    finished(tmp_path / "w", overrides(tmp_path / "whole"), world=2)
    run_dir = tmp_path / "stopped"
    stopped = run(tmp_path, overrides(run_dir), at=(0, 2, "step", 0), do="term_twice", world=2)
    assert stopped.codes == [None, None], stopped.output
    assert (run_dir / "step-3").exists() and not (run_dir / "step-5").exists()
    finished(tmp_path, [*overrides(run_dir), "resume=true"], world=2)
    assert outcome(run_dir) == outcome(tmp_path / "whole")


def hanging(rank, world, overrides, out_dir, who):
    """``train.main`` whose sampler rank (``who="sampler"``) or trainer rank stops answering in the
    middle of the second weight sync."""
    import sampler_service
    import train

    saved = os.dup(1), os.dup(2)
    with open(os.path.join(out_dir, f"output-rank{rank}"), "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    calls = []

    def hang(*args):  # until the harness stops it (SIGTERM, which the run otherwise catches to checkpoint)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(600)

    if who == "sampler":
        receive = sampler_service.receive_weights

        def stuck(*args):
            calls.append(1)
            if len(calls) == 2:
                hang()
            return receive(*args)

        sampler_service.receive_weights = stuck
    else:
        sync = sampler_service.RemoteSampler.sync_weights

        def stuck(self, model):
            calls.append(1)
            if len(calls) == 2:  # after the sampler said it is ready, before the first tensor
                self.link.broadcast = hang
            return sync(self, model)

        sampler_service.RemoteSampler.sync_weights = stuck
    try:
        train.main(make_cfg(*overrides))
    finally:  # what the harness prints of the exit (train.py's own __main__ prints nothing) is not the run's
        sys.stdout.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)


@pytest.mark.parametrize("who, rank, line", [
    ("sampler", 0, "rank 0 (trainer rank 0): the weight sync to the sampler ranks (model.embed_tokens.weight)"),
    ("trainer", 1, "rank 1 (sampler rank 0): the weight sync from trainer rank 0 (model.embed_tokens.weight)"),
])
def test_a_weight_sync_that_hangs_stops_the_run_within_its_timeout_in_one_line(tmp_path, data, who, rank, line):
    """Whichever side stops answering, the other says so within ``rollout.sync_timeout_s`` and its
    exit ends the job (torchrun, here the harness, stops the rank that hangs)."""
    overrides = grpo(tmp_path / "run", data, "rollout.max_staleness=1", "rollout.sync_timeout_s=3", *SPLIT)
    start = time.monotonic()
    with pytest.raises((ProcessExitedException, ProcessRaisedException)):
        run_ranks(hanging, 2, tmp_path, overrides, str(tmp_path), who)
    assert time.monotonic() - start < 120  # the hanging rank sleeps 600 s: it was stopped, not waited for
    said = (tmp_path / f"output-rank{rank}").read_text()
    lines = [x for x in said.splitlines() if "sync_timeout_s" in x]
    assert len(lines) == 1, said[-3000:]
    assert line in lines[0]
    assert "did not finish in rollout.sync_timeout_s=3s: the run stops. Last complete checkpoint: none" in lines[0]
    assert "Traceback" not in said


@pytest.mark.parametrize("overrides, error", [
    (["rollout.sampler_ranks=2"], "rollout.sampler_ranks=2: expected 0 (every rank samples and trains) or fewer "
                                  "than the launch's 2 ranks"),
    (["rollout.max_staleness=-1"], "rollout.max_staleness=-1"),
    (["loss=online_dpo", "rollout.max_staleness=1"], "loss=online_dpo samples on-policy in every rank"),
    (["rollout.sampler_ranks=1", "env=calculator"], "the sampler ranks do not run environments yet"),
    (["rollout.sync_timeout_s=0"], "rollout.sync_timeout_s=0: expected seconds > 0"),
    (["rollout.sampler_ranks=1", "sampler=vllm", "sampler.tensor_parallel_size=2"],
     "tensor parallelism across sampler ranks is not built yet"),
])
def test_a_layout_that_cannot_run_is_refused_before_anything_loads(overrides, error):
    cfg = make_cfg("loss=grpo", *overrides)
    with pytest.raises(models.ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        check_rollout(cfg, 2, TRAINERS[cfg.loss.trainer])


def test_vllm_on_a_sampler_rank_samples_what_it_samples_colocated(tmp_path):
    """The real engine: a torchrun launch of 1 trainer + 1 sampler rank (vLLM built in the sampler
    rank's own world) and a single process doing both, one-step-off: the same run."""
    common = ["loss=grpo", "datasets=[toy_add_prompts]", "reward.functions=[toy_add]", "sampler=vllm",
              "loss.rollout_batch_size=4", "loss.n_samples_per_prompt=2", "batch_size=4", "n_examples=12",
              "n_eval_examples=4", "eval_batch_size=4", "eval_every=1000", "eval_at_start=false", "lr=1e-2",
              "warmup_steps=1", "max_length=48", "max_prompt_length=24", "loss.sampling.max_new_tokens=8",
              "eval_sampling.max_new_tokens=8", "loss.sampling.temperature=2.0", "rollout.max_staleness=1"]
    vllm_subprocess(["train.py", f"run_dir={tmp_path / 'split'}", *common, *SPLIT], tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    single = subprocess.run([sys.executable, "train.py", f"run_dir={tmp_path / 'colocated'}", *common], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=400)
    assert single.returncode == 0, single.stderr[-3000:]
    split, colocated = outcome(tmp_path / "split"), outcome(tmp_path / "colocated")
    assert split["metrics"] == colocated["metrics"]
    assert split["LATEST"] == colocated["LATEST"]
    assert [r["rollout/staleness_max"] for r in split["metrics"] if "rollout/staleness_max" in r] == [0, 1, 1]
