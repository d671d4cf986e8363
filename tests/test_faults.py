"""A rank that dies mid-run (SIGKILL, as the OOM killer or a lost node would) ends the whole real
2-rank ``torchrun`` job quickly, not at the collective timeout (``dist_timeout_minutes``, 30); the
job's output names the dead rank and says where to resume from; and the run resumes from its
last complete checkpoint and finishes.

Two things end the job: the survivor's next collective fails at once (gloo sees the peer's socket
close), and torchrun, seeing a worker exit non-zero, sends the others SIGTERM and SIGKILLs them
30 s later (the bound when a collective hangs instead, as NCCL's may)."""

import os
import re
import signal
import time
from pathlib import Path

import checkpointing
from conftest import run_ranks, torchrun
from helpers import metrics, train_run

# 20 steps, a checkpoint every 5
OVERRIDES = ["batch_size=8", "eval_batch_size=8", "n_examples=160", "n_eval_examples=8", "lr=1e-3",
             "warmup_steps=2", "eval_every=80", "max_length=64", "max_prompt_length=32", "save_every=40"]
STEPS = 20
EXIT_WITHIN_S = 60


def worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker of global rank ``rank``: a child of the agent whose
    environment has RANK=<rank> (LOCAL_RANK and GROUP_RANK are other entries)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among torchrun's children {children}")


def failures(summary: str) -> dict[int, str]:
    """torchrun's failure summary, as {global rank: exit code}."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", summary)
    return {int(rank): code for rank, code in found}


def wait_for_checkpoint(job, run_dir, step: int):
    deadline = time.time() + 240
    while not any(p.name == f"step-{step}" for p in checkpointing.complete(run_dir)):
        assert job.poll() is None, job.stdout.read()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def test_a_killed_rank_ends_the_job_names_itself_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    job = torchrun(f"run_dir={run_dir}", *OVERRIDES)
    try:
        wait_for_checkpoint(job, run_dir, 10)
        os.kill(worker_pid(job.pid, rank=1), signal.SIGKILL)
        killed_at = time.time()
        out, _ = job.communicate(timeout=EXIT_WITHIN_S)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    print(f"torchrun exited {time.time() - killed_at:.1f} s after the kill")  # pytest -s shows it
    assert job.returncode != 0
    assert failures(out).get(1) == "-9", out  # torchrun's summary: rank 1 died of SIGKILL
    last = checkpointing.complete(run_dir)[-1]
    step_at_kill = int(last.name.removeprefix("step-"))
    assert step_at_kill < STEPS, "the job finished before it was killed; nothing was tested"
    said = "a collective failed: another rank died or stopped answering"
    assert "rank 0 at step" in out and said in out and f"Last complete checkpoint: {last};" in out, out
    assert said in (run_dir / "train.log").read_text()  # rank 0 survived, and its log says so too

    before = metrics(run_dir)

    # the same resume a torchrun relaunch does (tests/test_resume.py), in ranks forked in a second
    # rather than started in ~13 s
    run_ranks(train_run, 2, tmp_path, [f"run_dir={run_dir}", "resume=true", *OVERRIDES])
    after = metrics(run_dir)
    assert [r["step"] for r in after if "loss/train" in r] == list(range(1, STEPS + 1))
    kept = sum(r["step"] <= step_at_kill for r in before)  # what was logged after the checkpoint is redone
    assert after[:kept] == before[:kept] and after[kept]["step"] == step_at_kill + 1
    assert checkpointing.complete(run_dir)[-1].name == f"step-{STEPS}"


FAIL_ON_RANK_1 = '''
import os


def flaky(prompt, completion, **row):
    if os.environ["RANK"] == "1":
        raise SystemExit("rank 1 gives up")  # not an Exception: reward functions' errors are caught
    return 1.0
'''


def test_a_rank_that_fails_alone_ends_the_job_instead_of_hanging_it(tmp_path):
    """Rank 1 fails in the middle of an RL iteration while rank 0 goes on into a forward pass
    (an FSDP all-gather): rank 1 must leave without its collective clean-up, which rank 0 would
    never join (before, it waited in a barrier and rank 0 in the all-gather until the timeout)."""
    reward = tmp_path / "flaky.py"
    reward.write_text(FAIL_ON_RANK_1)
    job = torchrun(f"run_dir={tmp_path / 'run'}", "loss=grpo", "sampler=hf", "datasets=[toy_add_prompts]",
                   f"reward.functions=[{reward}:flaky]", "loss.rollout_batch_size=4", "loss.n_samples_per_prompt=2",
                   "batch_size=4", "n_examples=8", "n_eval_examples=4", "eval_at_start=false", "max_length=48",
                   "max_prompt_length=24", "loss.sampling.max_new_tokens=4", "dist_timeout_minutes=5")
    try:
        out, _ = job.communicate(timeout=EXIT_WITHIN_S + 30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert "rank 1 gives up" in out, out[-3000:]
    assert 1 in failures(out), out[-3000:]
