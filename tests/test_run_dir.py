"""What a run leaves in run_dir, whatever happens to it: SIGKILL of every rank at seeded random
moments (mid-step, inside a checkpoint's write, inside the final export), each followed by
``resume=true``, ends with the metrics.jsonl, LATEST/ and checkpoints of the uninterrupted run, for
SFT, DPO (also with QLoRA), GRPO (also on multi-turn episodes) and online DPO; and each way of hurting a run that used to lose or corrupt work: a
kill between the last checkpoint and its export, a kill before the first checkpoint, a resume with
another config, two jobs in one run_dir, a damaged checkpoint, a full disk, Ctrl-C (once, twice),
and slurm's warning signal arriving twice.

Runs are ``train.main`` in forked ranks (``kill_points``); the reference is an uninterrupted run
of the same config, computed independently of any resume."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

import checkpointing
from conftest import REPO
from kill_points import choose, killed, outcome, run, small_datasets

SFT = ["batch_size=8", "eval_batch_size=8", "n_examples=48", "n_eval_examples=8", "lr=1e-3", "warmup_steps=1",
       "eval_every=24", "max_length=64", "max_prompt_length=32", "save_every=16", "keep_checkpoints=2"]
STEPS = 6  # checkpoints at 2, 4 and 6; keep_checkpoints=2 leaves step-4 and step-6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_datasets(tmp_path_factory.mktemp("data"))


def sft(run_dir, data, *extra):
    return [f"run_dir={run_dir}", f"datasets=[{data['sft']}]", *SFT, *extra]


def rl(run_dir, data, *extra):
    return [f"run_dir={run_dir}", f"datasets=[{data['prompt']}]", "sampler=hf", "loss.rollout_batch_size=4",
            "loss.n_samples_per_prompt=2", "batch_size=4", "n_examples=12", "save_every=4", "n_eval_examples=4",
            "eval_batch_size=4", "eval_every=1000", "eval_at_start=false", "lr=1e-3", "warmup_steps=1",
            "max_length=48", "max_prompt_length=24", "loss.sampling.max_new_tokens=6",
            "eval_sampling.max_new_tokens=6", "loss.sampling.temperature=2.0", *extra]


RUNS = {
    "dpo": lambda d, data: sft(d, data, "loss=dpo", f"datasets=[{data['pref']}]"),
    # QLoRA: only the adapters train, and only they are checkpointed, over a base in NF4 that
    # resume quantizes again; the reference is the policy with its adapters off
    "dpo_qlora": lambda d, data: sft(d, data, "loss=dpo", f"datasets=[{data['pref']}]", "lora.r=8",
                                     "lora.load_in_4bit=true", "lr=1e-2"),
    "grpo": lambda d, data: rl(d, data, "loss=grpo", "reward.functions=[toy_add]"),
    # three-turn episodes: a model whose replies end, and an environment that answers each
    "grpo_env": lambda d, data: rl(d, data, "loss=grpo", f"env={data['envs']}:Echo", f"model.archive={data['stopper']}",
                                   "reward.functions=[]", "max_turns=3", "max_length=96"),
    # an untrained model never adds right: the length of a completion is a reward that varies
    "online_dpo": lambda d, data: rl(d, data, "loss=online_dpo", "loss.rollout_batch_size=8", "batch_size=2",
                                     "n_examples=16", f"reward.functions=[{data['length_reward']}:length]"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted SFT run: its outcome and the moments each rank went through."""
    tmp = tmp_path_factory.mktemp("reference")
    done = run(tmp, sft(tmp / "run", data))
    assert done.codes == [None, None]
    return tmp / "run", outcome(tmp / "run"), done.traces


def resumed(tmp_path, overrides):
    done = run(tmp_path, [*overrides, "resume=true"])
    assert done.codes == [None, None], done.output
    return done


# --- the kill campaign ------------------------------------------------------------------------

def test_sigkilled_anywhere_any_number_of_times_resumes_to_the_uninterrupted_run(tmp_path, data, reference):
    _, expected, traces = reference
    forced = [(1, 4, "dcp.saved", 0),  # rank 1's shards of step-4 are written, rank 0's maybe not; no manifest
              (0, 6, "safetensors", 0)]  # the final checkpoint is complete, LATEST.tmp holds only the weights
    plan = choose(traces, random.Random(14), 3, forced)
    run_dir = tmp_path / "run"
    for at in plan:  # resume=true from the start, as every slurm (re)start passes it
        assert killed(tmp_path, sft(run_dir, data, "resume=true"), at), f"the run never reached {at}"
    resumed(tmp_path, sft(run_dir, data))
    assert outcome(run_dir) == expected


@pytest.mark.parametrize("name", sorted(RUNS))
def test_each_trainer_sigkilled_once_resumes_to_the_uninterrupted_run(tmp_path, data, name, request):
    reward = "def length(prompt, completion, **row):\n    return float(len(completion))\n"
    (tmp_path / "length_reward.py").write_text(reward)
    data = {**data, "length_reward": tmp_path / "length_reward.py"}
    if name == "grpo_env":
        data = {**data, "envs": request.getfixturevalue("envs"), "stopper": request.getfixturevalue("stopper")}
    done = run(tmp_path, RUNS[name](tmp_path / "whole", data))
    assert done.codes == [None, None], done.output
    if name == "grpo_env":
        lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
        assert max(x.get("rollout/turns", 0) for x in lines) > 1.5
    training = [[m for m in trace if m[0] >= 1] for trace in done.traces]  # a moment after the first update
    (at,) = choose(training, random.Random(f"14-{name}"), 1)
    run_dir = tmp_path / "killed"
    assert killed(tmp_path, RUNS[name](run_dir, data), at), f"the run never reached {at}"
    resumed(tmp_path, RUNS[name](run_dir, data))
    assert outcome(run_dir) == outcome(tmp_path / "whole")


# --- what used to go wrong, one by one --------------------------------------------------------

def test_a_kill_after_the_last_checkpoint_before_its_export_is_finished_on_resume(tmp_path, data, reference):
    """Killed the moment step-6 appears: LATEST still holds step 4's weights and step-2 is not yet
    deleted. resume=true used to log "resumed at step 6" and leave both so."""
    run_dir = tmp_path / "run"
    assert killed(tmp_path, sft(run_dir, data), (0, STEPS, "rmtree", 0))
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-2", "step-4", "step-6"]
    assert outcome(run_dir)["LATEST"] != reference[1]["LATEST"]
    resumed(tmp_path, sft(run_dir, data))
    assert outcome(run_dir) == reference[1]
    assert checkpointing.exported_step(run_dir / "LATEST") == STEPS  # LATEST/checkpoint.json says which it is


def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path, data, reference):
    run_dir = tmp_path / "run"
    assert killed(tmp_path, sft(run_dir, data), (0, 1, "metrics", 0))
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not list(run_dir.glob("step-*"))
    resumed(tmp_path, sft(run_dir, data))  # nothing to resume: a fresh start, which used to keep those lines
    assert outcome(run_dir) == reference[1]


def error_line(done) -> str:
    """The one line a refused run writes: rank 0's, every rank exiting with code 2."""
    assert done.codes == [2] * len(done.codes), done.output
    lines = [line for line in done.output[0].splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and not any("error: " in out for out in done.output[1:]), done.output
    return lines[0]


def test_resume_refuses_another_config_and_accepts_a_longer_run(tmp_path, data, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    config = (run_dir / "config.yaml").read_text()
    line = error_line(run(tmp_path, sft(run_dir, data, "resume=true", "lr=2e-3", "batch_size=16")))
    assert f"{run_dir / 'step-6'} was trained with another config" in line
    assert "batch_size=8 (now 16)" in line and "lr=0.001 (now 0.002)" in line
    assert "Keys that may change on resume: n_examples" in line
    line = error_line(run(tmp_path, sft(run_dir, data, "resume=true", "loss=dpo", f"datasets=[{data['pref']}]")))
    assert "loss.name=sft (now dpo)" in line and f"datasets=['{data['sft']}'] (now ['{data['pref']}'])" in line
    assert (run_dir / "config.yaml").read_text() == config  # refused before anything was written

    # train longer, evaluate and keep differently: the run goes on from step 6 to step 8
    resumed(tmp_path, sft(run_dir, data, "n_examples=64", "eval_every=32", "keep_checkpoints=3",
                          "dist_timeout_minutes=5"))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[: len(reference[1]["metrics"])] == [json.loads(x) for x in
                                                       (reference[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/train" in r] == list(range(1, 9))
    assert [p.name for p in checkpointing.complete(run_dir)] == ["step-4", "step-6", "step-8"]


def test_resume_refuses_starting_weights_that_changed_since(tmp_path, data):
    """A checkpoint holds only what trains: a LoRA policy's adapters, not its frozen base, which
    resume reads again from model.archive. If that export was overwritten meanwhile (the SFT stage
    run again), the run would go on from another model: it stops instead, naming it."""
    import torch
    from omegaconf import OmegaConf

    import models

    base = tmp_path / "sft_export"
    tiny = OmegaConf.load(REPO / "config/model/tiny.yaml")
    model = models.load_model(tiny, torch.device("cpu"), seed=3)
    model.save_pretrained(base)
    models.load_tokenizer(tiny).save_pretrained(base)
    run_dir = tmp_path / "run"
    overrides = sft(run_dir, data, f"model.archive={base}", "lora.r=8", "n_examples=16")
    done = run(tmp_path, overrides)
    assert done.codes == [None, None], done.output
    resumed(tmp_path, [*overrides[:-1], "n_examples=24"])  # the same weights: it goes on
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(base)
    line = error_line(run(tmp_path, [*overrides[:-1], "n_examples=32", "resume=true"]))
    assert f"{run_dir / 'step-3'} was trained from other starting weights than those at {base} now" in line


def test_resume_takes_a_key_added_since_the_checkpoint_at_its_null_default():
    """A checkpoint written before ``fsdp_shard_ranks`` existed resumes with it unset (null: the
    sharding the run had), but not with it set, nor with another key's value gone or changed."""
    saved = {"lr": 1e-3, "model": {"name": "tiny"}}
    assert checkpointing.config_differences(saved, {**saved, "fsdp_shard_ranks": None}) == []
    assert checkpointing.config_differences(saved, {**saved, "fsdp_shard_ranks": 1}) == [
        "fsdp_shard_ranks=(unset) (now 1)"]
    assert checkpointing.config_differences({**saved, "fsdp_shard_ranks": 1}, saved) == [
        "fsdp_shard_ranks=1 (now (unset))"]
    assert checkpointing.config_differences(saved, {"lr": 1e-3, "model": {"name": None}}) == [
        "model.name=tiny (now None)"]
    assert checkpointing.config_differences(saved, {**saved, "profile_steps": [2, 3]}) == []  # may change
    # a GRPO checkpoint from before ppo_epochs became epochs_per_iteration and the sampling sections
    # listed top_k and stop (0 and None in code then) resumes; other values of them do not
    grpo = {"loss": {"name": "grpo", "ppo_epochs": 2, "sampling": {"temperature": 1.0}}}
    now = {"loss": {"name": "grpo", "epochs_per_iteration": 2, "sampling": {"temperature": 1.0, "top_k": 0,
                                                                            "stop": None}}}
    assert checkpointing.config_differences(grpo, now) == []
    now["loss"].update(epochs_per_iteration=1, sampling={"temperature": 1.0, "top_k": 50, "stop": None})
    assert checkpointing.config_differences(grpo, now) == ["loss.epochs_per_iteration=2 (now 1)",
                                                           "loss.sampling.top_k=(unset) (now 50)"]
    # from before judges: the judge: group is not read without reward.judges, whatever it holds;
    # a judge now is a difference
    before = {"reward": {"functions": ["toy_add"]}, "loss": {"name": "online_dpo"}}
    after = {"reward": {"functions": ["toy_add"], "judges": []}, "judge": {"model": "x", "temperature": 0.5},
             "loss": {"name": "online_dpo", "self_judge": False, "principle": "Be kind."}}
    assert checkpointing.config_differences(before, after) == []
    after["reward"]["judges"], after["loss"]["self_judge"] = ["http://127.0.0.1:8000/v1"], True
    assert checkpointing.config_differences(before, after) == [
        "loss.self_judge=(unset) (now True)", "reward.judges=(unset) (now ['http://127.0.0.1:8000/v1'])"]


HOLD = """import sys, time
sys.path.insert(0, {repo!r})
import checkpointing
held = checkpointing.lock(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_job_in_a_run_dir_in_use_stops_at_once_naming_the_holder(tmp_path, data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO)), str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        line = error_line(run(tmp_path, sft(run_dir, data)))
        assert f"run_dir={run_dir} is in use by pid {holder.pid} on " in line and "started" in line
        assert sorted(p.name for p in run_dir.iterdir()) == ["lock"]  # no train.log, metrics or checkpoint
    finally:
        holder.kill()  # SIGKILL, as a job dies: the kernel drops its lock, nothing is left to clean up
        holder.wait()
    held = checkpointing.lock(run_dir)
    assert f"pid {os.getpid()} on " in (run_dir / "lock").read_text()
    held.close()


def test_a_damaged_checkpoint_is_skipped_and_none_left_stops_clearly(tmp_path, data, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    shard = run_dir / "step-6" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # as a full disk or a broken copy leaves it
    done = resumed(tmp_path, sft(run_dir, data))
    assert f"checkpoint {run_dir / 'step-6'} is damaged ({shard} has" in done.output[0]
    assert f"resumed from {run_dir / 'step-4'} at step 4" in done.output[0]
    assert outcome(run_dir) == reference[1]  # steps 5 and 6 again, step-6 rewritten, LATEST as it was

    for step in (4, 6):
        (run_dir / f"step-{step}" / "__0_0.distcp").unlink()
    line = error_line(run(tmp_path, sft(run_dir, data, "resume=true")))
    missing = run_dir / "step-6" / "__0_0.distcp"
    assert f"no checkpoint in run_dir={run_dir} is complete (step-6: {missing} is missing;" in line


def test_a_full_disk_stops_the_run_in_one_line_and_leaves_the_checkpoints_before(tmp_path, data, reference):
    """Rank 1 cannot write its shards of step-4: both ranks stop there, rank 0 says why."""
    run_dir = tmp_path / "run"
    line = error_line(run(tmp_path, sft(run_dir, data), at=(1, 4, "dcp.save", 0), do="fill_disk"))
    assert f"cannot write {run_dir / 'step-4.tmp'}: [Errno 27] File too large (" in line and " free there)" in line
    assert "removed the partial step-4.tmp" in line
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-2"]
    before = json.loads((tmp_path / "pids" / "before-full-disk.json").read_text())
    assert {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in before} == before
    resumed(tmp_path, sft(run_dir, data))  # the space is back
    assert outcome(run_dir) == reference[1]


def test_ctrl_c_checkpoints_and_stops_and_the_run_resumes(tmp_path, data, reference):
    run_dir = tmp_path / "run"
    done = run(tmp_path, sft(run_dir, data), at=(0, 3, "metrics", 0), do="sigint")
    assert done.codes == [None, None], done.output  # used to die of KeyboardInterrupt, without a checkpoint
    assert f"SIGINT at step 3: checkpointed in {run_dir / 'step-3'}; stopping" in done.output[0]
    assert [p.name for p in checkpointing.complete(run_dir)] == ["step-2", "step-3"]
    resumed(tmp_path, sft(run_dir, data))
    assert outcome(run_dir) == reference[1]


def test_a_second_ctrl_c_stops_at_once(tmp_path, data):
    run_dir = tmp_path / "run"
    done = run(tmp_path, sft(run_dir, data), at=(0, 3, "metrics", 0), do="sigint_twice")
    assert done.died_of == "SIGINT"
    assert "SIGINT after SIGINT: stopping at once, without a checkpoint" in done.output[0]
    assert [p.name for p in checkpointing.checkpoints(run_dir)] == ["step-2"]


FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
"""


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_arriving_twice_checkpoints_once_and_requeues_on_the_warning(tmp_path, data, sig):
    """slurm signals every process of the step (its --signal=USR1@120 warning, scancel's SIGTERM),
    and torchrun forwards its own copy (launch.sh has it handle SIGUSR1 too): each rank gets two."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SCONTROL_LOG": str(tmp_path / "scontrol")}
    run_dir = tmp_path / "run"
    do = {"SIGUSR1": "usr1_twice", "SIGTERM": "term_twice"}[sig]
    done = run(tmp_path, sft(run_dir, data), at=(0, 3, "metrics", 0), do=do, env=env)
    assert done.codes == [None, None], done.output
    assert [p.name for p in checkpointing.complete(run_dir)] == ["step-2", "step-3"]
    if sig == "SIGUSR1":
        assert "SIGUSR1 at step 3: checkpointed; requeueing slurm job 4242" in done.output[0]
        assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"
    else:
        assert f"SIGTERM at step 3: checkpointed in {run_dir / 'step-3'}; stopping" in done.output[0]
        assert not (tmp_path / "scontrol").exists()
