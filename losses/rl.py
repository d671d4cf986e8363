"""PPO and its critic-free cousins (GRPO, RLOO, REINFORCE++), as pure functions of token tensors.

Token tensors are right-padded ``[B, T]``; ``mask`` is a float ``[B, T]``, 1 on response tokens
and 0 on padding, each row's response tokens a contiguous prefix. Whatever the padding positions
hold (finite, of the size of log-probs and values; they are multiplied by 0, so not inf or nan),
every ``[B, T]`` output is 0 there (``truncated_is_weight``: 1), no reduction reads them, and no
gradient reaches them. Per-token losses come back unreduced; the trainer picks the normalisation.
"""

from __future__ import annotations

import math

import torch

from data.packing import per_sequence

WHITEN_EPS = 1e-8


# --- masked statistics ----------------------------------------------------------------------------

def masked_mean(x, mask, dim=None):
    """Mean of ``x`` over the elements where ``mask`` is 1 (over all of them, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def _masked_var(x, mask):
    """Biased (divide by n, unbiased=False) variance over the masked elements."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / sqrt(var + 1e-8), mean and biased variance over the masked elements; with
    ``shift_mean=False`` the mean is added back (only the scale changes). Padding -> 0."""
    mean, var = masked_mean(x, mask), _masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over the masked tokens (biased variances): 1 is a perfect critic,
    0 one no better than a constant, negative one worse than that."""
    return 1 - _masked_var(returns - values, mask) / _masked_var(returns, mask)


def _last_token(mask):
    """One-hot [B, T] of each row's last response token (all zero for a row without one), also
    where the mask has holes (a multi-turn episode's observations)."""
    later = torch.flip(torch.cumsum(torch.flip(mask, [1]), 1), [1]) - mask  # response tokens right of t
    return mask * (later == 0)


# --- KL and rewards -------------------------------------------------------------------------------

def kl_penalty(logp, ref_logp, kind: str):
    """Per-token estimators of KL(pi || pi_ref) from the log-probs of tokens sampled from pi
    (Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html). With
    log r = ref_logp - logp:

        k1 = -log r = logp - ref_logp            unbiased, can be negative
        k2 = 0.5 (log r)^2                       biased, non-negative, low variance
        k3 = (r - 1) - log r                     unbiased and non-negative (r - 1 has mean 0)

    k3 is computed as expm1(log r) - log r, accurate for small log r.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def token_rewards(scores, kl, mask, kl_coef: float):
    """The per-token reward of RLHF PPO (Ziegler et al. 2019; Ouyang et al. 2022):

        r_t = -kl_coef * kl_t + [t is the row's last response token] * score

    ``scores`` [B] are the sequence-level scores (e.g. the reward model's), ``kl`` [B, T] a
    per-token KL estimate (``kl_penalty``). Padding -> 0.
    """
    return -kl_coef * kl * mask + scores[:, None] * _last_token(mask)


# --- advantages and returns -----------------------------------------------------------------------

def discounted_returns(rewards, mask, gamma: float):
    """REINFORCE return-to-go: G_t = sum_{k >= t} gamma^(k - t) r_k over the row's response tokens,
    by the reverse scan G_t = r_t + gamma G_{t+1}. Time runs over the response tokens only: a
    position with mask 0 (padding, an environment's tokens between replies) is skipped. Padding -> 0."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438), per row:

        delta_t = r_t + gamma V_{t+1} - V_t        (V after the last response token = 0: the episode ends)
        A_t     = delta_t + gamma lam A_{t+1}   = sum_l (gamma lam)^l delta_{t+l}
        R_t     = A_t + V_t                        (the critic's regression target)

    lam = 1 gives Monte Carlo returns minus V; lam = 0 the one-step TD error. Time runs over the
    response tokens only: t + 1 is the next position with mask 1, so a multi-turn episode's
    observation tokens (mask 0) are skipped, not taken as the end. Returns ``(advantages,
    returns)``, both 0 on padding, both without gradient.
    """
    with torch.no_grad():
        rewards, values = rewards * mask, values * mask
        advantages = torch.zeros_like(rewards)
        next_value = torch.zeros_like(values[:, 0])  # V past the last response token = 0
        next_adv = torch.zeros_like(values[:, 0])
        for t in reversed(range(rewards.shape[1])):
            here = mask[:, t] > 0
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            next_adv = torch.where(here, delta + gamma * lam * next_adv, next_adv)
            next_value = torch.where(here, values[:, t], next_value)
            advantages[:, t] = next_adv * mask[:, t]
        return advantages, (advantages + values) * mask


def grpo_advantages(scores, group_size: int, scale: bool = True, eps: float = 1e-6):
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300):

        A_i = (s_i - mean(group)) / (std(group) + eps)     (scale=True)
        A_i =  s_i - mean(group)                           (scale=False; Dr. GRPO, arXiv:2503.20783)

    ``scores`` [N] are ordered in groups of ``group_size`` consecutive samples of one prompt. The
    std is the UNBIASED sample std (divide by k - 1), torch.std's default, as in TRL's
    GRPOTrainer (and verl); the paper does not say which. A group of size 1 has no defined
    unbiased std; its centred score is 0, so its advantage is 0. Returns [N]; the trainer
    broadcasts it over the response tokens.
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(scores, group_size: int):
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019): each sample's baseline is
    the mean score of the other k - 1 samples of its group,

        A_i = s_i - 1/(k-1) sum_{j != i} s_j  =  k/(k-1) (s_i - mean(group)),

    so the advantages of a group sum to 0. Needs k >= 2. Returns [N].
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2 (the leave-one-out baseline of one sample is empty)")
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.reshape(-1, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def reinforce_pp_advantages(rewards, mask, gamma: float = 1.0):
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): no critic; the token-level return-to-go of the
    per-token rewards (``token_rewards``: the score at the last token minus the KL penalty at
    every token), whitened over all response tokens of the whole batch:

        A_t = whiten( sum_{k >= t} gamma^(k - t) r_k )

    Padding -> 0.
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


# --- losses ---------------------------------------------------------------------------------------

def ppo_policy_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float | None = None,
                    is_weight=None):
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), per token:

        r_t = exp(logp_t - old_logp_t)
        L_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)   [* is_weight_t]

    ``clip_high`` defaults to ``clip_low``; a larger one is DAPO's decoupled "clip-higher"
    (Yu et al. 2025, arXiv:2503.14476). ``advantages`` is [B, T], or [B] (one per sequence, as
    from GRPO/RLOO) and is then broadcast over the tokens; it is treated as a constant (detached).
    ``is_weight`` is an optional per-token truncated importance weight (``truncated_is_weight``),
    also detached. Returns the per-token loss [B, T] (0 on padding) and detached metrics:
    ``clipfrac``, the fraction of response tokens on which the clipped branch is active (zero
    gradient), and ``approx_kl``, the masked mean of 0.5 (logp - old_logp)^2.
    """
    clip_high = clip_low if clip_high is None else clip_high
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = (logp - old_logp) * mask  # ratio 1 on padding, whatever is stored there
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped) * mask
    if is_weight is not None:
        loss = loss * is_weight.detach()
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).detach(),
    }
    return loss, metrics


AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


def aggregation_weights(mask, seq_ids, n: int, aggregation: str, max_new_tokens: int):
    """Per-token weights ``w`` that turn a sum into the named mean of per-token losses L_it of the
    G sequences o_i of a mini-batch: ``sum(w * L) / units`` with ``units`` the mini-batch's
    response tokens (token_mean) or its sequences (the others; ``aggregation_units``):

        token_mean     DAPO (arXiv:2503.14476)     sum_i sum_t L_it / sum_i |o_i|          w = 1
        sequence_mean  GRPO paper (2402.03300)     1/G sum_i 1/|o_i| sum_t L_it            w = 1 / |o_i|
        constant       Dr. GRPO (2503.20783)       1/(G T_max) sum_i sum_t L_it            w = 1 / T_max

    ``T_max`` is the generation budget (``max_new_tokens``). Works on any layout: ``seq_ids``
    ([R, L], -1 on padding) says which of the ``n`` sequences owns each position, ``mask`` which
    positions are response tokens. 0 off the response tokens.
    """
    if aggregation == "token_mean":
        return mask
    if aggregation == "constant":
        return mask / max_new_tokens
    if aggregation == "sequence_mean":
        lengths = per_sequence(mask, seq_ids, n)
        return mask / lengths.clamp(min=1)[seq_ids.clamp(min=0)]
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def aggregation_units(n_response_tokens: int, aggregation: str) -> int:
    """What ``aggregation_weights``' sum is divided by for a sequence of ``n_response_tokens``."""
    return n_response_tokens if aggregation == "token_mean" else 1


def sequence_ppo_loss(logp, old_logp, advantages, mask, seq_ids, n: int, clip_low: float,
                      clip_high: float | None = None, is_weight=None):
    """The sequence-level form of RLOO (Ahmadian et al. 2024, arXiv:2402.14740: "we model the entire
    completion as a single action"), PPO-clipped so that several updates per rollout stay safe:

        rho_i = pi(o_i) / pi_old(o_i) = exp(sum_t logp_it - sum_t old_logp_it)
        L_i   = -min(rho_i A_i, clip(rho_i, 1 - clip_low, 1 + clip_high) A_i)   [* is_weight_i]

    On-policy (rho = 1) the gradient is the paper's REINFORCE estimator -A_i grad log pi(o_i | x).
    ``advantages`` and ``is_weight`` are per token, constant over a sequence (one value each);
    the layout is ``aggregation_weights``'. Returns the per-sequence loss [n] and detached metrics
    (``clipfrac`` over sequences, ``approx_kl`` the mean of 0.5 (log rho_i)^2).
    """
    lengths = per_sequence(mask, seq_ids, n).clamp(min=1)
    seq_logp, seq_old = per_sequence(logp * mask, seq_ids, n), per_sequence(old_logp * mask, seq_ids, n)
    seq_adv = per_sequence(advantages * mask, seq_ids, n) / lengths
    seq_w = None if is_weight is None else per_sequence(is_weight * mask, seq_ids, n) / lengths
    ones = torch.ones_like(seq_logp[:, None])
    loss, metrics = ppo_policy_loss(seq_logp[:, None], seq_old[:, None], seq_adv, ones, clip_low, clip_high,
                                    is_weight=None if seq_w is None else seq_w[:, None])
    return loss[:, 0], metrics


def gspo_loss(logp, old_logp, advantages, mask, seq_ids, n: int, clip_low: float, clip_high: float | None = None,
              is_weight=None, token_level: bool = False):
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): the importance ratio of a sequence is the
    geometric mean of its tokens' ratios, clipped at the sequence level:

        s_i = (pi(y_i | x) / pi_old(y_i | x))^(1 / |y_i|) = exp(1/|y_i| sum_t (logp_it - old_logp_it))
        L_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)   [* is_weight_i]

    (the paper's clip range is small, 3e-4 / 4e-4, as s_i is a per-token average). With
    ``token_level``, GSPO-token: each token keeps its own path of the gradient, its value that of
    the sequence,

        s_it = sg(s_i) pi(y_it) / sg(pi(y_it)),   L_it = -min(s_it A_it, clip(s_it, ...) A_it)

    which is GSPO when A_it = A_i (the group advantages). ``advantages`` and ``is_weight`` are per
    token, in the packed layout of ``aggregation_weights``; a sequence's are their mean over its
    tokens. Returns the per-sequence loss [n], or with ``token_level`` the per-token loss (0 on
    padding), and detached metrics: ``clipfrac`` (sequences, or tokens, in the clipped branch) and
    ``approx_kl`` (the mean of 0.5 (log s_i)^2 over sequences).
    """
    clip_high = clip_low if clip_high is None else clip_high
    lengths = per_sequence(mask, seq_ids, n).clamp(min=1)
    log_s = per_sequence((logp - old_logp) * mask, seq_ids, n) / lengths
    approx_kl = (0.5 * log_s.detach() ** 2).mean()
    if not token_level:
        seq_adv = per_sequence(advantages.detach() * mask, seq_ids, n) / lengths
        s = torch.exp(log_s)
        loss = torch.maximum(-seq_adv * s, -seq_adv * torch.clamp(s, 1 - clip_low, 1 + clip_high))
        clipped = (-seq_adv * torch.clamp(s, 1 - clip_low, 1 + clip_high) > -seq_adv * s).float()
        if is_weight is not None:
            loss = loss * (per_sequence(is_weight.detach() * mask, seq_ids, n) / lengths)
        return loss, {"clipfrac": clipped.mean().detach(), "approx_kl": approx_kl}
    own = seq_ids.clamp(min=0)  # each token's sequence (padding: any, masked below)
    s_t = torch.exp(log_s.detach()[own] + logp - logp.detach())
    adv = advantages.detach()
    unclipped, clipped = -adv * s_t, -adv * torch.clamp(s_t, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped) * mask
    if is_weight is not None:
        loss = loss * is_weight.detach()
    return loss, {"clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask).detach(), "approx_kl": approx_kl}


def cispo_loss(logp, old_logp, advantages, mask, clip_low: float, clip_high: float, is_weight=None):
    """CISPO (MiniMax-M1, arXiv:2506.13585): REINFORCE with the importance weight clipped and
    detached, so that no token loses its gradient (PPO's clip drops the tokens outside its band,
    often the rare ones a reasoning chain turns on):

        r_t = exp(logp_t - old_logp_t)
        L_t = -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) A_t logp_t   [* is_weight_t]

    (the paper sets no lower bound, clip_low = 1, and tunes clip_high). Returns the per-token loss
    [B, T] (0 on padding) and detached metrics: ``clipfrac``, the fraction of tokens whose weight
    was clipped, and ``approx_kl``."""
    log_ratio = ((logp - old_logp) * mask).detach()
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = -weight * advantages.detach() * logp * mask
    if is_weight is not None:
        loss = loss * is_weight.detach()
    return loss, {"clipfrac": masked_mean((weight != ratio).to(logp.dtype), mask),
                  "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}


def sapo_loss(logp, old_logp, advantages, mask, tau_pos: float, tau_neg: float, is_weight=None):
    """SAPO (Gao et al. 2025, arXiv:2511.20347): a smooth, temperature-controlled gate in place of
    PPO's hard clip:

        r_t = exp(logp_t - old_logp_t),   tau_t = tau_pos if A_t > 0 else tau_neg
        L_t = -(4 / tau_t) sigmoid(tau_t (r_t - 1)) A_t   [* is_weight_t]

    Its gradient is -4 sigmoid(.) (1 - sigmoid(.)) A_t grad r_t: PPO's -A_t grad r_t at r = 1,
    fading smoothly as r leaves 1 (faster for negative advantages, tau_neg > tau_pos) instead of
    stopping at a band's edge. Returns the per-token loss [B, T] (0 on padding) and detached
    metrics: ``gate_mean``, the mean over tokens of that gradient factor 4 sigmoid (1 - sigmoid)
    (1 on-policy), and ``approx_kl``."""
    adv = advantages.detach()
    log_ratio = (logp - old_logp) * mask
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = torch.sigmoid(tau * (torch.exp(log_ratio) - 1))
    loss = -(4 / tau) * gate * adv * mask
    if is_weight is not None:
        loss = loss * is_weight.detach()
    return loss, {"gate_mean": masked_mean((4 * gate * (1 - gate)).detach(), mask),
                  "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask)}


def truncated_is_weight(old_logp, sampler_logp, cap: float, mask=None):
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): the inference engine (vLLM) that sampled the tokens and
    the trainer disagree slightly on their log-probs, so the samples are off-policy for the
    trainer's pi_old. Each token's loss is reweighted by

        w_t = min(exp(old_logp_t - sampler_logp_t), cap)

    Detached, and in [0, cap] even for garbage padding values. Pass ``mask`` to get exactly 1 on
    padding whatever is stored there (without it, padding gets 1 only where the two log-probs agree).
    """
    with torch.no_grad():
        log_w = old_logp - sampler_logp
        if mask is None:
            return torch.clamp(torch.exp(log_w), max=cap)
        return torch.clamp(torch.exp(log_w * mask), max=cap) * mask + (1 - mask)


def importance_weights(old_logps, sampler_logps, mask, cap: float | None, sequence_level: bool = False):
    """[N, T] truncated importance weights exp(pi_old - pi_sampler) capped at ``cap``
    (``truncated_is_weight``; 1 everywhere without a cap): per token, or with ``sequence_level``
    the completion's probability ratio, the same for each of its tokens. A token the sampler gave
    no log-prob (NaN: an empty completion's end-of-turn token) counts as agreeing."""
    sampler = torch.where(torch.isnan(sampler_logps), old_logps, sampler_logps)
    if not cap:
        return torch.ones_like(old_logps)
    if sequence_level:
        weight = truncated_is_weight(((old_logps - sampler) * mask).sum(1), torch.zeros(len(mask)), cap)
        return weight[:, None] * mask + (1 - mask)
    return truncated_is_weight(old_logps, sampler, cap, mask)


def rollout_stats(rollout) -> dict:
    """The metrics of a rollout whose KL, advantages and importance weights are in (and the
    critic's explained variance where it has values and returns)."""
    mask, old = rollout.mask, rollout.old_logps
    sampler = torch.where(torch.isnan(rollout.sampler_logps), old, rollout.sampler_logps)
    record = {"rollout/kl": rollout.kl.sum(1).mean().item(),
              "rollout/advantage_mean": masked_mean(rollout.advantages, mask).item(),
              "rollout/logp_mismatch": masked_mean((old - sampler).abs(), mask).item(),
              "rollout/is_weight_mean": masked_mean(rollout.is_weight, mask).item(),
              "rollout/zero_advantage_fraction": ((rollout.advantages * mask).abs().sum(1) == 0).float().mean().item()}
    if rollout.old_values is not None:
        record["critic/explained_variance"] = explained_variance(rollout.old_values, rollout.returns, mask).item()
    return record


def value_loss(values, old_values, returns, mask, clip: float | None):
    """The critic's loss with PPO value clipping (OpenAI baselines ppo2, TRL):

        v_clip = old + clamp(v - old, -c, c)
        L_t    = 0.5 max((v - R)^2, (v_clip - R)^2)

    ``clip=None`` gives the plain 0.5 (v - R)^2. Per token, 0 on padding.
    """
    loss = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (v_clip - returns) ** 2)
    return 0.5 * loss * mask


def generalized_jsd(student_logps, teacher_logps, beta: float):
    """GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024, arXiv:2306.13649, eq. 2)
    between the teacher's distribution P_T and the student's P_S at each position, over the whole
    vocabulary, from their log-probs [..., V] -> [...]:

        M = beta P_T + (1 - beta) P_S
        JSD(beta) = beta KL(P_T || M) + (1 - beta) KL(P_S || M)

    It tends to beta KL(P_T || P_S) as beta -> 0 and (1 - beta) KL(P_S || P_T) as beta -> 1, so
    the endpoints are taken as the paper's two KLs themselves: beta = 0 is the forward KL(P_T || P_S)
    (mode-covering, supervised KD's), beta = 1 the reverse KL(P_S || P_T) (mode-seeking)."""
    if beta == 0:
        return (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
    if beta == 1:
        return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)
    mixture = torch.logsumexp(torch.stack([teacher_logps + math.log(beta), student_logps + math.log(1 - beta)]), 0)
    return (beta * (teacher_logps.exp() * (teacher_logps - mixture)).sum(-1)
            + (1 - beta) * (student_logps.exp() * (student_logps - mixture)).sum(-1))


def entropy_from_logits(logits, truncated: bool = False):
    """Entropy of softmax(logits) along the last dimension, H = logsumexp(l) - sum softmax(l) l,
    stable for large logits. [..., V] -> [...]. With ``truncated`` a logit may be -inf (a token a
    top-k/top-p truncation removed): it adds nothing (one [..., V] temporary more, so only then)."""
    if not truncated:
        return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    p = torch.softmax(logits, dim=-1)
    finite = torch.where(p > 0, logits, 0.0)  # not p * -inf: its gradient would be NaN
    return torch.logsumexp(logits, dim=-1) - (p * finite).sum(-1)


# --- KL coefficient controllers -------------------------------------------------------------------

class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593, section 2.2):

        e      = clip(KL / target - 1, -0.2, 0.2)
        beta  *= 1 + e * n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int):
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient, with AdaptiveKLController's interface."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int):
        pass
