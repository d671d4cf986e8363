"""Every command of README.md runs as written (with only its sizes shrunk), in the README's order,
each reading what the earlier ones wrote: the docs cannot drift from the code again."""

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import check_readme  # noqa: E402

COMMANDS = check_readme.commands((REPO / "README.md").read_text())


def test_commands_are_found_whole_and_in_order():
    """The extraction itself: continuations joined, list-indented blocks found, comments cut, and
    only the listed kinds of command left unrun."""
    text = ("Prose with `torchrun` in it.\n\n    torchrun --nproc_per_node 2 train.py a=1 \\\n        b=2   # note\n"
            "    python scripts/eval_task.py --n 3\n\n- a list item:\n\n      torchrun x.py --k 4\n\n"
            "    {\"model\": \"untrained\"}\n")
    assert check_readme.commands(text) == ["torchrun --nproc_per_node 2 train.py a=1 b=2",
                                           "python scripts/eval_task.py --n 3", "torchrun x.py --k 4"]
    assert check_readme.quick("torchrun --nproc_per_node 2 train.py loss=grpo lr=1") .endswith("loss.sampling.max_new_tokens=8")
    run = [c for c in COMMANDS if not check_readme.skip_reason(c)]
    programs = {check_readme.program(c) for c in run}
    assert {"train.py", "scripts/generate.py", "scripts/label_preferences.py", "scripts/eval_task.py",
            "scripts/bench_sft.py", "scripts/bench_dpo.py", "scripts/bench_ppo.py"} <= programs
    losses = {c.split("loss=")[1].split()[0] for c in run if "train.py" in c}
    assert losses == {"sft", "rm", "dpo", "ppo", "grpo", "online_dpo", "raft"}
    skipped = [c for c in COMMANDS if check_readme.skip_reason(c)]
    assert all(c.startswith(("bash scripts/setup.sh", "source", "sbatch")) or "/path/to/" in c
               or "scripts/bench_real.py" in c for c in skipped), skipped


def test_every_readme_command_runs_as_written(tmp_path):
    cwd = check_readme.scratch_tree(tmp_path)
    results = check_readme.run(COMMANDS, cwd, quick_mode=True, timeout=600)
    failed = [r for r in results if r["status"] == "failed"]
    assert not failed, f"{failed[0]['ran']}\n{failed[0]['output_tail']}"
    assert len([r for r in results if r["status"] == "ok"]) == len([c for c in COMMANDS if not check_readme.skip_reason(c)])
    # the chain: each stage's output exists where the next stage reads it
    for stage in ("sft", "rm", "dpo", "ppo", "grpo", "odpo", "raft", "rm_ai", "dpo_ai"):
        assert (cwd / "runs" / "readme" / stage / "LATEST" / "config.json").exists(), stage
    log = (cwd / "runs" / "readme" / "sft" / "train.log").read_text()
    assert "saved runs/readme/sft/step-" in log and ".tmp" not in log  # messages name final paths only
    samples = [json.loads(line) for line in (cwd / "runs" / "readme" / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(8)) and all(len(s["completions"]) == 4 for s in samples)
    assert (cwd / "runs" / "readme" / "labeled.jsonl").read_text().strip()
    for bench in ("bench_sft.json", "bench_dpo.json", "bench_ppo.json", "memory_estimate.json"):
        assert json.loads((cwd / bench).read_text()), bench


@pytest.mark.parametrize("command", [c for c in COMMANDS if "train.py" in c and not check_readme.skip_reason(c)])
def test_readme_training_commands_pass_their_lr(command):
    """lr's default (5e-7, the DPO repo's for 7B models) barely moves a tiny model: every training
    command of the README says what it uses."""
    assert " lr=" in command
