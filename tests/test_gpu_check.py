"""scripts/gpu_check.sh in its smoke mode (a tiny model, float32, gloo on CPU): the GPU check that a
session with a GPU runs as is cannot rot, and runs without the packages that GPU machine lacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not on the device tool's H200 machine (shared/PLATFORM.md), but installed here: hidden from the
# import system in every process of the check (torchrun's ranks inherit PYTHONPATH). flash_attn is
# absent here anyway.
ABSENT = ("datasets", "wandb", "vllm")
HIDE = f"""import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec


def find_spec(name, path=None, target=None):
    return None if name.partition(".")[0] in {ABSENT!r} else _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)  # also called on instances
"""


def test_gpu_check_smoke_runs_every_part_without_the_packages_the_gpu_machine_lacks(tmp_path):
    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(absent), os.environ.get("PYTHONPATH")]))}
    report_file = tmp_path / "gpu_check.json"
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--out", str(report_file)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["passed"] and report["environment"]["flash_attn"] is False

    assert [(r["attention"], r["dtype"]) for r in report["packing"]] == [("sdpa", "float32"), ("sdpa", "bfloat16")]
    fp32, bf16 = report["packing"]
    assert fp32["max_diff_full"] < 1e-4 and fp32["max_diff_chunked"] < 1e-4
    assert 0 < bf16["alone_vs_fp32"] and bf16["max_diff_full"] <= bf16["tolerance"]
    for stage in ("sft", "dpo", "grpo"):
        run = report["runs"][stage]
        assert run["steps"] == 2, stage
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1, stage
        assert run["peak_memory_gib"] > 0 and run["estimate"]["total_gib"] > 0, (stage, run["estimate"])
    assert "| sdpa | float32 |" in out.stdout and "| grpo | 2 |" in out.stdout
