"""Every command of README.md and of the docs pages runs as written (with only its sizes shrunk), in
the pages' order (``check_readme.PAGES``), each reading what the earlier ones wrote: the docs cannot
drift from the code again. Every docs page is in that order, and every relative link resolves."""

import json
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import check_readme  # noqa: E402

COMMANDS = check_readme.all_commands()


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
    assert all(c.startswith(("bash scripts/setup.sh", "source", "sbatch", "bash scripts/demo_agents.sh",
                                 "bash scripts/compare_objectives", "python -m vllm.entrypoints.openai.api_server"))
               or "/path/to/" in c or "scripts/bench_real.py" in c or "scripts/bench_async.py" in c
               for c in skipped), skipped
    assert len(COMMANDS) == len(set(COMMANDS))  # a command repeated on a later page runs once


def test_every_docs_page_is_in_the_checked_order():
    """A new docs page cannot escape the command check: every docs/*.md is in ``DOCS`` (and each
    listed page exists), and README.md comes first."""
    pages = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))
    assert sorted(check_readme.DOCS) == pages
    assert len(set(check_readme.DOCS)) == len(check_readme.DOCS)
    assert check_readme.PAGES[0] == "README.md"


def writes(command: str) -> list[str]:
    return re.findall(r"(?:\brun_dir=|--out )(runs/readme/\S+)", command)


def test_each_command_comes_after_what_it_reads():
    """The order of the pages keeps the chain: a command that reads ``runs/readme/<x>`` (an archive,
    a reward model, a samples file) comes after the command that writes it. Checked without running
    anything, so a reordering of ``DOCS`` fails here in a second, not minutes into the run."""
    written = []
    for command in COMMANDS:
        if check_readme.skip_reason(command):
            continue
        own = writes(command)
        for path in re.findall(r"runs/readme/[\w./-]+", command):
            if path not in own:
                assert any(path == w or path.startswith(w + "/") for w in written), (path, command)
        written += own
    assert "runs/readme/sft" in written and "runs/readme/samples.jsonl" in written


def markdown_pages():
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen, found = {}, set()
    for line in text.splitlines():
        m = re.match(r"#+ (.*)", line)
        if m:
            a = anchor(m.group(1))
            found.add(a if a not in seen else f"{a}-{seen[a]}")
            seen[a] = seen.get(a, 0) + 1
    return found


def links(text: str) -> list[str]:
    """The targets of the markdown links of a page, outside code blocks and code spans."""
    prose = [line for line in text.splitlines() if not line.startswith("    ")]
    return re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", "\n".join(prose)))


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files(page):
    """Every relative link of README.md and docs/*.md names a file that exists, and a link to a
    heading (``page.md#heading``) names a heading of that page."""
    found = links(page.read_text())
    if page.name == "README.md":
        assert {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} <= set(found)  # links to every page
    for target in found:
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(REPO)}: {target} does not exist"
        if fragment and file.suffix == ".md":
            assert fragment in anchors(file.read_text()), f"{page.relative_to(REPO)}: no heading #{fragment} in {path or page.name}"


def test_the_readme_stage_table_commands_are_checked():
    """The landing page's table of stages shows one command each as inline code; each is a command
    some page runs (or lists as skipped), verbatim, so the table is tested too."""
    table = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("|")]
    shown = [c for line in table for c in re.findall(r"`([^`]+)`", line)
             if c.split(" ", 1)[0] in check_readme.PROGRAMS]
    assert len(shown) >= 8, shown
    for command in shown:
        assert command in COMMANDS, command


def test_every_readme_command_runs_as_written(tmp_path, request):
    """docs/judges.md's commands ask conftest.judge_server in place of the address they show."""
    try:
        judge = request.getfixturevalue("judge_server")
    except pytest.skip.Exception:  # no vLLM here: the commands that need a judge server are skipped
        judge = None
    cwd = check_readme.scratch_tree(tmp_path)
    results = check_readme.run(COMMANDS, cwd, quick_mode=True, timeout=600, judge=judge)
    failed = [r for r in results if r["status"] == "failed"]
    assert not failed, f"{failed[0]['ran']}\n{failed[0]['output_tail']}"
    assert len([r for r in results if r["status"] == "ok"]) == len([c for c in COMMANDS if not check_readme.skip_reason(c)
                                                                     and (judge or check_readme.JUDGE_ADDRESS not in c)])
    # the chain: each stage's output exists where the next stage reads it
    for stage in ("sft", "rm", "dpo", "ppo", "grpo", "odpo", "raft", "rm_ai", "dpo_ai", "odpo_self",
                  *(("grpo_judge", "odpo_judge") if judge else ())):
        assert (cwd / "runs" / "readme" / stage / "LATEST" / "config.json").exists(), stage
    log = (cwd / "runs" / "readme" / "sft" / "train.log").read_text()
    assert "saved runs/readme/sft/step-" in log and ".tmp" not in log  # messages name final paths only
    samples = [json.loads(line) for line in (cwd / "runs" / "readme" / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(8)) and all(len(s["completions"]) == 4 for s in samples)
    assert (cwd / "runs" / "readme" / "labeled.jsonl").read_text().strip()
    if judge:
        assert (cwd / "runs" / "readme" / "judged.jsonl").read_text().strip()
        judged = [json.loads(line) for line in (cwd / "runs" / "readme" / "grpo_judge" / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("judge/requests", 0) > 0 and r["judge/errors"] == 0 for r in judged)
    for bench in ("bench_sft.json", "bench_dpo.json", "bench_ppo.json", "memory_estimate.json"):
        assert json.loads((cwd / bench).read_text()), bench


@pytest.mark.parametrize("command", [c for c in COMMANDS if "train.py" in c and not check_readme.skip_reason(c)])
def test_readme_training_commands_pass_their_lr(command):
    """lr's default (5e-7, the DPO repo's for 7B models) barely moves a tiny model: every training
    command of the README says what it uses."""
    assert " lr=" in command
