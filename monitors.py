"""Health monitors: cheap checks on each step's metrics that say, before a run collapses, that it
is collapsing. On by default (``monitors:`` in config.yaml). Each reads metrics the trainers log
anyway, logs its own value as ``monitor/<name>`` where it is derived, and when it crosses its
threshold writes one warning line (once per monitor, with the step and the numbers); a monitor
named in ``monitors.stop_on`` stops the run instead, with a checkpoint.

    monitor             value                                                        crosses when
    entropy_collapse    policy/entropy/train / its first value                       < entropy_collapse
    kl_growth           rise of rollout/kl per step over the last `window` steps     > kl_growth
    length_drift        rollout/response_length / its first value                   > length_drift or < 1/length_drift
    clip_fraction       policy/clipfrac/train                                        > clip_fraction
    zero_advantage      share of the rollout's samples with zero advantage (the      > zero_advantage
                        groups filter_groups dropped, and kept ones whose advantage is 0)
    sampler_mismatch    rollout/logp_mismatch (mean |pi_old - pi_sampler| per token)  > sampler_mismatch
    reward_vs_verifier  fall of eval/task_accuracy between two evals while           > reward_vs_verifier
                        rollout/score_mean rose over the same steps

Every rank computes the same (the metrics are already reduced over ranks), so every rank stops
at the same step.
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger("train")
NAMES = ("entropy_collapse", "kl_growth", "length_drift", "clip_fraction", "zero_advantage", "sampler_mismatch",
         "reward_vs_verifier")


def check_config(cfg):
    """Refuse a ``monitors.stop_on`` entry that names no monitor (it would never stop anything)."""
    unknown = [name for name in cfg.stop_on if name not in NAMES]
    if unknown:
        raise ValueError(f"monitors.stop_on={list(cfg.stop_on)}: {unknown[0]} is not a monitor; they are "
                         f"{', '.join(NAMES)}")


class Monitors:
    def __init__(self, cfg, main: bool = True):
        """``cfg``: the ``monitors:`` section; ``main``: this rank writes the warnings."""
        self.cfg, self.main = cfg, main
        self.first: dict[str, float] = {}  # the first value of the metrics a ratio is taken against
        self.kl = deque(maxlen=cfg.window + 1)
        self.scores: list[float] = []  # rollout/score_mean of the steps since the last eval
        self.last_eval: tuple[float, float] | None = None  # (accuracy, mean score before it)
        self.warned: set[str] = set()

    def values(self, record: dict) -> dict[str, tuple[float, bool, str]]:
        """{monitor: (value, crossed, what it means)} of the monitors this step's ``record`` feeds."""
        cfg, out = self.cfg, {}
        for key in ("policy/entropy/train", "rollout/response_length"):
            if key in record and key not in self.first and record[key] > 0:
                self.first[key] = record[key]
        if "policy/entropy/train" in record and "policy/entropy/train" in self.first:
            ratio = record["policy/entropy/train"] / self.first["policy/entropy/train"]
            out["entropy_collapse"] = (ratio, ratio < cfg.entropy_collapse,
                                       f"policy entropy at {ratio:.3g} of its first value "
                                       f"(< monitors.entropy_collapse={cfg.entropy_collapse})")
        if "rollout/kl" in record:
            self.kl.append(record["rollout/kl"])
            if len(self.kl) == self.kl.maxlen:
                growth = (self.kl[-1] - self.kl[0]) / cfg.window
                out["kl_growth"] = (growth, growth > cfg.kl_growth,
                                    f"rollout/kl rose {growth:.3g} per step over the last {cfg.window} steps, to "
                                    f"{self.kl[-1]:.3g} (> monitors.kl_growth={cfg.kl_growth})")
        if "rollout/response_length" in record and "rollout/response_length" in self.first:
            ratio = record["rollout/response_length"] / self.first["rollout/response_length"]
            out["length_drift"] = (ratio, ratio > cfg.length_drift or ratio < 1 / cfg.length_drift,
                                   f"mean response length {record['rollout/response_length']:.4g} tokens, {ratio:.3g}x "
                                   f"its first value (monitors.length_drift={cfg.length_drift} either way)")
        if "policy/clipfrac/train" in record:
            value = record["policy/clipfrac/train"]
            out["clip_fraction"] = (value, value > cfg.clip_fraction,
                                    f"policy/clipfrac {value:.3g} (> monitors.clip_fraction={cfg.clip_fraction}): "
                                    f"the updates leave the trust region")
        if "rollout/zero_advantage_fraction" in record:
            kept = record.get("rollout/kept_fraction", 1.0)
            value = 1 - kept * (1 - record["rollout/zero_advantage_fraction"])
            out["zero_advantage"] = (value, value > cfg.zero_advantage,
                                     f"{value:.3g} of the samples have zero advantage (> monitors.zero_advantage="
                                     f"{cfg.zero_advantage}): their groups all scored the same, no signal")
        # off-policy samples (rollout.max_staleness) differ from pi_old by the updates since they were
        # drawn as well, which the importance weight corrects: the engine's own error is not readable there
        if "rollout/logp_mismatch" in record and not record.get("rollout/staleness_max"):
            value = record["rollout/logp_mismatch"]
            out["sampler_mismatch"] = (value, value > cfg.sampler_mismatch,
                                       f"sampler and trainer log-probs differ by {value:.3g} per token "
                                       f"(> monitors.sampler_mismatch={cfg.sampler_mismatch})")
        if "rollout/score_mean" in record:
            self.scores.append(record["rollout/score_mean"])
        if "eval/task_accuracy" in record:
            accuracy = record["eval/task_accuracy"]
            score = sum(self.scores) / len(self.scores) if self.scores else None
            if self.last_eval is not None and score is not None and self.last_eval[1] is not None:
                fall, rise = self.last_eval[0] - accuracy, score - self.last_eval[1]
                out["reward_vs_verifier"] = (fall, fall > cfg.reward_vs_verifier and rise > 0,
                                             f"eval/task_accuracy fell {self.last_eval[0]:.3g} -> {accuracy:.3g} while "
                                             f"the mean sampled reward rose {rise:+.3g}: reward hacking? "
                                             f"(monitors.reward_vs_verifier={cfg.reward_vs_verifier})")
            self.last_eval, self.scores = (accuracy, score), []
        return out

    def check(self, record: dict, step: int) -> list[str]:
        """Adds ``monitor/<name>`` to ``record``; warns once per monitor that crosses; returns the
        names of those that crossed and are in ``stop_on`` (nothing when monitors are off)."""
        if not self.cfg.enabled:
            return []
        stop = []
        for name, (value, crossed, what) in self.values(record).items():
            record[f"monitor/{name}"] = value
            if not crossed:
                continue
            if name in self.cfg.stop_on:
                stop.append(f"step {step}: monitor {name}: {what}")
            elif name not in self.warned and self.main:
                log.warning(f"step {step}: monitor {name}: {what}")
                self.warned.add(name)
        return stop

    def state(self) -> dict:
        return {"first": self.first, "kl": list(self.kl), "scores": self.scores, "last_eval": self.last_eval,
                "warned": sorted(self.warned)}

    def restore(self, state: dict):
        self.first, self.scores, self.warned = state["first"], state["scores"], set(state["warned"])
        self.kl.extend(state["kl"])
        self.last_eval = tuple(state["last_eval"]) if state["last_eval"] is not None else None
