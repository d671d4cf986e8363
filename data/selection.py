"""Which samples the online loops train on, from their scores. Samples come in groups of
``group_size`` consecutive samples of one prompt; functions return indices into the flat list.

Ties are broken towards the earlier sample, so a selection is the same on every rank and run.
"""

from __future__ import annotations

import math


def groups(scores: list[float], group_size: int) -> list[range]:
    if group_size < 1 or len(scores) % group_size:
        raise ValueError(f"{len(scores)} scores do not split into groups of {group_size}")
    return [range(start, start + group_size) for start in range(0, len(scores), group_size)]


def best_vs_worst_pairs(scores: list[float], group_size: int, margin: float = 0.0) -> list[tuple[int, int]]:
    """Online DPO's pairs (RLHFlow): per prompt, (its highest-scored sample, its lowest-scored
    one), kept only when the best beats the worst by more than ``margin``. A prompt whose samples
    all score the same (or one sample, K=1) gives no pair."""
    pairs = []
    for group in groups(scores, group_size):
        best = max(group, key=lambda i: (scores[i], -i))
        worst = min(group, key=lambda i: (scores[i], i))
        if scores[best] - scores[worst] > margin:
            pairs.append((best, worst))
    return pairs


def best_of_k(scores: list[float], group_size: int, top_fraction: float = 1.0,
              min_score: float | None = None) -> list[int]:
    """RAFT / rejection sampling (LMFlow, seed 004): per prompt its highest-scored sample; of
    those, the ``top_fraction`` with the highest scores (rounded up, at least one), and of these
    only the ones scoring at least ``min_score``. Returned in sample order."""
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_reward_percentage={top_fraction} must be in (0, 1]")
    best = [max(group, key=lambda i: (scores[i], -i)) for group in groups(scores, group_size)]
    n_keep = max(1, math.ceil(len(best) * top_fraction)) if best else 0
    kept = sorted(best, key=lambda i: (-scores[i], i))[:n_keep]
    if min_score is not None:
        kept = [i for i in kept if scores[i] >= min_score]
    return sorted(kept)
