"""Greedy task accuracy of a model on a toy task's held-out prompts.

    python scripts/eval_task.py --model /tmp/sft/LATEST --task toy_add [--n 200]
    python scripts/eval_task.py --model tiny --task toy_add     # the untrained random init
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
from evaluation import task_accuracy  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an HF directory, or a name in config/model (random init)")
    parser.add_argument("--task", default="toy_add")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init (as train.py's seed)")
    parser.add_argument("--label", default=None, help="name printed with the result")
    args = parser.parse_args()
    config_file = models.REPO / "config" / "model" / f"{args.model}.yaml"
    model_cfg = OmegaConf.load(config_file) if config_file.exists() else OmegaConf.create({"name_or_path": args.model})
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = models.load_model(model_cfg, torch.device("cpu"), seed=args.seed)
    tokenizer = models.load_tokenizer(model_cfg)
    rows = load_rows(f"{args.task}_prompts", "test", "prompt")[: args.n]
    acc = task_accuracy(model, tokenizer, rows, REWARDS[args.task])
    print(json.dumps({"model": args.label or args.model, "task": args.task, "n": len(rows), "accuracy": acc}))


if __name__ == "__main__":
    main()
