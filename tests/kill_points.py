"""Kill points: a real run (``train.main`` in ranks forked by ``conftest.run_ranks``) that records
every moment it writes into run_dir and can SIGKILL all its ranks at once at one of them, as the
OOM killer or a lost node ends a job: in the middle of a step, between a checkpoint's shards and
its manifest, between the checkpoint's rename and the LATEST export, inside the export.

A moment is ``(step, event, k)``: the k-th ``event`` while the trainer's step counter reads
``step``. A resumed run passes through the same moments as the uninterrupted run from its
checkpoint on, so a moment recorded in an uninterrupted run names a place in any run of that config.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch.multiprocessing as mp

from conftest import make_cfg, run_ranks

# written by the clock or by how much memory the process grew to, not by what the run computed
WALL_CLOCK = ("tokens_per_s", "samples_per_s", "memory/peak_gb")


class _Probe:
    def __init__(self, rank: int, at, do: str, pid_dir: Path):
        self.rank, self.at, self.do, self.pid_dir = rank, at, do, Path(pid_dir)
        self.trainer, self.trace, self.counts = None, [], Counter()

    def event(self, name: str):
        if self.trainer is None:
            return
        key = (self.trainer.step, name)
        moment = (*key, self.counts[key])
        self.counts[key] += 1
        self.trace.append(moment)
        if self.at is not None and (self.rank, *moment) == tuple(self.at):
            ACTIONS[self.do](self)

    def pids(self) -> list[int]:
        return [int(f.read_text()) for f in sorted(self.pid_dir.glob("rank*"))]  # (sampler ranks too)

    def signal_all(self, sig):
        for pid in self.pids():  # every rank at once; this one last
            if pid != os.getpid():
                os.kill(pid, sig)
        os.kill(os.getpid(), sig)


def _fill_disk(probe: _Probe):
    """From now on this rank cannot write past 4 KiB into any file, as on a full disk (the OS
    error is EFBIG, not ENOSPC, but it reaches the code the same way). Notes first the size and
    modification time of every file of the run's checkpoints, which must stay as they are."""
    import checkpointing

    files = {str(f): [f.stat().st_size, f.stat().st_mtime_ns]
             for ckpt in checkpointing.complete(probe.trainer.run_dir) for f in sorted(ckpt.iterdir())}
    (probe.pid_dir / "before-full-disk.json").write_text(json.dumps(files))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _sigint_twice(probe: _Probe):
    probe.signal_all(signal.SIGINT)
    time.sleep(1.5)  # a person pressing Ctrl-C again, not the same signal delivered twice
    probe.signal_all(signal.SIGINT)


def _twice(sig):
    def send(probe: _Probe):
        probe.signal_all(sig)  # from slurm, which signals every process of the step
        probe.signal_all(sig)  # and from torchrun, which forwards what it got
    return send


ACTIONS = {
    "kill": lambda probe: probe.signal_all(signal.SIGKILL),  # the OOM killer, a lost node, kill -9 of the job
    "sigint": lambda probe: probe.signal_all(signal.SIGINT),  # Ctrl-C on torchrun, which forwards it to every rank
    "sigint_twice": _sigint_twice,
    "usr1_twice": _twice(signal.SIGUSR1),  # slurm's warning before the time limit
    "term_twice": _twice(signal.SIGTERM),  # scancel, preemption
    "fill_disk": _fill_disk,
}


def _around(owner, name: str, probe: _Probe, before: str | None = None, after: str | None = None):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            probe.event(before)
        out = real(*args, **kwargs)
        if after:
            probe.event(after)
        return out

    setattr(owner, name, wrapped)


def killable_run(rank, world, overrides, at=None, do="kill", pid_dir=None, env=None):
    """``train.main`` on ``overrides`` (with ``env`` in the environment), this rank's output in
    ``pid_dir/output-rank<N>``; with ``at=(rank, step, event, k)``, ``ACTIONS[do]`` runs when that
    rank reaches that moment. Returns this rank's moments, in order, and the exit code
    ``train.main`` raised (None if it returned)."""
    import huggingface_hub
    import pathlib

    import torch.distributed.checkpoint as dcp
    import torch

    import train
    import trainers

    pid_dir = Path(pid_dir)
    with open(pid_dir / f"output-rank{rank}", "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.environ.update(env or {})
    (pid_dir / f"rank{rank}").write_text(str(os.getpid()))
    probe = _Probe(rank, at, do, pid_dir)
    _around(os, "replace", probe, before="replace")
    _around(shutil, "rmtree", probe, before="rmtree")
    _around(dcp, "save", probe, before="dcp.save", after="dcp.saved")
    _around(torch, "save", probe, after="torch.save")
    _around(pathlib.Path, "write_text", probe, after="write_text")
    _around(huggingface_hub, "save_torch_state_dict", probe, after="safetensors")
    real_train = trainers.Trainer.train

    def train_probed(self):
        probe.trainer = self
        _around(self, "train_step", probe, before="step")
        _around(self.metrics, "log", probe, after="metrics")
        try:
            real_train(self)
        finally:
            probe.trainer = None

    trainers.Trainer.train = train_probed
    try:
        train.main(make_cfg(*overrides))
    except SystemExit as exc:  # a user error: its one line is in the output
        return probe.trace, exc.code
    finally:
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # the disk "filled" by fill_disk is freed
    return probe.trace, None


@dataclass
class Run:
    traces: list | None  # each rank's moments; None if a rank died of a signal
    codes: list | None  # the exit code each rank's train.main raised (None: it returned)
    died_of: str | None  # the signal the first rank to die died of
    output: list[str]  # each rank's stdout and stderr


def run(tmp_path, overrides, at=None, do="kill", env=None, world=2) -> Run:
    """``killable_run`` in ``world`` forked ranks."""
    pid_dir = tmp_path / "pids"
    shutil.rmtree(pid_dir, ignore_errors=True)
    pid_dir.mkdir()
    try:
        results = run_ranks(killable_run, world, tmp_path, overrides, at, do, pid_dir, env)
        traces, codes, died_of = [r[0] for r in results], [r[1] for r in results], None
    except mp.ProcessExitedException as exc:
        assert at is not None and exc.signal_name, exc  # only a run told to may die
        traces, codes, died_of = None, None, exc.signal_name
    output = [(pid_dir / f"output-rank{r}").read_text() for r in range(world)]
    return Run(traces, codes, died_of, output)


def killed(tmp_path, overrides, at) -> bool:
    """Whether a ``run`` SIGKILLed at moment ``at`` died there (and not of anything else)."""
    return run(tmp_path, overrides, at).died_of == "SIGKILL"


def choose(traces: list, rng, n: int, forced=()) -> list:
    """``forced`` moments plus ``n`` drawn with ``rng`` from the ranks' ``traces`` (as
    ``(rank, step, event, k)``), at most one per step, in the order a run meets them. Drawn as a
    step, a rank, an event and then which of its occurrences, so the many small writes inside a
    checkpoint's shards do not crowd out the rest. A run resumed after a kill at step s starts
    from a checkpoint at or before s, so it meets every moment of a later step."""
    moments = {}
    for r, trace in enumerate(traces):
        for step, event, k in trace:
            moments.setdefault(step, {}).setdefault((r, event), []).append(k)
    steps = sorted(set(moments) - {m[1] for m in forced})
    chosen = []
    for step in sorted(rng.sample(steps, n)):
        r, event = rng.choice(sorted(moments[step]))
        chosen.append((r, step, event, rng.choice(moments[step][(r, event)])))
    return sorted([*forced, *chosen], key=lambda m: m[1])


def outcome(run_dir: Path) -> dict:
    """What a run leaves that must not depend on how often it was killed: metrics.jsonl line by
    line (the wall-clock fields aside), every byte of LATEST/, the checkpoints kept, and the
    names in run_dir (no ``.tmp`` or ``.old`` left behind)."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.append({k: v for k, v in record.items() if not k.startswith("timing/") and k not in WALL_CLOCK})
    latest = run_dir / "LATEST"
    return {"metrics": records,
            "LATEST": {str(p.relative_to(latest)): p.read_bytes() for p in sorted(latest.rglob("*")) if p.is_file()},
            "checkpoints": sorted(p.name for p in run_dir.glob("step-*")),
            "names": sorted(p.name for p in run_dir.iterdir() if p.name not in ("train.log", "lock"))}


def small_datasets(directory: Path) -> dict[str, Path]:
    """toy_add in 200 rows of each shape as local files (190 train, 10 test): a run tokenizes in
    milliseconds what would take seconds for the registry's 9,000."""
    from data import toy

    rows = {"sft": toy.sft_rows, "pref": toy.pref_rows, "prompt": toy.prompt_rows}
    paths = {}
    for shape, make in rows.items():
        paths[shape] = directory / f"toy_add_{shape}.jsonl"
        paths[shape].write_text("".join(json.dumps(r) + "\n" for r in make("add", "train")[:200]))
    return paths
