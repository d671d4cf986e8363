"""Slurm launch without slurm: ``scripts/slurm/launch.sh`` turns the SLURM_* variables into the
right torchrun command, every stage's sbatch file hands it its overrides and the user's, torchrun
forwards slurm's SIGUSR1 warning to the ranks, and a 2-node job (a fake ``srun`` that starts the
real sbatch body once per "node" on this host) trains exactly what a 1-node 2-rank run trains."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, fast_overrides, free_port, make_cfg, run_ranks
from helpers import assert_same_run, metrics, train_run

SLURM = REPO / "scripts" / "slurm"
STAGES = ["sft", "rm", "dpo", "ppo"]

# srun inside a FAKE_NNODES-node allocation, on this host: one task per "node", with the variables
# srun sets per task (the job's own, SLURM_JOB_ID and SLURM_JOB_NODELIST, come from the
# environment, as sbatch sets them for the batch script); like --kill-on-bad-exit=1, the first
# task to fail ends the others.
FAKE_SRUN = """#!/usr/bin/env bash
while [ $# -gt 0 ] && [[ $1 == -* ]]; do echo "$1" >> "$FAKE_SRUN_ARGS"; shift; done
pids=()
for ((node = 0; node < FAKE_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NNODES=$FAKE_NNODES \\
        SLURM_NTASKS=$FAKE_NNODES SLURM_STEP_ID=0 "$@" &
    pids+=($!)
done
rc=0
for _ in "${pids[@]}"; do
    if ! wait -n; then rc=1; kill "${pids[@]}" 2>/dev/null; fi
done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
[ "$1 $2 $3" = "show hostnames gpu-a[07-08]" ] || { echo "fake scontrol: unexpected $*" >&2; exit 1; }
printf 'gpu-a07\\ngpu-a08\\n'
"""

# FAKE_GPUS GPUs, or none (nvidia-smi installed but failing, as on a node without a driver)
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
[ "$1" = "-L" ] && [ -n "${FAKE_GPUS:-}" ] || exit 9
for ((i = 0; i < FAKE_GPUS; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""

# The python launch.sh execs (PY=...): records its arguments instead of starting torchrun.
FAKE_PY = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_PY_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID")}}) + "\\n")
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "nvidia-smi": FAKE_NVIDIA_SMI,
                       "python": FAKE_PY}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def env_with(fakes, **variables) -> dict:
    """This environment without any real SLURM_* variable, the fakes first on PATH, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "PY")}
    env.update(PATH=f"{fakes}:{env['PATH']}", FAKE_SRUN_ARGS=str(fakes.parent / "srun-args"),
               FAKE_PY_LOG=str(fakes.parent / "python-calls.jsonl"))
    env.update({k: str(v) for k, v in variables.items()})
    return env


def dry_run(fakes, cmd, cwd=REPO, **variables):
    """Run ``cmd`` with the fake python; returns (completed process, the argv each "node" execed)."""
    log = fakes.parent / "python-calls.jsonl"
    log.unlink(missing_ok=True)
    env = env_with(fakes, PY=fakes / "python", **variables)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def torchrun_args(nnodes, nproc, endpoint, job_id):
    return ["-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", str(job_id),
            "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown_timeout", "110",
            "train.py", "resume=true"]


def test_launch_builds_the_torchrun_command_from_the_allocation(fakes):
    user = ["datasets=[hh,shp]", "exp_name=my run", "run_dir=/ckpt/${run_id:}"]  # passed through verbatim
    done, calls = dry_run(fakes, ["bash", str(SLURM / "launch.sh"), *user], SLURM_JOB_ID=4242,
                          SLURM_NNODES=2, SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_NODEID=1, FAKE_GPUS=8)
    assert done.returncode == 0, done.stderr
    # rendezvous at the first host on a port made from the job id; 8 GPUs counted by nvidia-smi
    assert calls == [{"argv": torchrun_args(2, 8, "gpu-a07:19242", 4242) + user, "node": "1"}]
    assert "job 4242 (restart 0), node 1 of 2" in done.stderr


@pytest.mark.parametrize("variables, nproc, endpoint", [
    (dict(SLURM_GPUS_ON_NODE=4, FAKE_GPUS=8), 4, "gpu-a07:15077"),  # what slurm allocated on the node
    (dict(), 1, "gpu-a07:15077"),  # no GPU: one rank per node
    (dict(GPUS_PER_NODE=2, SLURM_GPUS_ON_NODE=4, MASTER_ADDR="10.0.0.5", MASTER_PORT=29400,
          SLURM_JOB_NODELIST="unknown[1-2]"), 2, "10.0.0.5:29400"),  # overrides; scontrol not asked
])
def test_launch_defaults_and_overrides(fakes, variables, nproc, endpoint):
    env = dict(SLURM_JOB_ID=30077, SLURM_NNODES=3, SLURM_JOB_NODELIST="gpu-a[07-08]") | variables
    done, calls = dry_run(fakes, ["bash", str(SLURM / "launch.sh")], **env)
    assert done.returncode == 0, done.stderr
    assert calls[0]["argv"] == torchrun_args(3, nproc, endpoint, 30077)


def test_launch_refuses_outside_a_job_or_the_repository(fakes, tmp_path):
    done, calls = dry_run(fakes, ["bash", str(SLURM / "launch.sh")], SLURM_NNODES=2)
    assert done.returncode == 2 and "SLURM_JOB_ID is not set" in done.stderr and not calls
    done, calls = dry_run(fakes, ["bash", str(SLURM / "launch.sh")], cwd=tmp_path, SLURM_JOB_ID=1, SLURM_NNODES=1)
    assert done.returncode == 2 and "run from the repository root" in done.stderr and not calls


def sbatch_options(path) -> list[str]:
    """The #SBATCH options slurm reads: those before the first command."""
    lines = path.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:]), "slurm ignores these"
    return [line.split()[1] for line in lines[:first_command] if line.startswith("#SBATCH")]


def stage_overrides(fakes, stage, *user, **variables) -> list[str]:
    """What train.py gets on every node when slurm runs ``sbatch <stage>.sbatch *user``: slurm runs a
    copy of the file from its spool directory, in the submission directory."""
    spool = fakes.parent / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(SLURM / f"{stage}.sbatch", spool / "slurm_script")
    done, calls = dry_run(fakes, ["bash", str(spool / "slurm_script"), *user], cwd=spool,
                          SLURM_SUBMIT_DIR=REPO, SLURM_JOB_ID=777, SLURM_NNODES=2, FAKE_NNODES=2,
                          SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_CPUS_ON_NODE=96, **variables)
    assert done.returncode == 0, done.stderr
    assert sorted(c["node"] for c in calls) == ["0", "1"] and calls[0]["argv"] == calls[1]["argv"]
    argv = calls[0]["argv"]
    return argv[argv.index("train.py") + 1:]


@pytest.mark.parametrize("stage", STAGES)
def test_sbatch_files_pass_their_stage_and_the_users_overrides(fakes, stage):
    options = sbatch_options(SLURM / f"{stage}.sbatch")
    for option in [f"--job-name={stage}", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal=USR1@120",
                   "--requeue", "--open-mode=append", "--output=logs/%x-%j.out"]:
        assert option in options
    user = ["model.archive=/ckpt/sft/LATEST", "lr=3e-6", "resume=false"]
    overrides = stage_overrides(fakes, stage, *user)
    assert overrides[0] == "resume=true" and f"loss={stage}" in overrides and overrides[-3:] == user
    srun_args = (fakes.parent / "srun-args").read_text().split()
    assert srun_args == ["--kill-on-bad-exit=1", "--cpus-per-task=96"]
    if (REPO / "config" / "loss" / f"{stage}.yaml").exists():  # loss=ppo: once it exists
        cfg = make_cfg(*overrides)  # a valid config, where the user's values won
        assert (cfg.loss.name, cfg.model.name, cfg.model.archive, cfg.lr, cfg.resume) == \
               (stage, "llama3_8b", "/ckpt/sft/LATEST", 3e-6, False)


FAKE_TRAIN = """import os, signal, sys, time
def on_usr1(signum, frame):
    time.sleep(1)  # a checkpoint takes a while: torchrun waits for it
    open(f"usr1-rank{os.environ['RANK']}", "w").write(os.environ["TORCHELASTIC_RUN_ID"] + " " + " ".join(sys.argv[1:]))
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
open(f"ready-rank{os.environ['RANK']}", "w").close()
agent = os.getppid()
while os.getppid() == agent:  # no orphans if torchrun dies
    time.sleep(0.1)
"""


def test_slurm_warning_signal_reaches_every_rank(fakes, tmp_path):
    """slurm signals the step's task (torchrun, which launch.sh execs); torchrun passes SIGUSR1 on
    to its ranks instead of dying of it, and gives them time to checkpoint."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(FAKE_TRAIN)
    env = env_with(fakes, PY=sys.executable, SLURM_JOB_ID=99, SLURM_NNODES=1, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=free_port(), GPUS_PER_NODE=2, OMP_NUM_THREADS=1)
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", str(SLURM / "launch.sh"), "x=1"], cwd=work, env=env,
                               start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not all((work / f"ready-rank{r}").exists() for r in range(2)):
            assert job.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        os.kill(job.pid, signal.SIGUSR1)  # the torchrun agent itself: launch.sh exec'd it
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    for r in range(2):  # written before torchrun exited: it waited for the ranks
        assert (work / f"usr1-rank{r}").exists(), log.read_text()
        assert (work / f"usr1-rank{r}").read_text() == "99 resume=true x=1"


def test_two_nodes_under_srun_train_what_one_node_with_two_ranks_trains(fakes, tmp_path):
    """The real sft.sbatch body on two "nodes" of this host: two torchrun agents, one rank each,
    meet through c10d rendezvous at MASTER_ADDR and train one 2-rank job."""
    job_id = 5151
    test_overrides = ["model=tiny", "datasets=[toy_add]", *fast_overrides(tmp_path / "runs" / "${run_id:}")]
    env = env_with(fakes, PY=sys.executable, SLURM_JOB_ID=job_id, SLURM_NNODES=2, FAKE_NNODES=2,
                   SLURM_JOB_NODELIST="node[0-1]", MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
                   GPUS_PER_NODE=1, OMP_NUM_THREADS=1)
    job = subprocess.Popen(["bash", str(SLURM / "sft.sbatch"), *test_overrides], cwd=REPO, env=env,
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out
    assert "node 0 of 2" in out and "node 1 of 2" in out
    assert "no complete checkpoint: starting fresh" in out  # resume=true, and nothing to resume yet

    # both nodes made run_dir from the job id: a requeued job (same id) finds its checkpoints there
    run_dir = tmp_path / "runs" / str(job_id)
    assert list((tmp_path / "runs").iterdir()) == [run_dir]
    final = run_dir / "step-6"
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    assert {p.name for p in final.glob("*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}

    # the same config (the overrides the sbatch file gave train.py) on one node, 2 forked ranks
    given = stage_overrides(fakes, "sft", *test_overrides)
    reference = tmp_path / "reference"
    run_ranks(train_run, 2, tmp_path, [*given, f"run_dir={reference}"])
    assert_same_run(metrics(run_dir), metrics(reference))
