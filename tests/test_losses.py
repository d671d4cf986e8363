"""Each loss against an independent float reference: its equation written out with ``math``, pair by pair."""

import math
import random

import pytest
import torch

from losses.preference import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, simpo_loss
from losses.sft import sft_loss

SEEDS = [0, 1, 2, 3, 4]
N = 8  # pairs per micro-batch
TOL = dict(rtol=1e-10, atol=1e-12)


def uniform(rng, lo, hi, n=N):
    return [rng.uniform(lo, hi) for _ in range(n)]


def t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def close(actual, expected):
    torch.testing.assert_close(actual.detach(), t(expected), **TOL)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- float references ---------------------------------------------------------------------------

def dpo_ref(pc, pr, rc, rr, beta, eps=0.0):
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - c) - (b - d)
        out.append(-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
    return out


def kto_ref(pc, pr, rc, rr, beta, wd, wu, z0=None):
    """The paper's loss (Ethayarajh et al. 2024, eq. 8; TRL's KTOTrainer): one example per reply, the
    chosen ones desirable, the rejected ones undesirable, and the loss the MEAN over all 2N of them:
    L = 1/2N [sum_c w_D (1 - sigmoid(beta (r_c - z0))) + sum_r w_U (1 - sigmoid(beta (z0 - r_r)))]."""
    lc = [a - c for a, c in zip(pc, rc)]
    lr = [b - d for b, d in zip(pr, rr)]
    if z0 is None:
        z0 = max(0.0, sum(lc + lr) / (2 * len(lc)))
    examples = [wd * (1 - sigmoid(beta * (x - z0))) for x in lc] + [wu * (1 - sigmoid(beta * (z0 - y))) for y in lr]
    return sum(examples) / len(examples)


# --- DPO ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.1), (0.3, 0.25)])
def test_dpo(seed, beta, eps):
    rng = random.Random(seed)
    pc, pr, rc, rr = (uniform(rng, -60, -1) for _ in range(4))
    losses, cr, rj = dpo_loss(t(pc), t(pr), t(rc), t(rr), beta, label_smoothing=eps)
    close(losses, dpo_ref(pc, pr, rc, rr, beta, eps))
    close(cr, [beta * (a - c) for a, c in zip(pc, rc)])
    close(rj, [beta * (b - d) for b, d in zip(pr, rr)])


@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_reference_free(seed):
    rng = random.Random(seed)
    pc, pr = uniform(rng, -60, -1), uniform(rng, -60, -1)
    zeros = [0.0] * N
    losses, cr, rj = dpo_loss(t(pc), t(pr), t(zeros), t(zeros), 0.1)
    close(losses, [-log_sigmoid(0.1 * (a - b)) for a, b in zip(pc, pr)])
    close(cr, [0.1 * a for a in pc])
    close(rj, [0.1 * b for b in pr])


def test_dpo_hand_computed():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = (-10 + 11) - (-12 + 11) = 1 - (-1) = 2;  beta h = 0.2
    # loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1 + 0.8187307530779818) = log(1.8187307530779818)
    #      = 0.5981388693815918
    # dL/dpi_c = -beta sigmoid(-beta h) = -0.1 / (1 + e^0.2) = -0.1 / 2.2214027581601699 = -0.04501660026875222
    pi_c, pi_r = t([-10.0], grad=True), t([-12.0], grad=True)
    losses, cr, rj = dpo_loss(pi_c, pi_r, t([-11.0]), t([-11.0]), beta=0.1)
    close(losses, [0.5981388693815918])
    close(cr, [0.1])  # 0.1 * (-10 + 11)
    close(rj, [-0.1])  # 0.1 * (-12 + 11)
    losses.sum().backward()
    close(pi_c.grad, [-0.04501660026875222])
    close(pi_r.grad, [0.04501660026875222])


@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_gradient_direction(seed):
    rng = random.Random(seed)
    pc, pr = t(uniform(rng, -60, -1), grad=True), t(uniform(rng, -60, -1), grad=True)
    losses, _, _ = dpo_loss(pc, pr, t(uniform(rng, -60, -1)), t(uniform(rng, -60, -1)), 0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


# --- IPO, SimPO, ORPO ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_ipo(seed, beta):
    rng = random.Random(seed)
    ac, ar, rc, rr = (uniform(rng, -4, -0.05) for _ in range(4))
    losses, cr, rj = ipo_loss(t(ac), t(ar), t(rc), t(rr), beta)
    close(losses, [((a - c) - (b - d) - 1 / (2 * beta)) ** 2 for a, b, c, d in zip(ac, ar, rc, rr)])
    close(cr, [beta * (a - c) for a, c in zip(ac, rc)])
    close(rj, [beta * (b - d) for b, d in zip(ar, rr)])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4), (10.0, 0.0)])
def test_simpo(seed, beta, gamma):
    rng = random.Random(seed)
    ac, ar = uniform(rng, -4, -0.05), uniform(rng, -4, -0.05)
    losses, cr, rj = simpo_loss(t(ac), t(ar), beta, gamma)
    close(losses, [-log_sigmoid(beta * a - beta * b - gamma) for a, b in zip(ac, ar)])
    close(cr, [beta * a for a in ac])
    close(rj, [beta * b for b in ar])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 0.25, 1.0])
def test_orpo(seed, beta):
    rng = random.Random(seed)
    ac, ar = uniform(rng, -4, -0.05), uniform(rng, -4, -0.05)
    losses, cr, rj = orpo_loss(t(ac), t(ar), beta)
    expected = []
    for a, b in zip(ac, ar):
        log_odds_c = a - math.log(1 - math.exp(a))  # log(p / (1 - p)) with p = e^avg
        log_odds_r = b - math.log(1 - math.exp(b))
        expected.append(-a - beta * log_sigmoid(log_odds_c - log_odds_r))
    close(losses, expected)
    close(cr, [beta * a for a in ac])
    close(rj, [beta * b for b in ar])


# --- KTO ----------------------------------------------------------------------------------------

def kto_inputs(seed, z0_sign):
    """Random log-probs, with the references shifted so the mean log-ratio has the sign asked for."""
    rng = random.Random(seed)
    pc, pr, rc, rr = (uniform(rng, -60, -1) for _ in range(4))
    mean = (sum(pc) + sum(pr) - sum(rc) - sum(rr)) / (2 * N)
    shift = mean - z0_sign * rng.uniform(0.5, 5)  # ref += shift makes the mean log-ratio +-(0.5..5)
    return pc, pr, [x + shift for x in rc], [x + shift for x in rr]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("z0_sign", [1, -1])
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.3, 1.0, 1.33)])
def test_kto(seed, z0_sign, beta, wd, wu):
    pc, pr, rc, rr = kto_inputs(seed, z0_sign)
    losses, cr, rj = kto_loss(t(pc), t(pr), t(rc), t(rr), beta, wd, wu)
    # the trainer divides the summed per-pair losses by the number of pairs
    close(losses.sum() / N, kto_ref(pc, pr, rc, rr, beta, wd, wu))
    if z0_sign < 0:  # the clamp: a negative mean log-ratio gives z0 = 0, not the mean
        close(losses.sum() / N, kto_ref(pc, pr, rc, rr, beta, wd, wu, z0=0.0))
    close(cr, [beta * (a - c) for a, c in zip(pc, rc)])
    close(rj, [beta * (b - d) for b, d in zip(pr, rr)])


@pytest.mark.parametrize("seed", SEEDS)
def test_kto_gradient_holds_z0_fixed(seed):
    pc, pr, rc, rr = kto_inputs(seed, 1)  # z0 > 0, so a gradient through it would show
    beta, wd, wu = 0.2, 1.0, 1.5
    z0 = (sum(pc) + sum(pr) - sum(rc) - sum(rr)) / (2 * N)
    x = t(pc, grad=True)
    (kto_loss(x, t(pr), t(rc), t(rr), beta, wd, wu)[0].sum() / N).backward()

    def total(i, d, z):
        return (kto_ref(pc[:i] + [pc[i] + d] + pc[i + 1:], pr, rc, rr, beta, wd, wu, z0=z))

    step = 1e-5
    fixed = [(total(i, step, z0) - total(i, -step, z0)) / (2 * step) for i in range(N)]
    fd_tol = dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(x.grad, t(fixed), **fd_tol)
    # analytically: d/dpi_c of 1/2N w_D (1 - sigmoid(beta (r_c - z0))) = -w_D beta s (1 - s) / 2N
    s = [sigmoid(beta * (a - c - z0)) for a, c in zip(pc, rc)]
    close(x.grad, [-wd * beta * v * (1 - v) / (2 * N) for v in s])
    # ... and the check above tells it from the gradient with z0 moving along with pi_c
    moving = [(total(i, step, None) - total(i, -step, None)) / (2 * step) for i in range(N)]
    assert not torch.allclose(x.grad, t(moving), **fd_tol)


# --- Bradley-Terry, SFT -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("margin", [None, 0.0, 1.5, "per-pair"])
def test_bradley_terry(seed, margin):
    rng = random.Random(seed)
    c, r = uniform(rng, -5, 5), uniform(rng, -5, 5)
    margins = uniform(rng, 0, 3) if margin == "per-pair" else [margin or 0.0] * N
    if margin is None:
        losses = bradley_terry_loss(t(c), t(r))
    else:
        losses = bradley_terry_loss(t(c), t(r), t(margins) if margin == "per-pair" else margin)
    # log(1 + exp(r_r - r_c + m)), written the other way from the implementation's -log sigmoid
    close(losses, [math.log1p(math.exp(b - a + m)) for a, b, m in zip(c, r, margins)])


@pytest.mark.parametrize("seed", SEEDS)
def test_sft(seed):
    rng = random.Random(seed)
    shape = (3, 11)
    logps = [[rng.uniform(-12, -0.01) for _ in range(shape[1])] for _ in range(shape[0])]
    mask = [[float(rng.random() < 0.6) for _ in range(shape[1])] for _ in range(shape[0])]
    expected = 0.0
    for row_l, row_m in zip(logps, mask):
        for lp, m in zip(row_l, row_m):
            if m:
                expected -= lp
    torch.testing.assert_close(sft_loss(t(logps), t(mask)), t(expected), **TOL)
