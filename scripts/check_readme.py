"""Run every command of README.md and of the docs pages as written, in order, and say what each did.

    python scripts/check_readme.py [--quick] [--only PATTERN] [--out readme_commands.json]

The pages are read in a fixed order, README.md then ``DOCS``, chosen so that a command comes after
the ones that write what it reads (``runs/readme/sft`` before the stages that start from it); a
command repeated verbatim on a later page (the README's real-model command, also in
docs/training.md) runs once, where it first appears. A command is a line of an indented code
block that starts with a program (``torchrun``, ``python``, ``.venv/bin/python``, ``bash``,
``mkdir``, ...), joined with its ``\\`` continuations.
They run from a scratch directory of symlinks to this repository (so their ``runs/readme/`` goes
there, not into your checkout), with ``.venv/bin`` first on PATH as ``source .venv/bin/activate``
would put it. ``--quick`` appends size overrides only (fewer examples, iterations, tokens; see
``QUICK``), which ``tests/test_readme.py`` uses; without it each runs exactly as printed.
Commands that cannot run here are listed with the reason (``SKIP``); anything else that fails
stops the check. Prints one line per command and writes the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The docs pages, in the order their commands run (after README.md's): a page whose commands read
# runs/readme/<x> comes after the page that writes it (training -> preference -> rl -> ai-feedback).
# tests/test_readme.py fails on a docs/*.md missing from this list.
DOCS = [
    "docs/demos.md",
    "docs/training.md",
    "docs/run-integrity.md",
    "docs/multi-node.md",
    "docs/preference.md",
    "docs/lora.md",
    "docs/rl.md",
    "docs/environments.md",
    "docs/ai-feedback.md",
    "docs/judges.md",
    "docs/benchmarks.md",
    "docs/memory.md",
    "docs/design.md",
]
PAGES = ["README.md", *DOCS]
PROGRAMS = ("torchrun", "python", ".venv/bin/python", "bash", "mkdir", "source", "sbatch")

# (what a command starts with or contains, why this check does not run it)
SKIP = [
    ("bash scripts/setup.sh", "the two commands: CI runs the test one on a fresh checkout; the demos take 8-15 minutes"),
    ("scripts/bench_real.py", "7 minutes on the real model"),
    ("scripts/compare_objectives.sh", "about 20 minutes: four RL runs of the demo's size"),
    ("scripts/compare_objectives_real.sh", "about 25 minutes: three RL runs of the real-model demo's size"),
    ("scripts/bench_async.py", "about 15 minutes: eight timed RL runs, four on the real model; "
                               "tests/test_async_rl.py runs the layouts"),
    ("source .venv/bin/activate", "shell set-up: the check puts .venv/bin first on PATH instead"),
    ("scripts/demo_agents.sh", "the multi-turn demo, 10 minutes: tests/test_environments.py and "
                               "tests/test_real_model.py train env= episodes"),
    ("sbatch", "needs slurm: tests/test_slurm_launch.py runs the sbatch files under a fake slurm"),
    ("/path/to/", "a template for your own weights"),
    ("vllm.entrypoints.openai.api_server", "a server, up until stopped: tests start it as conftest.judge_server"),
]
# the judge server's address in the docs (vllm serve's default port); run() points it at the one
# it is given (tests/test_readme.py: conftest.judge_server) and skips commands that need one without
JUDGE_ADDRESS = "http://127.0.0.1:8000/v1"

# size overrides appended in --quick mode, by program (and for train.py by the kind of loss)
RL_LOSSES = ("ppo", "grpo", "rloo", "reinforce_pp", "raft", "online_dpo")
QUICK = {
    "train.py": ["n_examples=32", "batch_size=16", "n_eval_examples=8", "eval_every=1000000"],
    "train.py:rl": ["loss.rollout_batch_size=8", "n_examples=8", "batch_size=8", "n_eval_examples=4",
                    "eval_every=1000000", "loss.sampling.max_new_tokens=8"],
    "scripts/generate.py": ["--n-prompts", "8", "--max-new-tokens", "12"],
    "scripts/eval_task.py": ["--n", "8"],
    "scripts/bench_lora_sync.py": ["--model", "tiny", "--iters", "2", "--prompts", "4", "--max-new-tokens", "8"],
    "scripts/bench_sft.py": ["--steps", "4", "--batch-size", "8", "--max-length", "128", "--only", "packed+qlora"],
    # one configuration each: the others differ by overrides that other tests run
    "scripts/bench_dpo.py": ["--steps", "4", "--batch-size", "4", "--max-length", "128", "--only", "packed, precomputed"],
    "scripts/bench_ppo.py": ["--iterations", "2", "--prompts", "4", "--n", "2", "--max-new-tokens", "8",
                             "--only", "grpo, vllm"],
}


def commands(readme: str) -> list[str]:
    """The README's commands, in order, each joined from its continuation lines."""
    found, lines = [], readme.splitlines()
    for i, line in enumerate(lines):
        code = line.strip()  # code blocks are indented by 4, or 6 inside a list item
        continued = i > 0 and lines[i - 1].endswith("\\")
        if not (line.startswith("    ") and code.split(" ", 1)[0] in PROGRAMS) or continued:
            continue
        command, j = code, i
        while command.endswith("\\"):
            j += 1
            command = command[:-1].rstrip() + " " + lines[j].strip()
        found.append(re.sub(r"\s+#.*$", "", command))  # a trailing shell comment
    return found


def all_commands(root: Path = REPO) -> list[str]:
    """The commands of every page in ``PAGES`` order, each once (where it first appears)."""
    found = [c for page in PAGES for c in commands((root / page).read_text())]
    return list(dict.fromkeys(found))


def skip_reason(command: str) -> str | None:
    for marker, why in SKIP:
        if command.startswith(marker) or marker in command:
            return why
    return None


def program(command: str) -> str:
    """The script a command runs: train.py, scripts/<name>.py, or its first word."""
    for word in shlex.split(command):
        if word.endswith(".py"):
            return word
    return shlex.split(command)[0]


def quick(command: str) -> str:
    name = program(command)
    if name == "train.py":
        loss = re.search(r"\bloss=(\w+)", command)
        name = "train.py:rl" if loss and loss.group(1) in RL_LOSSES else name
    return " ".join([command, *map(shlex.quote, QUICK.get(name, []))])


def outcome(command: str, cwd: Path, output: str) -> str:
    """A short line of what the command produced: a run's first and last logged losses and its
    final eval metrics, or the last line a script printed."""
    run_dir = re.search(r"\brun_dir=(\S+)", command)
    if program(command) == "train.py" and run_dir:
        path = cwd / run_dir.group(1) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        train = [r for r in rows if "loss/train" in r]
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        said = []
        if train:
            said.append(f"loss/train {train[0]['loss/train']:.4g} -> {train[-1]['loss/train']:.4g} "
                        f"in {train[-1]['step']} steps")
        scores = [r["rollout/score_mean"] for r in rows if "rollout/score_mean" in r]
        if scores:
            said.append(f"rollout/score_mean {scores[0]:.3g} -> {scores[-1]:.3g} over {len(scores)} iterations")
        if evals:
            keep = ("eval/loss", "eval/rewards/accuracy", "eval/rewards/margin", "eval/reward", "eval/task_accuracy")
            said += [f"{k} {evals[-1][k]:.4g}" for k in keep if k in evals[-1]]
        return "; ".join(said) or "no metrics"
    printed = [line for line in output.splitlines() if line.strip()]
    return printed[-1][:300] if printed else ""


def scratch_tree(root: Path) -> Path:
    """A directory whose entries link to the repository's (all but runs/), for commands to run in."""
    for entry in REPO.iterdir():
        if entry.name not in ("runs", ".git"):
            (root / entry.name).symlink_to(entry)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(commands_: list[str], cwd: Path, quick_mode: bool, timeout: float = 1800,
        judge: str | None = None) -> list[dict]:
    env = {**os.environ, "PATH": f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(REPO / ".venv")}
    env.pop("PYTHONPATH", None)
    results = []
    for command in commands_:
        why = skip_reason(command) or (None if judge or JUDGE_ADDRESS not in command else
                                       f"needs a judge server at {JUDGE_ADDRESS} (--judge)")
        if why:
            results.append({"command": command, "status": "skipped", "why": why})
            print(f"skip  {command[:100]}  ({why})", flush=True)
            continue
        ran = (quick(command) if quick_mode else command).replace(JUDGE_ADDRESS, judge or JUDGE_ADDRESS)
        start = time.time()
        # torchrun's default port 29500 would collide with any other job on this machine
        env["PET_MASTER_PORT"] = str(free_port())
        done = subprocess.run(["bash", "-c", ran], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        seconds = round(time.time() - start, 1)
        result = {"command": command, "ran": ran, "status": "ok" if done.returncode == 0 else "failed",
                  "returncode": done.returncode, "seconds": seconds, "outcome": outcome(command, cwd, done.stdout)}
        results.append(result)
        print(f"{result['status']:5} {seconds:6.1f}s  {command[:100]}\n      -> {result['outcome']}", flush=True)
        if done.returncode != 0:
            result["output_tail"] = done.stdout[-6000:]
            break
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="append size overrides (QUICK) to every command")
    parser.add_argument("--only", default=None, help="run only the commands matching this regex")
    parser.add_argument("--keep", default=None, help="run in this directory (kept) instead of a temporary one")
    parser.add_argument("--out", default="readme_commands.json")
    parser.add_argument("--judge", default=None, help="a judge server's address for the commands that ask one "
                                                      "(docs/judges.md; else they are skipped)")
    args = parser.parse_args(argv)
    found = all_commands()
    if args.only:
        found = [c for c in found if re.search(args.only, c)]
    with tempfile.TemporaryDirectory(prefix="readme-") as tmp:
        cwd = Path(args.keep) if args.keep else Path(tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        if not (cwd / "train.py").exists():
            scratch_tree(cwd)
        results = run(found, cwd, args.quick, judge=args.judge)
    Path(args.out).write_text(json.dumps(results, indent=1))
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        print(f"FAILED: {failed[0]['command']}\n{failed[0]['output_tail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
