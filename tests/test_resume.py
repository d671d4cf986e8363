"""A real 2-rank ``torchrun`` job, killed after a checkpoint and resumed, logs what an
uninterrupted run logs; and bad input stops a real launch before training, with a clear message."""

import json
import os
import signal
import time

import pytest
import torch

from conftest import run_ranks, torchrun
from test_trainer import assert_same_run, metrics, train_run

OVERRIDES = ["batch_size=8", "eval_batch_size=8", "n_examples=640", "n_eval_examples=8", "lr=1e-3",
             "warmup_steps=2", "eval_every=160", "max_length=64", "max_prompt_length=32"]
STEPS = 80


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run; checkpoints do not change what it logs."""
    tmp = tmp_path_factory.mktemp("reference")
    run_ranks(train_run, 2, tmp, [f"run_dir={tmp / 'run'}", "save_every=80", *OVERRIDES])
    return metrics(tmp / "run")


def test_killed_run_resumes_to_the_same_metrics(tmp_path, reference):
    run_dir = tmp_path / "killed"
    job = torchrun(f"run_dir={run_dir}", "save_every=80", *OVERRIDES)
    deadline = time.time() + 240
    while not (run_dir / "step-20").exists():  # the second checkpoint of 80 steps
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job, mid-run, no chance to clean up
    job.wait()
    finished_lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]  # the kill may have cut the last
    done_before_kill = json.loads(finished_lines[-1])["step"]
    assert done_before_kill < STEPS, "the job finished before it was killed; nothing was tested"

    job = torchrun(f"run_dir={run_dir}", "save_every=80", "resume=true", *OVERRIDES)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    assert "resumed from" in out
    assert_same_run(metrics(run_dir), reference)


def test_bad_input_fails_before_training_on_every_rank(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n" + "{not json\n")
    job = torchrun(f"run_dir={tmp_path / 'run'}", f"datasets=[{bad}]")
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert f"{bad}: line 2" in out or f"{bad}: row 2" in out, out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sigterm_checkpoints_stops_and_resumes_to_the_same_metrics(tmp_path, reference):
    overrides = [*OVERRIDES, "save_every=100000"]
    run_dir = tmp_path / "preempted"
    job = torchrun(f"run_dir={run_dir}", *overrides)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 10:
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, "the job made no progress in time"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGTERM)  # to torchrun, which forwards it to every rank, as slurm's scancel does
    out, _ = job.communicate(timeout=120)
    assert "SIGTERM at step" in out and "stopping" in out, out
    stopped_at = metrics(run_dir)[-1]["step"]
    assert 0 < stopped_at < STEPS
    assert [p.name for p in (run_dir).glob("step-*")] == [f"step-{stopped_at}"]  # save_every never came

    job = torchrun(f"run_dir={run_dir}", "resume=true", *overrides)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    assert f"resumed from {run_dir / f'step-{stopped_at}'}" in out
    assert_same_run(metrics(run_dir), reference)


def stop_flags(rank, world):
    """Rank 0 catches SIGTERM while inside the all-reduce of ``stop_requested`` (the wrapper sends
    it right after the reduction, as a signal landing during the blocking call is handled once the
    call returns). The signal must not be lost: the next call stops both ranks."""
    import distributed
    from trainers import Trainer

    trainer = object.__new__(Trainer)
    trainer.device, trainer.world = distributed.device(), world
    trainer.catch_stop_signals()
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
        return [trainer.stop_requested() for _ in range(3)]
    finally:
        torch.distributed.all_reduce = real


def test_a_signal_caught_during_the_stop_all_reduce_is_not_lost(tmp_path):
    flags = run_ranks(stop_flags, 2, tmp_path)
    assert flags == [[False, True, True], [False, True, True]]
