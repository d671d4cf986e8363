"""Greedy task accuracy of a model on a toy task's held-out prompts.

    python scripts/eval_task.py --model runs/readme/sft/LATEST --task toy_add [--n 200]
    python scripts/eval_task.py --model tiny --task toy_add     # the untrained random init
    python scripts/eval_task.py --model runs/readme/grpo/LATEST --against runs/readme/sft/LATEST --task toy_sort --n 500

A multi-turn task (``toy_calc``, ``toy_guess``: data/toy_env.py) plays greedy episodes against its
environment instead: an episode scores 1 when the environment reports it ``solved``; the
environment's other ``info`` (the calculator's ``tool_calls``) is averaged over all episodes and
over the solved ones.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import models  # noqa: E402
from data import load_rows  # noqa: E402
from data.toy import REWARDS  # noqa: E402
from data.toy_env import TASK_ENVIRONMENTS  # noqa: E402
from evaluation import episode_scores, paired_comparison, task_scores  # noqa: E402

EPISODE_TOKENS = 512  # of an episode, prompt included (its replies are at most 16 tokens each)


def scores(name: str, rows: list[dict], task: str, seed: int, max_turns: int, timeout_s: float) -> tuple[list[float], dict]:
    """Each row's 0/1 score; for a multi-turn task also the environment's info averaged."""
    config_file = models.REPO / "config" / "model" / f"{name}.yaml"
    model_cfg = OmegaConf.load(config_file) if config_file.exists() else OmegaConf.create({"name_or_path": name})
    model = models.load_model(model_cfg, torch.device("cpu"), seed=seed)
    tokenizer = models.load_tokenizer(model_cfg)
    if task in TASK_ENVIRONMENTS:
        return episode_scores(model, tokenizer, rows, TASK_ENVIRONMENTS[task], max_turns, EPISODE_TOKENS,
                              timeout_s)
    return task_scores(model, tokenizer, rows, REWARDS[task]), {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an HF directory, or a name in config/model (random init)")
    parser.add_argument("--against", default=None, help="a second model: also print prompts fixed and broken, McNemar's z")
    parser.add_argument("--task", default="toy_add")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (as train.py's seed)")
    parser.add_argument("--label", default=None, help="name printed with the result")
    parser.add_argument("--max-turns", type=int, default=4, help="a multi-turn task's replies per episode (max_turns)")
    parser.add_argument("--env-timeout-s", type=float, default=30.0,
                        help="an environment call slower than this fails its episode (env_timeout_s)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = load_rows(f"{args.task}_prompts", "test", "prompt")[: args.n]
    after, info = scores(args.model, rows, args.task, args.seed, args.max_turns, args.env_timeout_s)
    result = {"model": args.label or args.model, "task": args.task, "n": len(rows), "accuracy": sum(after) / len(rows),
              **info}
    if args.against:
        before, _ = scores(args.against, rows, args.task, args.seed, args.max_turns, args.env_timeout_s)
        result.update({"against": args.against, "against_accuracy": sum(before) / len(rows),
                       **paired_comparison(before, after)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
