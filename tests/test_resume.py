"""A real 2-rank ``torchrun`` job, killed after a checkpoint and resumed, logs what an
uninterrupted run logs; and bad input stops a real launch before training, with a clear message."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_ranks
from test_trainer import assert_same_run, metrics, train_run

OVERRIDES = ["batch_size=8", "eval_batch_size=8", "n_examples=960", "n_eval_examples=8", "lr=1e-3",
             "warmup_steps=2", "eval_every=160", "save_every=80", "max_length=64", "max_prompt_length=32"]


def torchrun(*args, **kwargs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, **kwargs)


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    reference = tmp_path / "reference"
    run_ranks(train_run, 2, tmp_path, [f"run_dir={reference}", *OVERRIDES])

    run_dir = tmp_path / "killed"
    job = torchrun(f"run_dir={run_dir}", *OVERRIDES)
    deadline = time.time() + 240
    while not (run_dir / "step-30").exists():  # the third checkpoint of 120 steps
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the whole job, mid-run, no chance to clean up
    job.wait()
    done_before_kill = metrics(run_dir)[-1]["step"]
    assert done_before_kill < 120, "the job finished before it was killed; nothing was tested"

    job = torchrun(f"run_dir={run_dir}", "resume=true", *OVERRIDES)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    assert "resumed from" in out
    assert_same_run(metrics(run_dir), metrics(reference))


def test_bad_input_fails_before_training_on_every_rank(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n" + "{not json\n")
    job = torchrun(f"run_dir={tmp_path / 'run'}", f"datasets=[{bad}]")
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert f"{bad}: line 2" in out or f"{bad}: row 2" in out, out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
