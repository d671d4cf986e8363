"""What a run writes about itself, on rank 0 only: ``config.yaml``, one ``metrics.jsonl`` line per
record (and wandb), the progress bar, and the completions sampled at evaluation (``samples/``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

import checkpointing
import distributed

log = logging.getLogger("train")


def means(sums: dict, name: str, step: int, why: str = "") -> dict:
    """``{name.format(k): sum / count}`` of a step's metric sums, without the metrics of nothing:
    a mean over zero tokens, pairs or samples is not 0, so it is left out and warned about."""
    out = {}
    for k, (value, count) in sums.items():
        if k in ("tokens", "padding"):
            continue
        if count > 0:
            out[name.format(k)] = value / count
        elif distributed.is_main():  # every rank has the same sums: say it once
            log.warning(f"step {step}: {name.format(k)} is a mean over nothing{why}: not logged")
    return out


class MetricsLog:
    def __init__(self, cfg):
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        self.lines = 0  # metrics.jsonl lines written: a checkpoint records it, resume truncates to it
        self.wandb = self.bar = None

    def start(self, step: int, total_steps: int):
        """Before the first step (``step`` > 0 after a resume)."""
        if not distributed.is_main():
            return
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with checkpointing.writing(self.run_dir / "config.yaml"):
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            if step == 0:  # a fresh start: what a killed run logged before its first checkpoint goes
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        if cfg.wandb.enabled:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.exp_name,
                                    dir=str(self.run_dir), mode=cfg.wandb.mode,
                                    config=OmegaConf.to_container(cfg, resolve=True), id=cfg.wandb.id, resume="allow")
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=step, desc=cfg.exp_name, dynamic_ncols=True,
                        mininterval=1 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s

    def log(self, record: dict, step: int, examples: int, tokens: int):
        if not distributed.is_main():
            return
        record = {"step": step, "examples": examples, "tokens": tokens, **record}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with checkpointing.writing(self.run_dir / "metrics.jsonl"), open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def stepped(self, record: dict):
        """The progress bar after a step."""
        if self.bar is not None:
            self.bar.update(1)
            # refresh=False: the bar redraws at its own interval (30 s into a log file), not every step
            self.bar.set_postfix(loss=f"{record.get('loss/train', float('nan')):.4f}", refresh=False)

    def samples(self, rows: list[dict], step: int):
        """``run_dir/samples/step-<N>.jsonl`` and a wandb table of what the model generated."""
        if not distributed.is_main():
            return
        checkpointing.write_jsonl(self.run_dir / "samples" / f"step-{step}.jsonl", rows)
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["prompt", "completion"],
                                data=[[r["prompt"][-1]["content"], r["completion"]] for r in rows])
            self.wandb.log({"eval/samples": table}, step=step)

    def truncate(self, lines: int, checkpoint: Path):
        """Resume: drop what a killed run logged after its last checkpoint (``lines`` then)."""
        self.lines = lines
        if not distributed.is_main():
            return
        path = self.run_dir / "metrics.jsonl"
        with checkpointing.writing(path):
            had = checkpointing.truncate_jsonl(path, lines)
        if had < lines:
            log.warning(f"{path} has {had} lines, {lines} when {checkpoint} was written: the lines of steps it lost "
                        f"are not written again")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
