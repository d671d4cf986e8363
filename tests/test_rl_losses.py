"""Each RL function against an independent float reference: its equation written out with ``math``,
row by row and token by token, on ragged rows whose padding holds garbage (so any leak shows)."""

import math
import random

import pytest
import torch

from losses.rl import (AdaptiveKLController, FixedKLController, aggregation_units, aggregation_weights, cispo_loss,
                       discounted_returns, entropy_from_logits, explained_variance, gae, generalized_jsd,
                       grpo_advantages, gspo_loss,
                       kl_penalty, masked_mean, masked_whiten, ppo_policy_loss, reinforce_pp_advantages, rloo_advantages,
                       sapo_loss, sequence_ppo_loss, token_rewards, truncated_is_weight, value_loss)

SEEDS = [0, 1, 2, 3, 4]
B, T = 6, 9
TOL = dict(rtol=1e-10, atol=1e-12)


def t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.detach(), t(expected), **(tol or TOL))


def ragged(rng):
    """Row lengths in 1..T, always with a full row and a one-token row."""
    lens = [T, 1] + [rng.randint(1, T) for _ in range(B - 2)]
    rng.shuffle(lens)
    return lens


def mask_of(lens):
    return [[1.0 if j < n else 0.0 for j in range(T)] for n in lens]


def tokens(rng, lens, lo, hi):
    """Random values on response tokens, garbage on padding."""
    return [[rng.uniform(lo, hi) if j < n else rng.uniform(-40, 40) for j in range(T)] for n in lens]


def padded(rows):
    """Per-row lists of response-token values -> [B][T] with 0 on padding."""
    return [r + [0.0] * (T - len(r)) for r in rows]


def mean_var(xs):
    m = sum(xs) / len(xs)
    return m, sum((x - m) ** 2 for x in xs) / len(xs)


def response_values(x, lens):
    return [v for row, n in zip(x, lens) for v in row[:n]]


def returns_to_go(r, gamma):
    """G_t = sum_{k >= t} gamma^(k - t) r_k, written as the forward sum."""
    return [sum(gamma ** (k - i) * r[k] for k in range(i, len(r))) for i in range(len(r))]


# --- KL estimators --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty(seed, kind):
    rng = random.Random(seed)
    lp = [[rng.uniform(-8, -0.01) for _ in range(T)] for _ in range(B)]
    ref = [[rng.uniform(-8, -0.01) for _ in range(T)] for _ in range(B)]
    formula = {"k1": lambda a, b: a - b,
               "k2": lambda a, b: 0.5 * (a - b) ** 2,
               "k3": lambda a, b: math.exp(b - a) - (b - a) - 1}[kind]
    close(kl_penalty(t(lp), t(ref), kind), [[formula(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(lp, ref)])


def test_kl_penalty_unknown_kind():
    with pytest.raises(ValueError):
        kl_penalty(t([0.0]), t([0.0]), "k4")


def test_k3_non_negative():
    # log-ratios from tiny (where exp(x) - x - 1 cancels catastrophically) to large, both signs
    xs = [s * 10.0 ** e for e in range(-12, 2) for s in (1, -1)] + [0.0]
    k3 = kl_penalty(t([0.0] * len(xs)), t(xs), "k3")
    assert (k3 >= 0).all()
    close(k3, [math.expm1(x) - x for x in xs], rtol=1e-6, atol=0.0)


P = [0.5, 0.2, 0.15, 0.1, 0.05]  # the policy
Q = [0.1, 0.2, 0.2, 0.25, 0.25]  # the reference
KL_PQ = sum(p * math.log(p / q) for p, q in zip(P, Q))  # 0.589...; KL(Q||P) = 0.528...


def test_k1_k3_are_unbiased_exactly():
    """E_{x~p}[k(x)] = sum_x p(x) k(x) = KL(p || q) for k1 and k3, summed over the whole support."""
    lp, lq = t([math.log(p) for p in P]), t([math.log(q) for q in Q])
    for kind in ("k1", "k3"):
        torch.testing.assert_close((t(P) * kl_penalty(lp, lq, kind)).sum(), t(KL_PQ), **TOL)


def test_k3_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(t(P), 200_000, replacement=True, generator=gen)
    k3 = kl_penalty(t([math.log(p) for p in P])[x], t([math.log(q) for q in Q])[x], "k3")
    assert (k3 >= 0).all()
    stderr = (k3.std() / math.sqrt(len(k3))).item()  # ~0.001; KL(p||q) - KL(q||p) is ~60 of them
    assert abs(k3.mean().item() - KL_PQ) < 5 * stderr


# --- rewards, masked statistics -------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_token_rewards(seed):
    rng = random.Random(seed)
    lens = ragged(rng)
    kl, scores, coef = tokens(rng, lens, -1, 1), [rng.uniform(-3, 3) for _ in range(B)], rng.uniform(0.01, 0.5)
    expected = []
    for row, n, s in zip(kl, lens, scores):
        r = [-coef * row[j] for j in range(n)]
        r[n - 1] += s  # the score goes on the last response token
        expected.append(r)
    close(token_rewards(t(scores), t(kl), t(mask_of(lens)), coef), padded(expected))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_masked_mean(seed, dim):
    rng = random.Random(seed)
    lens = ragged(rng)
    x = tokens(rng, lens, -5, 5)
    if dim is None:
        expected = sum(response_values(x, lens)) / sum(lens)
    elif dim == 1:
        expected = [sum(row[:n]) / n for row, n in zip(x, lens)]
    else:
        expected = [sum(x[i][j] for i in range(B) if j < lens[i]) / sum(1 for n in lens if j < n) for j in range(T)]
    close(masked_mean(t(x), t(mask_of(lens)), dim), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(seed, shift_mean):
    rng = random.Random(seed)
    lens = ragged(rng)
    x = tokens(rng, lens, -5, 20)
    m, v = mean_var(response_values(x, lens))
    expected = [[(a - m) / math.sqrt(v + 1e-8) + (0 if shift_mean else m) for a in row[:n]] for row, n in zip(x, lens)]
    close(masked_whiten(t(x), t(mask_of(lens)), shift_mean), padded(expected))


@pytest.mark.parametrize("seed", SEEDS)
def test_explained_variance(seed):
    rng = random.Random(seed)
    lens = ragged(rng)
    values, rets, mask = tokens(rng, lens, -2, 2), tokens(rng, lens, -2, 2), t(mask_of(lens))
    diffs = [r - v for rr, vv, n in zip(rets, values, lens) for r, v in zip(rr[:n], vv[:n])]
    expected = 1 - mean_var(diffs)[1] / mean_var(response_values(rets, lens))[1]
    torch.testing.assert_close(explained_variance(t(values), t(rets), mask), t(expected), **TOL)
    torch.testing.assert_close(explained_variance(t(rets), t(rets), mask), t(1.0), **TOL)  # a perfect critic
    m = sum(response_values(rets, lens)) / sum(lens)  # a critic predicting the mean explains nothing
    torch.testing.assert_close(explained_variance(torch.full((B, T), m, dtype=torch.float64), t(rets), mask),
                               t(0.0), **TOL)


# --- returns and advantages -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns(seed, gamma):
    rng = random.Random(seed)
    lens = ragged(rng)
    r = tokens(rng, lens, -1, 1)
    expected = [returns_to_go(row[:n], gamma) for row, n in zip(r, lens)]
    close(discounted_returns(t(r), t(mask_of(lens)), gamma), padded(expected))


def gae_ref(r, v, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V_n = 0 (forward sums)."""
    n = len(r)
    vn = v + [0.0]
    delta = [r[i] + gamma * vn[i + 1] - vn[i] for i in range(n)]
    adv = [sum((gamma * lam) ** (k - i) * delta[k] for k in range(i, n)) for i in range(n)]
    return adv, [a + b for a, b in zip(adv, v)]


def gae_inputs(seed):
    rng = random.Random(seed)
    lens = ragged(rng)
    return lens, tokens(rng, lens, -1, 1), tokens(rng, lens, -2, 2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae(seed, gamma, lam):
    lens, r, v = gae_inputs(seed)
    refs = [gae_ref(rr[:n], vv[:n], gamma, lam) for rr, vv, n in zip(r, v, lens)]
    adv, ret = gae(t(r), t(v), t(mask_of(lens)), gamma, lam)
    close(adv, padded([a for a, _ in refs]))
    close(ret, padded([b for _, b in refs]))


@pytest.mark.parametrize("seed", SEEDS)
def test_gae_lam1_gamma1_is_return_to_go_minus_values(seed):
    lens, r, v = gae_inputs(seed)
    adv, ret = gae(t(r), t(v), t(mask_of(lens)), 1.0, 1.0)
    close(adv, padded([[sum(rr[i:n]) - vv[i] for i in range(n)] for rr, vv, n in zip(r, v, lens)]))
    close(ret, padded([[sum(rr[i:n]) for i in range(n)] for rr, n in zip(r, lens)]))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.5])
def test_gae_lam0_is_one_step_td(seed, gamma):
    lens, r, v = gae_inputs(seed)
    adv, _ = gae(t(r), t(v), t(mask_of(lens)), gamma, 0.0)
    expected = [[rr[i] + gamma * (vv[i + 1] if i + 1 < n else 0.0) - vv[i] for i in range(n)]
                for rr, vv, n in zip(r, v, lens)]
    close(adv, padded(expected))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lam1_returns_are_discounted_returns(seed, gamma):
    lens, r, v = gae_inputs(seed)
    mask = t(mask_of(lens))
    torch.testing.assert_close(gae(t(r), t(v), mask, gamma, 1.0)[1], discounted_returns(t(r), mask, gamma), **TOL)


def grpo_ref(scores, k, scale, eps):
    out = []
    for g in range(0, len(scores), k):
        group = scores[g:g + k]
        m = sum(group) / k
        std = math.sqrt(sum((s - m) ** 2 for s in group) / (k - 1)) if k > 1 else 0.0  # unbiased
        out += [(s - m) / (std + eps) if scale else s - m for s in group]
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages(seed, k, scale):
    rng = random.Random(seed)
    scores = [rng.uniform(-2, 2) for _ in range(3 * k)]
    close(grpo_advantages(t(scores), k, scale=scale, eps=1e-4), grpo_ref(scores, k, scale, 1e-4))


def test_grpo_hand_made_groups():
    scores = t([0.0, 0.0, 0.0, 1.0,  # mean 1/4, unbiased var (3/16 + 9/16) / 3 = 1/4, std 1/2
                1.0, 0.0, 0.0, 1.0,  # mean 1/2, unbiased std sqrt(1/3) (the biased one, 1/2, would give +-1)
                0.3, 0.3, 0.3, 0.3])  # all equal: advantage 0, not 0/0
    a = grpo_advantages(scores, 4)
    assert not a.isnan().any()
    s3 = math.sqrt(1 / 3) + 1e-6
    close(a, [-0.25 / 0.500001] * 3 + [0.75 / 0.500001] + [0.5 / s3, -0.5 / s3, -0.5 / s3, 0.5 / s3] + [0.0] * 4,
          rtol=1e-12, atol=1e-9)
    close(grpo_advantages(scores, 4, scale=False), [-0.25] * 3 + [0.75] + [0.5, -0.5, -0.5, 0.5] + [0.0] * 4,
          rtol=1e-12, atol=1e-12)


def test_grpo_group_size_one_and_bad_sizes():
    for scale in (True, False):
        a = grpo_advantages(t([3.0, -1.0, 0.5]), 1, scale=scale)
        assert not a.isnan().any()
        close(a, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        grpo_advantages(t([1.0, 2.0, 3.0]), 2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [2, 3, 8])
def test_rloo_advantages(seed, k):
    rng = random.Random(seed)
    scores = [rng.uniform(-2, 2) for _ in range(4 * k)]
    expected = []
    for g in range(0, len(scores), k):
        for i in range(g, g + k):
            others = [scores[j] for j in range(g, g + k) if j != i]
            expected.append(scores[i] - sum(others) / len(others))
    a = rloo_advantages(t(scores), k)
    close(a, expected)
    torch.testing.assert_close(a.reshape(-1, k).sum(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rloo_hand_made_groups():
    a = rloo_advantages(t([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0]), 4)
    close(a, [1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        rloo_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError):
        rloo_advantages(t([1.0, 2.0, 3.0]), 2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_reinforce_pp_advantages(seed, gamma):
    rng = random.Random(seed)
    lens = ragged(rng)
    kl, scores, coef = tokens(rng, lens, -0.5, 1), [rng.uniform(-3, 3) for _ in range(B)], 0.05
    rets = []
    for row, n, s in zip(kl, lens, scores):
        r = [-coef * row[j] + (s if j == n - 1 else 0.0) for j in range(n)]
        rets.append(returns_to_go(r, gamma))
    m, v = mean_var([g for row in rets for g in row])
    expected = [[(g - m) / math.sqrt(v + 1e-8) for g in row] for row in rets]
    mask = t(mask_of(lens))
    close(reinforce_pp_advantages(token_rewards(t(scores), t(kl), mask, coef), mask, gamma), padded(expected))


# --- PPO policy loss, importance weights ----------------------------------------------------------

def ppo_ref(lp, olp, adv, lens, cl, ch, w=None):
    """Per-token loss, d loss / d logp, clipfrac, approx_kl, written out token by token."""
    loss, grad, n_clipped, kl = [], [], 0, []
    for i, n in enumerate(lens):
        lrow, grow = [], []
        for j in range(n):
            r, a, wt = math.exp(lp[i][j] - olp[i][j]), adv[i][j], (w[i][j] if w else 1.0)
            unclipped, clipped = r * a, min(max(r, 1 - cl), 1 + ch) * a
            is_clipped = clipped < unclipped  # min picks the clipped branch: its gradient is 0
            n_clipped += is_clipped
            lrow.append(-min(unclipped, clipped) * wt)
            grow.append(0.0 if is_clipped else -a * r * wt)
            kl.append(0.5 * (lp[i][j] - olp[i][j]) ** 2)
        loss.append(lrow)
        grad.append(grow)
    return padded(loss), padded(grad), n_clipped / sum(lens), sum(kl) / len(kl)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cl,ch", [(0.2, None), (0.2, 0.28), (0.1, 0.3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_ppo_policy_loss(seed, cl, ch, weighted):
    rng = random.Random(seed)
    lens = ragged(rng)
    olp = tokens(rng, lens, -6, -0.1)
    lp = [[o + rng.uniform(-0.5, 0.5) for o in row] for row in olp]  # ratios in [0.6, 1.65]
    adv = tokens(rng, lens, -2, 2)
    w = tokens(rng, lens, 0.5, 2) if weighted else None
    x = t(lp, grad=True)
    loss, metrics = ppo_policy_loss(x, t(olp), t(adv), t(mask_of(lens)), cl, ch,
                                    is_weight=t(w) * t(mask_of(lens)) if weighted else None)
    e_loss, e_grad, e_clipfrac, e_kl = ppo_ref(lp, olp, adv, lens, cl, cl if ch is None else ch, w)
    close(loss, e_loss)
    close(metrics["clipfrac"], e_clipfrac)
    close(metrics["approx_kl"], e_kl)
    assert 0 < e_clipfrac < 1  # the inputs exercise both branches
    assert not any(m.requires_grad for m in metrics.values())
    loss.sum().backward()
    close(x.grad, e_grad)


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_at_ratio_one_is_minus_advantage(seed):
    rng = random.Random(seed)
    lens = ragged(rng)
    lp, adv = tokens(rng, lens, -6, -0.1), tokens(rng, lens, -2, 2)
    old = [[a if j < n else rng.uniform(-40, 40) for j, a in enumerate(row)] for row, n in zip(lp, lens)]
    loss, metrics = ppo_policy_loss(t(lp), t(old), t(adv), t(mask_of(lens)), 0.2)
    close(loss, padded([[-a for a in row[:n]] for row, n in zip(adv, lens)]))
    close(metrics["clipfrac"], 0.0)
    close(metrics["approx_kl"], 0.0)


def test_ppo_clipping_hand_made():
    """eps_low = 0.2, eps_high = 0.28: the clip binds above 1.28 for A > 0 and below 0.8 for A < 0."""
    ratios = [0.7, 0.79, 0.81, 1.0, 1.27, 1.29, 1.5]
    lp = t([[math.log(r) for r in ratios]] * 2, grad=True)
    adv = t([[1.0] * 7, [-1.0] * 7])
    loss, metrics = ppo_policy_loss(lp, torch.zeros(2, 7, dtype=torch.float64), adv, torch.ones(2, 7), 0.2, 0.28)
    # A = +1: L = -min(r, clip(r)); A = -1: L = max(r, clip(r))
    close(loss, [[-0.7, -0.79, -0.81, -1.0, -1.27, -1.28, -1.28],
                 [0.8, 0.8, 0.81, 1.0, 1.27, 1.29, 1.5]])
    close(metrics["clipfrac"], 4 / 14)
    loss.sum().backward()
    # dL/dlogp = -A r where the unclipped branch is active, exactly 0 on the clipped tokens
    close(lp.grad, [[-0.7, -0.79, -0.81, -1.0, -1.27, 0.0, 0.0],
                    [0.0, 0.0, 0.81, 1.0, 1.27, 1.29, 1.5]])


def test_ppo_clip_high_defaults_to_clip_low():
    lp, old, adv, mask = t([[math.log(1.25)]]), t([[0.0]]), t([[1.0]]), t([[1.0]])
    close(ppo_policy_loss(lp, old, adv, mask, 0.2)[0], [[-1.2]])  # clipped at 1 + 0.2
    close(ppo_policy_loss(lp, old, adv, mask, 0.2, 0.28)[0], [[-1.25]])  # inside the clip-higher range


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_sequence_advantages_broadcast(seed):
    rng = random.Random(seed)
    lens = ragged(rng)
    olp = tokens(rng, lens, -6, -0.1)
    lp = [[o + rng.uniform(-0.5, 0.5) for o in row] for row in olp]
    seq_adv = [rng.uniform(-2, 2) for _ in range(B)]
    loss, _ = ppo_policy_loss(t(lp), t(olp), t(seq_adv), t(mask_of(lens)), 0.2)
    close(loss, ppo_ref(lp, olp, [[a] * T for a in seq_adv], lens, 0.2, 0.2)[0])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cap", [1.5, 2.0, 10.0])
def test_truncated_is_weight(seed, cap):
    rng = random.Random(seed)
    lens = ragged(rng)
    olp = tokens(rng, lens, -6, -0.1)
    slp = [[o + rng.uniform(-1, 1) for o in row] for row in olp]  # the sampler's log-probs
    expected = [[min(math.exp(o - s), cap) if j < n else 1.0 for j, (o, s) in enumerate(zip(ro, rs))]
                for ro, rs, n in zip(olp, slp, lens)]
    x = t(olp, grad=True)
    w = truncated_is_weight(x, t(slp), cap, t(mask_of(lens)))
    close(w, expected)
    assert not w.requires_grad
    unmasked = truncated_is_weight(x, t(slp), cap)  # no mask: the same on response tokens
    close(unmasked * t(mask_of(lens)), [[e * m for e, m in zip(re, rm)] for re, rm in zip(expected, mask_of(lens))])


# --- value loss, entropy --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip", [None, 0.2, 1.0])
def test_value_loss(seed, clip):
    rng = random.Random(seed)
    lens = ragged(rng)
    old, rets = tokens(rng, lens, -2, 2), tokens(rng, lens, -2, 2)
    v = [[o + rng.uniform(-1, 1) for o in row] for row in old]
    expected = []
    for rv, ro, rr, n in zip(v, old, rets, lens):
        row = []
        for j in range(n):
            plain = (rv[j] - rr[j]) ** 2
            vc = min(max(rv[j], ro[j] - clip), ro[j] + clip) if clip is not None else rv[j]
            row.append(0.5 * max(plain, (vc - rr[j]) ** 2))
        expected.append(row)
    close(value_loss(t(v), t(old), t(rets), t(mask_of(lens)), clip), padded(expected))


def test_value_loss_clipping_hand_made():
    # old = 0, clip 0.2, R = 1 (R = 0.5 in the last case)
    v = t([[0.5, 0.1, -0.5, 1.5, -0.1]], grad=True)
    loss = value_loss(v, torch.zeros(1, 5, dtype=torch.float64), t([[1.0, 1.0, 1.0, 1.0, 0.5]]), t([[1.0] * 5]), 0.2)
    close(loss, [[0.5 * 0.8 ** 2,  # v_clip = 0.2 is further from R than v: the clipped term binds
                  0.5 * 0.9 ** 2,  # inside the clip range: plain
                  0.5 * 1.5 ** 2,  # v moved away from R: the plain term is the larger one
                  0.5 * 0.8 ** 2,  # overshot R: v_clip = 0.2 binds
                  0.5 * 0.6 ** 2]])  # inside the range
    loss.sum().backward()
    close(v.grad, [[0.0, -0.9, -1.5, 0.0, -0.6]])  # zero where the clipped term binds
    close(value_loss(v, torch.zeros(1, 5), t([[1.0] * 5]), t([[1.0] * 5]), None),
          [[0.5 * x ** 2 for x in (0.5, 0.9, 1.5, 0.5, 1.1)]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_entropy_from_logits(seed, scale):
    rng = random.Random(seed)
    logits = [[[scale * rng.gauss(0, 1) for _ in range(11)] for _ in range(T)] for _ in range(B)]
    expected = []
    for row in logits:
        erow = []
        for l in row:
            m = max(l)
            lse = m + math.log(sum(math.exp(x - m) for x in l))
            erow.append(-sum(math.exp(x - lse) * (x - lse) for x in l))
        expected.append(erow)
    close(entropy_from_logits(t(logits)), expected)
    close(entropy_from_logits(t(logits) + 1e4), expected, rtol=1e-8, atol=1e-8)  # no overflow
    close(entropy_from_logits(torch.zeros(3, 11, dtype=torch.float64)), [math.log(11)] * 3)


# --- KL controllers -------------------------------------------------------------------------------

def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    coef = 0.2
    for kl, n in [(6.0, 256), (30.0, 256), (6.6, 512), (1.0, 256), (5.4, 128), (0.0, 1024)]:
        error = max(-0.2, min(0.2, kl / 6.0 - 1))  # 0, 0.2 (clipped from 4), 0.1, -0.2 (from -5/6), -0.1, -0.2
        coef *= 1 + error * n / 10000
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(coef, rel=1e-14)
    assert ctl.value != pytest.approx(0.2, rel=1e-3)  # it moved
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


# --- padding --------------------------------------------------------------------------------------

def test_padding_never_leaks():
    """Every function, run twice with different garbage on padding: identical outputs and gradients."""
    rng = random.Random(7)
    lens = ragged(rng)
    mask = t(mask_of(lens))
    base = {k: tokens(rng, lens, -3, -0.1) for k in ("lp", "olp", "slp", "ref", "adv", "v", "ov", "r")}
    scores = t([rng.uniform(-1, 1) for _ in range(B)])

    def run(fill_seed):
        g = random.Random(fill_seed)
        x = {k: torch.where(mask > 0, t(val), t([[g.uniform(-40, 40) for _ in range(T)] for _ in range(B)]))
             for k, val in base.items()}
        lp = x["lp"].clone().requires_grad_(True)
        v = x["v"].clone().requires_grad_(True)
        rewards = token_rewards(scores, kl_penalty(lp, x["ref"], "k3"), mask, 0.1)
        adv, rets = gae(rewards, v, mask, 0.99, 0.95)
        w = truncated_is_weight(x["olp"], x["slp"], 2.0, mask)
        pl, metrics = ppo_policy_loss(lp, x["olp"], adv, mask, 0.2, 0.28, is_weight=w)
        vl = value_loss(v, x["ov"], rets, mask, 0.2)
        (pl.sum() + vl.sum() + (rewards * mask).sum()).backward()
        return [rewards, adv, rets, w, pl, vl, metrics["clipfrac"], metrics["approx_kl"], lp.grad, v.grad,
                discounted_returns(x["r"], mask, 0.9), reinforce_pp_advantages(x["r"], mask),
                masked_whiten(x["r"], mask), masked_mean(x["r"], mask), masked_mean(x["r"], mask, 1),
                explained_variance(x["v"], x["r"], mask)]

    first, second = run(1), run(2)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for out in (first[0], first[1], first[2], first[4], first[5], first[8], first[9], first[10], first[11], first[12]):
        assert (out[mask == 0] == 0).all()
    assert (first[3][mask == 0] == 1).all()


# --- loss aggregation and RLOO's sequence-level loss, against the papers' objectives ----------------

def clipped_term(r, a, lo, hi):
    """min(r A, clip(r, 1 - lo, 1 + hi) A), written out for one token or one sequence."""
    return torch.minimum(r * a, torch.clamp(r, 1 - lo, 1 + hi) * a)


def aggregation_case(seed):
    rng = random.Random(seed)
    lens = ragged(rng)
    mask = t(mask_of(lens))
    logp = t(tokens(rng, lens, -3, -0.1), grad=True)
    old = t([[x + rng.uniform(-0.3, 0.3) for x in row] for row in logp.tolist()])
    adv = [rng.uniform(-2, 2) for _ in range(B)]  # one per sequence (GRPO, RLOO)
    seq_ids = torch.tensor([[b if j < n else -1 for j in range(T)] for b, n in enumerate(lens)])
    return lens, mask, logp, old, adv, seq_ids


def aggregated(logp, old, adv, mask, seq_ids, lens, how, t_max):
    """The project's path: per-token PPO loss, aggregation weights, divided by the batch's units."""
    per_token, _ = ppo_policy_loss(logp, old, t(adv), mask, 0.2, 0.28)
    units = sum(aggregation_units(n, how) for n in lens)
    return (per_token * aggregation_weights(mask, seq_ids, B, how, t_max)).sum() / units


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("how", ["token_mean", "sequence_mean", "constant"])
def test_loss_aggregation_is_the_papers_objective(seed, how):
    lens, mask, logp, old, adv, seq_ids = aggregation_case(seed)
    t_max = 12  # the generation budget, longer than any row here
    got = aggregated(logp, old, adv, mask, seq_ids, lens, how, t_max)
    (g_got,) = torch.autograd.grad(got, logp)
    # the objectives, token by token: -J
    terms = [[clipped_term(torch.exp(logp[i, j] - old[i, j]), adv[i], 0.2, 0.28) for j in range(n)]
             for i, n in enumerate(lens)]
    if how == "token_mean":  # DAPO eq. 8: 1 / sum_i |o_i| sum_i sum_t
        want = -sum(x for row in terms for x in row) / sum(lens)
    elif how == "sequence_mean":  # GRPO (DeepSeekMath eq. 3): 1/G sum_i 1/|o_i| sum_t
        want = -sum(sum(row) / len(row) for row in terms) / B
    else:  # Dr. GRPO: the 1/|o_i| removed, a constant normaliser (G x the generation budget) instead
        want = -sum(x for row in terms for x in row) / (B * t_max)
    (g_want,) = torch.autograd.grad(want, logp)
    close(got, want.item())
    torch.testing.assert_close(g_got, g_want, **TOL)
    assert (g_got[mask == 0] == 0).all()


def test_aggregations_differ_on_ragged_rows():
    """The three are different objectives (a test that cannot tell them apart is no test)."""
    lens, mask, logp, old, adv, seq_ids = aggregation_case(0)
    values = [aggregated(logp, old, adv, mask, seq_ids, lens, how, 12).item()
              for how in ("token_mean", "sequence_mean", "constant")]
    assert len({round(v, 6) for v in values}) == 3


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_sequence_loss_is_the_papers_estimator(seed):
    lens, mask, logp, old, adv, seq_ids = aggregation_case(seed)
    adv_tokens = t(adv)[:, None] * mask
    weight = t([[0.5 + 0.1 * i] * T for i in range(B)])
    per_seq, stats = sequence_ppo_loss(logp, old, adv_tokens, mask, seq_ids, B, 0.2, 0.28, is_weight=weight)
    got = per_seq.sum() / B  # aggregation_units: one per sequence
    (g_got,) = torch.autograd.grad(got, logp)
    # the completion as one action: its probability ratio prod_t pi / pi_old, clipped, times A_i
    want = 0
    for i, n in enumerate(lens):
        ratio = torch.exp(sum(logp[i, j] for j in range(n)) - sum(old[i, j] for j in range(n)))
        want = want - clipped_term(ratio, adv[i], 0.2, 0.28) * (0.5 + 0.1 * i)
    want = want / B
    (g_want,) = torch.autograd.grad(want, logp)
    close(got, want.item())
    torch.testing.assert_close(g_got, g_want, **TOL)
    # on-policy (old = logp) it is REINFORCE with the leave-one-out advantage: -1/k sum_i A_i grad log pi(o_i)
    on = sequence_ppo_loss(logp, logp.detach(), adv_tokens, mask, seq_ids, B, 0.2, 0.28)[0].sum() / B
    (g_on,) = torch.autograd.grad(on, logp)
    torch.testing.assert_close(g_on, t([[-adv[i] / B * m for m in row] for i, row in enumerate(mask_of(lens))]), **TOL)


def test_a_mask_with_holes_is_time_over_the_policy_tokens_alone():
    """A multi-turn episode's observation tokens (mask 0 between replies) are skipped: GAE, the
    return-to-go and the last-token reward equal those of the policy's tokens alone, laid back."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0]], dtype=torch.float32)
    rewards, values = torch.randn(1, 11), torch.randn(1, 11)
    keep = mask[0] > 0
    r, v = rewards[0, keep].tolist(), values[0, keep].tolist()
    gamma, lam, n = 0.9, 0.8, len(r)
    adv, running = [0.0] * n, 0.0  # the paper's recursion on the policy's tokens, V past the last = 0
    for t in reversed(range(n)):
        delta = r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t]
        running = delta + gamma * lam * running
        adv[t] = running
    got_adv, got_ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(got_adv[0, keep], torch.tensor(adv))
    torch.testing.assert_close(got_ret[0, keep], torch.tensor(adv) + values[0, keep])
    assert got_adv[0, ~keep].abs().sum() == 0
    g, ret = 0.0, [0.0] * n
    for t in reversed(range(n)):
        g = r[t] + gamma * g
        ret[t] = g
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma)[0, keep], torch.tensor(ret))
    last = token_rewards(torch.tensor([2.0]), torch.zeros(1, 11), mask, 0.0)
    assert last[0].tolist() == [0.0] * 8 + [2.0, 0.0, 0.0]


# --- the 2026 objectives: GSPO, CISPO, SAPO, each against its paper's formula ----------------------

def objective_case(seed, spread):
    """aggregation_case's sequences with pi_old within ``spread`` of pi per token, and a per-token
    importance weight; odd seeds' masks have holes (a multi-turn episode's observation tokens
    between the replies). ``lens`` becomes each sequence's trained tokens, ``at[i]`` their positions."""
    lens, mask, logp, _, adv, seq_ids = aggregation_case(seed)
    rng = random.Random(seed + 100)
    old = t([[x + rng.uniform(-spread, spread) for x in row] for row in logp.tolist()])
    weight = t([[rng.uniform(0.5, 1.5) for _ in range(T)] for _ in range(B)])
    if seed % 2:
        for i, n in enumerate(lens):
            for j in range(1, n - 1):  # the first and last tokens stay: a reply starts and ends the episode
                if rng.random() < 0.4:
                    mask[i, j] = 0.0
    at = [[j for j in range(T) if mask[i, j] > 0] for i in range(B)]
    return [len(a) for a in at], at, mask, logp, old, adv, seq_ids, weight


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_clips_the_geometric_mean_ratio_of_each_sequence(seed):
    """GSPO: s_i = exp(1/|y_i| sum_t (logp - old)), L_i = -min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i),
    averaged over sequences; values and gradients, both branches of the clip taken."""
    lens, at, mask, logp, old, adv, seq_ids, weight = objective_case(seed, 2e-3)
    adv_tokens = t(adv)[:, None] * mask
    per_seq, stats = gspo_loss(logp, old, adv_tokens, mask, seq_ids, B, 3e-4, 4e-4, is_weight=weight)
    got = per_seq.sum() / B
    want, clipped = 0, 0
    for i, n in enumerate(lens):
        s = torch.exp(sum(logp[i, j] - old[i, j] for j in at[i]) / n)
        w = sum(weight[i, j].item() for j in at[i]) / n
        want = want - clipped_term(s, adv[i], 3e-4, 4e-4) * w
        clipped += clipped_term(s, adv[i], 3e-4, 4e-4).item() != (s * adv[i]).item()
    want = want / B
    close(got, want.item())
    torch.testing.assert_close(torch.autograd.grad(got, logp)[0], torch.autograd.grad(want, logp)[0], **TOL)
    assert stats["clipfrac"].item() == pytest.approx(clipped / B)
    # on-policy: the gradient is -1/G sum_i A_i 1/|y_i| sum_t grad logp_it (the length-normalised REINFORCE)
    on = gspo_loss(logp, logp.detach(), adv_tokens, mask, seq_ids, B, 3e-4, 4e-4)[0].sum() / B
    want_grad = [[-adv[i] / (B * lens[i]) if j in at[i] else 0.0 for j in range(T)] for i in range(B)]
    torch.testing.assert_close(torch.autograd.grad(on, logp)[0], t(want_grad), **TOL)


def test_gspo_takes_both_branches_over_the_seeds():
    """The test above is not decided by one branch: over its seeds some sequences are clipped, some not."""
    fractions = []
    for seed in SEEDS:
        _, _, mask, logp, old, adv, seq_ids, _ = objective_case(seed, 2e-3)
        fractions.append(gspo_loss(logp, old, t(adv)[:, None] * mask, mask, seq_ids, B, 3e-4, 4e-4)[1]["clipfrac"].item())
    assert 0 < sum(fractions) / len(fractions) < 1, fractions


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_token_is_gspo_with_a_gradient_path_per_token(seed):
    """GSPO-token: s_it = sg(s_i) pi(y_it) / sg(pi(y_it)) has s_i's value at every token, and with
    the group advantage (A_it = A_i) its sequence-mean loss has GSPO's value and gradient."""
    lens, at, mask, logp, old, adv, seq_ids, weight = objective_case(seed, 2e-3)
    adv_tokens = t(adv)[:, None] * mask
    per_token, _ = gspo_loss(logp, old, adv_tokens, mask, seq_ids, B, 3e-4, 4e-4, token_level=True)
    per_seq, _ = gspo_loss(logp, old, adv_tokens, mask, seq_ids, B, 3e-4, 4e-4)
    for i in range(B):
        for j in range(T):
            expected = per_seq[i].item() if j in at[i] else 0.0
            assert per_token[i, j].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    token_form = (per_token * aggregation_weights(mask, seq_ids, B, "sequence_mean", T)).sum() / B
    close(token_form, (per_seq.sum() / B).item())
    torch.testing.assert_close(torch.autograd.grad(token_form, logp)[0],
                               torch.autograd.grad(per_seq.sum() / B, logp)[0], **TOL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip_low,clip_high", [(1.0, 0.28), (0.2, 0.2)])
def test_cispo_is_reinforce_weighted_by_the_clipped_detached_ratio(seed, clip_low, clip_high):
    """CISPO: L_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) A_t logp_t, token mean; every token
    keeps its gradient, -clip(r_t) A_t (PPO's is 0 outside its band)."""
    lens, at, mask, logp, old, adv, seq_ids, weight = objective_case(seed, 0.5)
    per_token, stats = cispo_loss(logp, old, t(adv)[:, None] * mask, mask, clip_low, clip_high, is_weight=weight)
    n_tokens = sum(lens)
    got = per_token.sum() / n_tokens
    want, grad, clipped = 0, [[0.0] * T for _ in range(B)], 0
    for i in range(B):
        for j in at[i]:
            r = math.exp(logp[i, j].item() - old[i, j].item())
            w = min(max(r, 1 - clip_low), 1 + clip_high)
            clipped += w != r
            want = want - w * adv[i] * weight[i, j].item() * logp[i, j]
            grad[i][j] = -w * adv[i] * weight[i, j].item() / n_tokens
    close(got, (want / n_tokens).item())
    torch.testing.assert_close(torch.autograd.grad(got, logp)[0], t(grad), **TOL)
    assert stats["clipfrac"].item() == pytest.approx(clipped / n_tokens)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_is_the_soft_gate_of_its_paper(seed, tau_pos, tau_neg):
    """SAPO: L_t = -(4 / tau) sigmoid(tau (r_t - 1)) A_t, tau = tau_pos for A_t > 0, tau_neg
    otherwise; values and gradients, and on-policy the gradient is PPO's, -A_t grad logp_t."""
    lens, at, mask, logp, old, adv, seq_ids, weight = objective_case(seed, 0.5)
    adv_tokens = t(adv)[:, None] * mask
    per_token, stats = sapo_loss(logp, old, adv_tokens, mask, tau_pos, tau_neg, is_weight=weight)
    n_tokens = sum(lens)
    got = per_token.sum() / n_tokens
    want = 0
    for i in range(B):
        tau = tau_pos if adv[i] > 0 else tau_neg
        for j in at[i]:
            r = torch.exp(logp[i, j] - old[i, j])
            want = want - (4 / tau) / (1 + torch.exp(-tau * (r - 1))) * adv[i] * weight[i, j].item()
    want = want / n_tokens
    close(got, want.item())
    torch.testing.assert_close(torch.autograd.grad(got, logp)[0], torch.autograd.grad(want, logp)[0], **TOL)
    on = sapo_loss(logp, logp.detach(), adv_tokens, mask, tau_pos, tau_neg)[0].sum() / n_tokens
    want_grad = [[-adv[i] / n_tokens if j in at[i] else 0.0 for j in range(T)] for i in range(B)]
    torch.testing.assert_close(torch.autograd.grad(on, logp)[0], t(want_grad), **TOL)
    assert sapo_loss(logp, logp.detach(), adv_tokens, mask, tau_pos, tau_neg)[1]["gate_mean"].item() == pytest.approx(1.0)
    assert 0 < stats["gate_mean"].item() < 1



@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_is_gkds_divergence(beta):
    """GKD's JSD(beta) = beta KL(P_T || M) + (1 - beta) KL(P_S || M), M = beta P_T + (1 - beta) P_S,
    written out over each position's probabilities (forward KL(P_T || P_S) at beta = 0, reverse
    KL(P_S || P_T) at 1), in float64; and its gradient in the student's logits, against finite
    differences of that written-out sum."""
    g = torch.Generator().manual_seed(3)
    student_logits = (2 * torch.randn(4, 7, generator=g, dtype=torch.float64)).requires_grad_()
    teacher_logps = torch.log_softmax(2 * torch.randn(4, 7, generator=g, dtype=torch.float64), -1)

    def written_out(s_logits):
        total = []
        for row in range(4):
            z = sum(math.exp(x) for x in s_logits[row].tolist())
            ps = [math.exp(x) / z for x in s_logits[row].tolist()]
            pt = [math.exp(x) for x in teacher_logps[row].tolist()]
            if beta == 0:
                total.append(sum(a * math.log(a / b) for a, b in zip(pt, ps)))
            elif beta == 1:
                total.append(sum(b * math.log(b / a) for a, b in zip(pt, ps)))
            else:
                m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
                total.append(beta * sum(a * math.log(a / c) for a, c in zip(pt, m))
                             + (1 - beta) * sum(b * math.log(b / c) for b, c in zip(ps, m)))
        return total

    got = generalized_jsd(torch.log_softmax(student_logits, -1), teacher_logps, beta)
    assert got.tolist() == pytest.approx(written_out(student_logits.detach()), rel=1e-10, abs=1e-12)
    assert all(x > 0 for x in got.tolist())
    (grad,) = torch.autograd.grad(got.sum(), student_logits)
    eps, numeric = 1e-6, torch.zeros_like(grad)
    for row in range(4):
        for v in range(7):
            up, down = student_logits.detach().clone(), student_logits.detach().clone()
            up[row, v] += eps
            down[row, v] -= eps
            numeric[row, v] = (sum(written_out(up)) - sum(written_out(down))) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)
    same = generalized_jsd(teacher_logps, teacher_logps, beta)
    torch.testing.assert_close(same, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
