"""The project's functions one training step crosses: what a reader opens to follow it.

    python scripts/trace_calls.py loss=grpo [more overrides] [--list]

Builds the trainer ``loss=`` names on the tiny model (one process, the HF sampler, toy data),
runs its first step under ``sys.setprofile`` and prints, per file of this repository, how many of
its named functions (and methods) were entered, and their total; ``--list`` names them. Only this
repository's files count (not torch, transformers or vLLM); construction is not counted, only
``train_step``. Writes the table as JSON to ``trace_calls.json``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOY = {"grpo": ["datasets=[toy_add_prompts]", "reward.functions=[toy_add]"],
       "ppo": ["datasets=[toy_add_prompts]", "reward.functions=[toy_add]", "loss.critic_init=policy"],
       "rloo": ["datasets=[toy_add_prompts]", "reward.functions=[toy_add]"],
       "reinforce_pp": ["datasets=[toy_add_prompts]", "reward.functions=[toy_add]"],
       "dpo": ["datasets=[toy_add_pref]"], "sft": ["datasets=[toy_add]"]}


def trace(overrides: list[str]) -> dict[str, list[str]]:
    from hydra import compose, initialize_config_dir

    import distributed
    from trainers import TRAINERS

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    loss = next(o.split("=", 1)[1] for o in overrides if o.startswith("loss="))
    sizes = ["model=tiny", "sampler=hf", "batch_size=4", "n_examples=8", "n_eval_examples=0", "max_length=48",
             "max_prompt_length=24", "eval_at_start=false", f"run_dir={tempfile.mkdtemp()}"]
    if loss not in ("sft", "dpo", "rm"):
        sizes += ["loss.rollout_batch_size=4", "loss.n_samples_per_prompt=2", "loss.sampling.max_new_tokens=8"]
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        cfg = compose(config_name="config", overrides=TOY.get(loss, []) + sizes + overrides)
    device = distributed.init()
    trainer = TRAINERS[cfg.loss.trainer](cfg, device)
    trainer.model.train()
    seen = collections.defaultdict(set)
    root = str(REPO) + os.sep

    def profile(frame, event, arg):
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(root) and not any(f"/{d}/" in path for d in ("scripts", "tests", ".venv")):
                name = frame.f_code.co_qualname
                if not name.endswith(">"):  # comprehensions and lambdas are read where they stand
                    seen[os.path.relpath(path, REPO)].add(name)

    sys.setprofile(profile)
    try:
        trainer.train_step()
    finally:
        sys.setprofile(None)
    if trainer.sampler is not None:
        trainer.sampler.close()
    distributed.close()
    return {path: sorted(names) for path, names in sorted(seen.items(), key=lambda kv: -len(kv[1]))}


def main():
    args = [a for a in sys.argv[1:] if a != "--list"]
    found = trace(args)
    total = sum(len(v) for v in found.values())
    print(f"{' '.join(args)}: {total} functions in {len(found)} files")
    for path, names in found.items():
        print(f"  {len(names):3d}  {path}" + (f": {', '.join(names)}" if "--list" in sys.argv else ""))
    Path("trace_calls.json").write_text(json.dumps({"overrides": args, "total": total, "files": found}, indent=1))


if __name__ == "__main__":
    main()
