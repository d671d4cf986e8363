"""Per-token log-probs (and the entropy RL needs) of a causal LM over a packed batch.

With full logits, a micro-batch of T tokens holds a [T, vocab] fp32 tensor and its log-softmax for
backward: 6 GiB for 4k tokens over Llama-3's 128k vocabulary. ``token_logps(..., chunk=C)``
instead runs the decoder to its last hidden state, then the LM head C positions at a time, each
chunk under ``torch.utils.checkpoint``: forward keeps only the per-token results, backward
recomputes one chunk's logits at a time. The numbers are the full computation's, chunk by chunk
(tests/test_logprobs.py). ``chunk=None`` is the full computation itself, ``model(...).logits``.

The chunked path assumes the model's logits are ``lm_head(last_hidden_state)``, as in every
Llama-style model, soft-capped where the config says so (Gemma-2 and 3); ``head_error`` measures
it, and the trainer refuses a model where it does not hold (Cohere's logit scale, say) rather than
train on other numbers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import distributed
from data.packing import IGNORE, unpack
from losses.rl import entropy_from_logits, generalized_jsd


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every position, in fp32, zero where there is no target; and that mask."""
    logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
    mask = (targets != IGNORE).to(logps.dtype)
    return logps.view_as(targets) * mask, mask


def entropy(logits: torch.Tensor, grad: bool, truncated: bool = False) -> torch.Tensor:
    """``entropy_from_logits``; without ``grad`` autograd keeps nothing for it (a softmax over the
    vocabulary per position)."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return entropy_from_logits(logits.float(), truncated)


def truncate(logits: torch.Tensor, targets: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` [N, V] with the tokens a sampler's top-k and top-p warpers remove set to -inf, so
    that their softmax is the truncated, renormalised distribution it drew from. As transformers'
    ``TopKLogitsWarper``/``TopPLogitsWarper`` and vLLM's sampler: top-k first (``top_k`` 0: off),
    then, of what is left, the least likely tokens whose probabilities sum to at most 1 - ``top_p``
    are removed, the most likely one always kept. Each position's target stays whatever the
    rounding: the sampler drew it, so it was in the sampler's set."""
    with torch.no_grad():
        remove = torch.zeros_like(logits, dtype=torch.bool)
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            remove = logits < kth
        if top_p < 1:
            ascending, order = logits.masked_fill(remove, float("-inf")).sort(dim=-1)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
            drop[..., -1] = False
            remove = remove | drop.scatter(-1, order, drop)
        remove = remove.scatter(-1, targets[:, None], False)
    return logits.masked_fill(remove, float("-inf"))


def head_logits(hidden, head: torch.nn.Linear, softcap: float | None, temperature: float) -> torch.Tensor:
    """The LM head's fp32 logits of ``hidden`` at ``temperature``, soft-capped as Gemma-2 and 3 do
    (``final_logit_softcapping``)."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature if temperature != 1 else logits


def head_logps(hidden, head: torch.nn.Linear, softcap: float | None, targets, temperature: float, with_entropy: bool,
               entropy_grad: bool, top_k: int = 0, top_p: float = 1.0):
    """One chunk: log p(target) under softmax(head(hidden) / temperature) (truncated to ``top_k``,
    ``top_p`` as the sampler does: ``truncate``), and its entropy."""
    logits = head_logits(hidden, head, softcap, temperature)
    truncated = top_k > 0 or top_p < 1
    if truncated:
        logits = truncate(logits, targets, top_k, top_p)
    logps = -F.cross_entropy(logits, targets, reduction="none")
    return logps, entropy(logits, entropy_grad, truncated) if with_entropy else torch.zeros_like(logps)


def head_jsd(hidden, head: torch.nn.Linear, softcap: float | None, teacher_logps, temperature: float, beta: float):
    """One chunk: ``generalized_jsd`` of the student's tempered distribution from the teacher's."""
    return generalized_jsd(head_logits(hidden, head, softcap, temperature).log_softmax(-1), teacher_logps, beta)


def scored_at(targets: torch.Tensor) -> torch.Tensor:
    """The flat indices of the positions that have a target; at least one position, so the head is
    in every rank's graph even with nothing to score (FSDP2 reduces its gradient on every rank):
    its value is masked out by ``scatter_scored``."""
    scored = targets.flatten() != IGNORE
    return scored.nonzero().squeeze(1) if scored.any() else targets.new_zeros(1)


def scatter_scored(values: torch.Tensor, at: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] values at ``scored_at``'s positions -> [B, T], zero where there is no target."""
    mask = (targets != IGNORE).float()  # a product, not a view, is what FSDP2 hooks the backward on
    return torch.zeros(targets.numel(), dtype=torch.float32, device=targets.device).index_put((at,), values) \
        .view_as(targets) * mask


def scored_hidden(model, input_ids, position_ids, targets):
    """The decoder's last hidden state at ``scored_at``'s positions [N, H], those positions, and the
    LM head with its soft-cap: a prompt's positions need the decoder, not the head (on SmolLM2-135M
    the head is a fifth of the model's FLOPs, and RL's prompts most of a sequence)."""
    hidden = model.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    at = scored_at(targets)
    head, softcap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    return hidden.flatten(0, 1)[at], at, head, softcap


def chunked_logps(model, input_ids, position_ids, targets, chunk: int, temperature: float = 1.0,
                  with_entropy: bool = False, entropy_grad: bool = True, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] log-probs of ``targets`` and entropies (zeros without ``with_entropy``), both zero
    where there is no target, the LM head applied ``chunk`` scored positions at a time. Under FSDP2
    this runs as a forward of the root module (``register``), so the root's weights (embeddings,
    LM head) are gathered as in ``model(...)``."""
    hidden, at, head, softcap = scored_hidden(model, input_ids, position_ids, targets)
    kept_targets = targets.flatten()[at].clamp(min=0)
    recompute = torch.is_grad_enabled()  # without gradients nothing is kept, so there is nothing to recompute
    parts = []
    for start in range(0, len(kept_targets), chunk):
        args = (hidden[start:start + chunk], head, softcap, kept_targets[start:start + chunk], temperature, with_entropy,
                entropy_grad, top_k, top_p)
        parts.append(checkpoint(head_logps, *args, use_reentrant=False) if recompute else head_logps(*args))
    logps, entropies = (scatter_scored(torch.cat(p), at, targets) for p in zip(*parts))
    return logps, entropies


def chunked_vocab_logps(model, input_ids, position_ids, targets, chunk: int, temperature: float = 1.0):
    """[N, V] fp32 log-softmax of the whole tempered distribution at ``scored_at``'s positions (a
    teacher's, under no_grad), the head ``chunk`` positions at a time."""
    hidden, _, head, softcap = scored_hidden(model, input_ids, position_ids, targets)
    return torch.cat([head_logits(hidden[start:start + chunk], head, softcap, temperature).log_softmax(-1)
                      for start in range(0, len(hidden), chunk)])


def chunked_jsd(model, input_ids, position_ids, targets, teacher_logps, chunk: int, temperature: float,
                beta: float) -> torch.Tensor:
    """[B, T] ``generalized_jsd`` of the model's tempered distribution from ``teacher_logps``
    (``chunked_vocab_logps``'s rows), zero where there is no target; each chunk under
    ``torch.utils.checkpoint`` as in ``chunked_logps``."""
    hidden, at, head, softcap = scored_hidden(model, input_ids, position_ids, targets)
    parts = [checkpoint(head_jsd, hidden[start:start + chunk], head, softcap, teacher_logps[start:start + chunk],
                        temperature, beta, use_reentrant=False) for start in range(0, len(hidden), chunk)]
    return scatter_scored(torch.cat(parts), at, targets)


def register(model):
    """Give a sharded causal LM the chunked methods (``model.chunked_logps`` ...), run by FSDP2 as
    forwards of the root."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for name, method in (("chunked_logps", chunked_logps), ("chunked_vocab_logps", chunked_vocab_logps),
                         ("chunked_jsd", chunked_jsd)):
        setattr(model, name, functools.partial(method, model))
        register_fsdp_forward_method(model, name)


def token_logps(model, batch: dict, chunk: int | None = None, temperature: float = 1.0,
                with_entropy: bool = False, entropy_grad: bool = True, top_k: int = 0, top_p: float = 1.0):
    """Log p(target) per position at ``temperature`` (fp32, zero where there is no target) and that
    mask, and with ``with_entropy`` the entropy of each position's distribution (masked likewise;
    differentiable only with ``entropy_grad``); with ``top_k``/``top_p``, of the distribution
    truncated as the sampler truncates it (``truncate``). ``chunk``: positions per LM-head chunk;
    None: the full logits of ``model(...)``."""
    targets = batch["targets"]
    mask = (targets != IGNORE).float()
    if chunk is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        if temperature != 1:
            logits = logits.float() / temperature
        if top_k > 0 or top_p < 1:
            flat = truncate(logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), top_k, top_p)
            logits = flat.view(*targets.shape, -1)
        logps, _ = target_logps(logits, targets)
        entropies = entropy(logits, entropy_grad, top_k > 0 or top_p < 1) * mask if with_entropy else None
    else:
        forward = getattr(model, "chunked_logps", None) or functools.partial(chunked_logps, model)
        logps, entropies = forward(batch["input_ids"], batch["position_ids"], targets, chunk, temperature,
                                   with_entropy, entropy_grad, top_k, top_p)
        entropies = entropies if with_entropy else None
    return (logps, mask, entropies) if with_entropy else (logps, mask)


def vocab_logps(model, batch: dict, chunk: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """[N, V] log-softmax of the whole tempered distribution at each of the batch's positions that
    has a target (``scored_at``'s), in fp32: a distillation teacher's, under no_grad. ``chunk`` as
    in ``token_logps``. N x V floats: 0.4 GB for 2,048 targets over SmolLM2's 49k vocabulary."""
    targets = batch["targets"]
    if chunk is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return (logits.float().flatten(0, 1)[scored_at(targets)] / temperature).log_softmax(-1)
    forward = getattr(model, "chunked_vocab_logps", None) or functools.partial(chunked_vocab_logps, model)
    return forward(batch["input_ids"], batch["position_ids"], targets, chunk, temperature)


def jsd(model, batch: dict, teacher_logps: torch.Tensor, beta: float, chunk: int | None = None,
        temperature: float = 1.0) -> torch.Tensor:
    """[B, T] ``generalized_jsd`` of ``model``'s tempered distribution from the teacher's
    (``vocab_logps`` of the same batch) at each position that has a target, zero elsewhere;
    differentiable. ``chunk`` as in ``token_logps``."""
    targets = batch["targets"]
    if chunk is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        at = scored_at(targets)
        student = (logits.float().flatten(0, 1)[at] / temperature).log_softmax(-1)
        return scatter_scored(generalized_jsd(student, teacher_logps, beta), at, targets)
    forward = getattr(model, "chunked_jsd", None) or functools.partial(chunked_jsd, model)
    return forward(batch["input_ids"], batch["position_ids"], targets, teacher_logps, chunk, temperature, beta)


# The largest difference between the chunked path's log-probs and the full logits' on a model
# whose logits are its LM head's output: the two compute the head over other shapes, fp32 rounding
# is ~1e-6, half precision's up to ~1e-2 (on SmolLM2-135M in bf16: 0). A soft-cap or scale the chunks
# do not apply moves them far more (tests/test_logprobs.py: Cohere's logit_scale).
HEAD_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


@torch.no_grad()
def head_error(model, device: torch.device) -> float:
    """Largest difference between the chunked path's log-probs and the full logits' on a probe
    sequence: ~1e-6 in fp32 where the logits are ``lm_head(last_hidden_state)``. Collective under
    FSDP (every rank runs the same forwards)."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (1, 12), generator=g).to(device)
    batch = {"input_ids": ids, "position_ids": torch.arange(12, device=device)[None],
             "targets": torch.randint(vocab, (1, 12), generator=g).to(device)}
    was_training = model.training
    model.eval()
    try:
        full, _ = token_logps(model, batch)
        chunked, _ = token_logps(model, batch, chunk=5)
    finally:
        model.train(was_training)
    return (full - chunked).abs().max().item()


@torch.no_grad()
def score_tokens(rollout, collate, batch_size: int, scorers: dict, frozen=()):
    """Collective: for each ``{field: fn(batch) -> [1, L] per-token values}`` of ``scorers`` (the
    old policy's and the reference's log-probs, the critic's values), ``rollout.<field>`` [N, T],
    laid out over the completion's tokens (a multi-turn episode's observations between the replies
    get 0); each rank computes a share of the samples, ``batch_size`` per forward (``collate``)."""

    def forward(chunk: list[int]) -> list[dict]:
        part = rollout.select(chunk)
        batch, n = collate(part), len(part)
        out = {name: unpack(fn(batch), batch, n) for name, fn in scorers.items()}
        trained = [part.mask[i, : part.lengths[i]] > 0 for i in range(n)]  # unpack gives the trained tokens only
        return [{name: torch.zeros(len(trained[i])).masked_scatter(trained[i], values[i].float().cpu())
                 for name, values in out.items()} for i in range(n)]

    mine = distributed.lockstep(forward, distributed.share(list(range(len(rollout)))), batch_size, stand_in=0,
                                frozen=frozen)
    computed = distributed.gather(mine)
    width = rollout.tokens.shape[1]
    for name in computed[0] if computed else ():
        setattr(rollout, name, torch.stack([F.pad(c[name], (0, width - len(c[name]))) for c in computed]))
