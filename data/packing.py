"""Packing: several sequences share a row, with no attention and no loss across their boundaries.

transformers builds a per-sequence causal mask from ``position_ids`` that restart at 0 for each
packed sequence (sdpa, eager and flash-attention varlen alike) as long as ``use_cache=False`` and
no ``attention_mask`` is passed. Rows are filled first-fit-decreasing up to ``row_tokens`` (then evened out); on CPU
a bounded row keeps sdpa's dense per-row mask small, on GPU with flash-attention one long row
needs no padding at all. The rows of a micro-batch are stacked into one ``[R, L]`` tensor; a
shorter row is filled with a dummy segment (its own positions, no loss), counted as padding.
"""

from __future__ import annotations

import torch

from data.tokenize import IGNORE


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin indices of ``lengths`` into as few bins of at most ``capacity`` tokens as FFD finds."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than a row holds ({capacity})")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def balanced_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """As many bins as first-fit-decreasing needs, but evened out (longest first onto the emptiest
    bin), so the rows stacked into one tensor need little padding; FFD's bins if that overflows."""
    ffd = first_fit_decreasing(lengths, capacity)
    bins, load = [[] for _ in ffd], [0] * len(ffd)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = min(range(len(bins)), key=load.__getitem__)
        bins[b].append(i)
        load[b] += lengths[i]
    return bins if max(load) <= capacity else ffd


def pack(sequences: list[dict], row_tokens: int, pad_id: int, fields: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Pack sequences (``input_ids`` and ``labels``, aligned) into a micro-batch.

    Returns ``input_ids``, ``position_ids``, ``targets`` and ``seq_ids``, all ``[R, L]``.
    ``targets[r, t]`` is the label of the token *after* t (the one logits at t predict), -100 at
    each sequence's last token so nothing is predicted across a boundary. ``seq_ids[r, t]`` is the
    index into ``sequences`` of the token at t, -1 on padding. Sequences must be non-empty.

    Each name in ``fields`` is a per-token float list (or 1-D tensor) of a sequence, aligned with its ``labels``
    (e.g. RL advantages), packed exactly as the labels are: ``out[name][r, t]`` belongs to
    ``targets[r, t]``; 0 where there is no target.
    """
    bins = balanced_bins([len(s["input_ids"]) for s in sequences], row_tokens)
    width = max(sum(len(sequences[i]["input_ids"]) for i in b) for b in bins)
    shape = (len(bins), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    seq_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    extra = {name: torch.zeros(shape) for name in fields}
    for r, b in enumerate(sorted(bins)):  # sorted: row order follows the caller's order, not lengths
        t = 0
        for i in b:
            ids, labels = sequences[i]["input_ids"], sequences[i]["labels"]
            n = len(ids)
            input_ids[r, t : t + n] = torch.tensor(ids)
            targets[r, t : t + n - 1] = torch.tensor(labels[1:])
            for name in fields:
                extra[name][r, t : t + n - 1] = torch.as_tensor(sequences[i][name][1:], dtype=torch.float32)
            seq_ids[r, t : t + n] = i
            position_ids[r, t : t + n] = torch.arange(n)
            t += n
        position_ids[r, t:] = torch.arange(width - t)  # the padding tail is a segment of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets, "seq_ids": seq_ids, **extra}


def pad(sequences: list[dict], pad_id: int, fields: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The padded layout of the same sequences (one per row, right-padded, no attention mask: a
    causal model never attends from a real token to the padding after it): ``packing=false``, and
    ``packing=auto`` for a model that cannot pack."""
    width = max(len(s["input_ids"]) for s in sequences)
    out = {k: [] for k in ("input_ids", "position_ids", "targets", "seq_ids")}
    extra = {name: torch.zeros(len(sequences), width) for name in fields}
    for i, s in enumerate(sequences):
        n, fill = len(s["input_ids"]), width - len(s["input_ids"])
        out["input_ids"].append(s["input_ids"] + [pad_id] * fill)
        out["position_ids"].append(list(range(width)))
        out["targets"].append(s["labels"][1:] + [IGNORE] * (fill + 1))
        out["seq_ids"].append([i] * n + [-1] * fill)
        for name in fields:
            extra[name][i, : n - 1] = torch.as_tensor(s[name][1:], dtype=torch.float32)
    return {**{k: torch.tensor(v) for k, v in out.items()}, **extra}


def per_sequence(values: torch.Tensor, seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Sum ``values`` ([R, L]) over each packed sequence's positions -> [n]."""
    valid = seq_ids >= 0
    return values.new_zeros(n).index_add(0, seq_ids[valid], values[valid])


def last_positions(seq_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Flat index (into ``seq_ids.flatten()``) of each sequence's last token -> [n]."""
    flat = seq_ids.flatten()
    valid = flat >= 0
    positions = torch.arange(flat.numel(), device=flat.device)
    return torch.zeros(n, dtype=torch.long, device=flat.device).scatter_reduce(
        0, flat[valid], positions[valid], reduce="amax", include_self=False)


def unpack(values: torch.Tensor, batch: dict, n: int) -> list[torch.Tensor]:
    """The inverse of packing for per-target values: ``values`` [R, L] (e.g. log-probs, aligned
    with ``batch["targets"]``) -> for each of the ``n`` sequences, its values at its targets, in
    token order (a response's per-token values)."""
    flat_ids, flat_targets = batch["seq_ids"].flatten(), batch["targets"].flatten()
    pos = torch.nonzero((flat_ids >= 0) & (flat_targets != IGNORE)).flatten()
    owner = flat_ids[pos]
    pos = pos[torch.sort(owner, stable=True).indices]  # by sequence; positions stay in order
    counts = torch.bincount(owner, minlength=n).tolist()
    return list(torch.split(values.flatten()[pos], counts))
