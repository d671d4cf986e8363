"""Preference losses on per-sequence log-probabilities, one value per pair (the trainer sums them).

Notation: ``pi_c``, ``pi_r`` are the policy's log p(y_c|x), log p(y_r|x) summed over response
tokens; ``ref_c``, ``ref_r`` the same under the frozen reference model; ``avg_c``, ``avg_r`` the
policy's per-token averages (sum / number of response tokens). Each function returns
``(losses, chosen_rewards, rejected_rewards)``, the rewards being the implicit rewards the method
defines, detached, for the usual ``rewards/*`` metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, arXiv:2305.18290) and conservative DPO (cDPO, label smoothing eps):

        h = (pi_c - ref_c) - (pi_r - ref_r)
        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    ``reference_free`` DPO is this with ``ref_c = ref_r = 0``.
    """
    h = (pi_c - ref_c) - (pi_r - ref_r)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach()


def ipo_loss(avg_c, avg_r, ref_avg_c, ref_avg_r, tau: float):
    """IPO (Azar et al. 2023, arXiv:2310.12036), on per-token average log-probs as in the paper's
    experiments and TRL:

        h = (avg_c - ref_avg_c) - (avg_r - ref_avg_r)
        L = (h - 1 / (2 tau))^2
    """
    h = (avg_c - ref_avg_c) - (avg_r - ref_avg_r)
    losses = (h - 1 / (2 * tau)) ** 2
    return losses, (tau * (avg_c - ref_avg_c)).detach(), (tau * (avg_r - ref_avg_r)).detach()


def simpo_loss(avg_c, avg_r, beta: float, gamma: float):
    """SimPO (Meng et al. 2024, arXiv:2405.14734): reference-free, length-normalised, with a margin:

        L = -log sigmoid(beta avg_c - beta avg_r - gamma)

    ``gamma`` is the margin itself (TRL's ``gamma_beta_ratio`` is gamma / beta); the config calls
    beta ``loss.reward_scale`` and gamma ``loss.target_margin``.
    """
    losses = -F.logsigmoid(beta * avg_c - beta * avg_r - gamma)
    return losses, (beta * avg_c).detach(), (beta * avg_r).detach()


def kto_loss(pi_c, pi_r, ref_c, ref_r, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306) with each pair's chosen reply as a desirable
    example and its rejected reply as an undesirable one:

        r_c = pi_c - ref_c,  r_r = pi_r - ref_r
        z0  = max(0, mean over the micro-batch of (r_c + r_r) / 2), detached
        L   = [w_D (1 - sigmoid(beta (r_c - z0))) + w_U (1 - sigmoid(beta (z0 - r_r)))] / 2

    The paper's loss is the mean over examples, and a pair is two examples: hence the 1/2, so that
    the trainer's mean over pairs is the paper's (and TRL's) mean over replies.

    The paper estimates the reference point z0 (the policy/reference KL) from mismatched
    prompt-completion pairs; here it is the micro-batch mean of the log-ratios of the batch's own
    completions, which needs no extra forward pass. Like the paper, no gradient flows through z0.
    Because z0 depends on which pairs share a micro-batch, KTO (alone here) is not exactly
    invariant to the number of ranks and accumulation steps.
    """
    r_c, r_r = pi_c - ref_c, pi_r - ref_r
    z0 = torch.cat([r_c, r_r]).mean().clamp(min=0).detach()
    losses = (desirable_weight * (1 - torch.sigmoid(beta * (r_c - z0))) + undesirable_weight * (
        1 - torch.sigmoid(beta * (z0 - r_r)))) / 2
    return losses, (beta * r_c).detach(), (beta * r_r).detach()


def orpo_loss(avg_c, avg_r, beta: float):
    """ORPO (Hong et al. 2024, arXiv:2403.07691): SFT on the chosen reply plus an odds-ratio term,
    with no reference model. With log odds(y) = avg - log(1 - exp(avg)):

        L = -avg_c - beta log sigmoid(log odds(y_c) - log odds(y_r))

    (the paper's lambda; ``loss.odds_ratio_weight`` in the config)."""
    def log1m_exp(avg):  # log(1 - exp(avg)), accurate near 0 and finite at 0 (a memorised reply)
        return torch.log(-torch.expm1(avg.clamp(max=-1e-6)))

    log_odds = (avg_c - avg_r) - (log1m_exp(avg_c) - log1m_exp(avg_r))
    losses = -avg_c - beta * F.logsigmoid(log_odds)
    return losses, (beta * avg_c).detach(), (beta * avg_r).detach()


def bradley_terry_loss(r_c, r_r, margin=0.0):
    """Reward-model loss (Bradley-Terry; Ouyang et al. 2022), with an optional margin (Llama 2):

        L = -log sigmoid(r_c - r_r - margin) = log(1 + exp(r_r - r_c + margin))

    Seed 000's ``logexpwithlm`` is this plus ``lm_coef`` times the chosen reply's LM loss.
    Returns the per-pair losses only: the rewards are the model's outputs themselves.
    """
    return -F.logsigmoid(r_c - r_r - margin)
