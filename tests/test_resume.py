"""A real 2-rank ``torchrun`` job, SIGKILLed whole (torchrun and its ranks, as the OOM killer
ends a job), then resumed and SIGKILLed again, torchrun alone (its ranks must die with it and
write nothing more), resumes to the metrics of an uninterrupted run; Ctrl-C on torchrun
checkpoints, stops and resumes the same way; and bad input stops a real launch before training,
with a clear message."""

import json
import os
import signal
import time

import pytest
import torch

from conftest import alive, job_pids, kill_job, run_ranks, torchrun
from helpers import assert_same_run, metrics, train_run

OVERRIDES = ["batch_size=8", "eval_batch_size=8", "n_examples=640", "n_eval_examples=8", "lr=1e-3",
             "warmup_steps=2", "eval_every=160", "max_length=64", "max_prompt_length=32"]
STEPS = 80


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run; checkpoints do not change what it logs."""
    tmp = tmp_path_factory.mktemp("reference")
    run_ranks(train_run, 2, tmp, [f"run_dir={tmp / 'run'}", "save_every=80", *OVERRIDES])
    return metrics(tmp / "run")


def wait_for(job, done, what: str):
    deadline = time.time() + 240
    while not done():
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(0.05)


def logged_steps(run_dir) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # a kill may have cut the last
    return [json.loads(line)["step"] for line in lines]


def test_killed_whole_then_torchrun_alone_resumes_to_the_same_metrics(tmp_path, reference):
    run_dir = tmp_path / "killed"
    args = [f"run_dir={run_dir}", "save_every=80", "resume=true", *OVERRIDES]
    job = torchrun(*args)
    wait_for(job, lambda: (run_dir / "step-20").exists(), "checkpoint")  # the second of 80 steps
    kill_job(job)  # no chance to clean up
    assert max(logged_steps(run_dir)) < STEPS, "the job finished before it was killed; nothing was tested"

    job = torchrun(*args)
    wait_for(job, lambda: (run_dir / "step-40").exists(), "checkpoint")
    ranks = job_pids(job.pid)[1:]
    assert ranks
    os.kill(job.pid, signal.SIGKILL)  # torchrun alone: its ranks, in sessions of their own, used to run on
    at_kill = max(logged_steps(run_dir))
    job.wait()
    deadline = time.time() + 30
    while any(alive(pid) for pid in ranks):
        assert time.time() < deadline, "the ranks outlived torchrun"
        time.sleep(0.05)
    assert max(logged_steps(run_dir)) <= at_kill + 1, "the ranks went on training without torchrun"

    # the same resume a torchrun relaunch does, in ranks forked in a second rather than started in ~13 s
    run_ranks(train_run, 2, tmp_path, args)
    assert_same_run(metrics(run_dir), reference)


def test_bad_input_fails_before_training_on_every_rank(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n" + "{not json\n")
    job = torchrun(f"run_dir={tmp_path / 'run'}", f"datasets=[{bad}]")
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert f"{bad}: line 2" in out or f"{bad}: row 2" in out, out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_ctrl_c_on_torchrun_checkpoints_stops_and_resumes_to_the_same_metrics(tmp_path, reference):
    overrides = [*OVERRIDES, "save_every=100000"]
    run_dir = tmp_path / "interrupted"
    job = torchrun(f"run_dir={run_dir}", *overrides)
    wait_for(job, lambda: (run_dir / "metrics.jsonl").exists() and len(logged_steps(run_dir)) >= 10, "progress")
    os.kill(job.pid, signal.SIGINT)  # Ctrl-C: torchrun forwards it to every rank
    out, _ = job.communicate(timeout=120)
    assert "SIGINT at step" in out and "stopping" in out, out  # used to stop without either
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 0 < stopped_at < STEPS
    assert [p.name for p in run_dir.glob("step-*")] == [f"step-{stopped_at}"]  # save_every never came

    run_ranks(train_run, 2, tmp_path, [f"run_dir={run_dir}", "resume=true", *overrides])
    assert_same_run(metrics(run_dir), reference)


def stop_flags(rank, world):
    """Rank 0 catches SIGTERM while inside the all-reduce of ``StopSignals.requested`` (the wrapper
    sends it right after the reduction, as a signal landing during the blocking call is handled once
    the call returns). The signal must not be lost: the next call stops both ranks."""
    from preemption import StopSignals

    stop = StopSignals()
    real = torch.distributed.all_reduce
    state = {"sent": False}

    def all_reduce(tensor, **kwargs):
        out = real(tensor, **kwargs)
        if rank == 0 and not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    torch.distributed.all_reduce = all_reduce
    try:
        return [stop.requested() for _ in range(3)]
    finally:
        torch.distributed.all_reduce = real


def test_a_signal_caught_during_the_stop_all_reduce_is_not_lost(tmp_path):
    flags = run_ranks(stop_flags, 2, tmp_path)
    assert flags == [[False, True, True], [False, True, True]]
