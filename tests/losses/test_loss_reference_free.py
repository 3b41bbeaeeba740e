"""Section 4 (reference-free heads): float64 references from LOSSES.md; alphapo -> simpo limit."""

from __future__ import annotations

import math

import pytest
import torch

from loss_cases import Case, all_cases, cases, compare_with_reference, ids
from pygpo.losses import preference_loss


def L(z):
    return torch.log1p(torch.exp(-z))


def sig(z):
    return 1 / (1 + torch.exp(-z))


def M(c: Case):
    n = c.kwargs["lengths"]
    return c.policy[:, 0] / n[:, 0], c.policy[:, 1] / n[:, 1]


def nll_mean_chosen(c: Case):
    """Token mean over every chosen token of the batch: -sum lp_w / sum |y_w|."""
    return -c.policy[:, 0].sum() / c.kwargs["lengths"][:, 0].sum()


def ref_simpo(c):
    k = c.kwargs
    b, g, e = k.get("beta", 2.0), k.get("gamma", 0.5), k.get("eps", 0.0)
    mw, ml = M(c)
    z = b * (mw - ml) - g
    per = (1 - e) * L(z) + e * L(-z)
    return per, per.mean()


def ref_cpo(c):
    k = c.kwargs
    b, e, a = k.get("beta", 0.1), k.get("eps", 0.0), k.get("alpha", 1.0)
    z = b * (c.policy[:, 0] - c.policy[:, 1])
    pref = (1 - e) * L(z) + e * L(-z)
    loss = pref.mean() + a * nll_mean_chosen(c)
    return pref + a * (-c.policy[:, 0] * len(z) / c.kwargs["lengths"][:, 0].sum()), loss


def ref_orpo(c):
    lam = c.kwargs.get("lam", 0.1)
    mw, ml = M(c)
    Lodds = (mw - ml) - (torch.log(1 - torch.exp(mw)) - torch.log(1 - torch.exp(ml)))
    term = -lam * torch.log(sig(Lodds))
    loss = nll_mean_chosen(c) + term.mean()
    return term + (-c.policy[:, 0] * len(mw) / c.kwargs["lengths"][:, 0].sum()), loss


def ref_alphapo(c):
    k = c.kwargs
    b, g, a = k.get("beta", 2.0), k.get("gamma", 0.5), k.get("a", 0.25)
    mw, ml = M(c)

    def ra(m):
        return (1 - torch.exp(-a * m)) / a

    per = L(b * (ra(mw) - ra(ml)) - g)
    return per, per.mean()


def ref_repo(c):
    g = c.kwargs.get("gamma", 0.6)
    mw, ml = M(c)
    per = torch.clamp(g - (mw - ml), min=0)
    return per, per.mean()


def ref_asft(c):
    lam = c.kwargs.get("lam", 1.0)
    mw, ml = M(c)
    Pw, Pl = torch.exp(mw), torch.exp(ml)
    per = -mw + lam * (-torch.log(Pw) - torch.log(1 - Pl))
    return per, per.mean()


def ref_tpo_triple(c):
    k = c.kwargs
    b, a = k.get("beta", 0.1), k.get("alpha", 1.0)
    g, gl = k["gold_logps"], k["gold_lengths"]
    pref = L(b * (c.policy[:, 0] - c.policy[:, 1]))
    loss = pref.mean() + a * (-g.sum() / gl.sum())
    return pref + a * (-g * len(g) / gl.sum()), loss


def ref_gammapo(c):
    """Mirror descent written from the objective: p on the simplex, 20 exponentiated-gradient steps."""
    k = c.kwargs
    b, g0, tau = k.get("beta", 2.0), k.get("gamma_0", 0.5), k.get("tau", 10.0)
    mw, ml = M(c)
    r = b * (mw - ml)
    rd = r.detach().tolist()
    N = len(rd)
    p = [1.0 / N] * N
    lr = min(0.5 / tau, 1.0)
    for _ in range(20):
        grads = [g0 / (1 + math.exp(-(g0 * N * p[i] - rd[i]))) + tau * (1 + math.log(N * p[i])) for i in range(N)]
        q = [p[i] * math.exp(-lr * grads[i]) for i in range(N)]
        s = sum(q)
        p = [x / s for x in q]
    gam = torch.tensor([g0 * N * x for x in p], dtype=torch.float64)
    per = L(r - gam)
    return per, per.mean()


REFERENCES = {
    "simpo": ref_simpo,
    "cpo": ref_cpo,
    "orpo": ref_orpo,
    "alphapo": ref_alphapo,
    "repo": ref_repo,
    "asft": ref_asft,
    "tpo_triple": ref_tpo_triple,
    "simpo_gamma_dynamic": ref_gammapo,
}
CASES = all_cases(REFERENCES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case):
    compare_with_reference(case, REFERENCES[case.key])


def test_alphapo_small_a_tends_to_simpo():
    c = cases("simpo")[0]
    n = c.kwargs["lengths"]
    s = preference_loss("simpo", c.policy, lengths=n, beta=2.0, gamma=0.5).per_example
    errs = []
    for a in (1e-3, 1e-6):
        ap = preference_loss("alphapo", c.policy, lengths=n, beta=2.0, gamma=0.5, a=a).per_example
        errs.append(((ap - s).abs() / s.abs().clamp(min=1e-3)).max())
    assert errs[1] < 1e-4
    assert errs[1] < 1e-2 * errs[0]  # first-order convergence in a
    exact = preference_loss("alphapo", c.policy, lengths=n, beta=2.0, gamma=0.5, a=0.0).per_example
    torch.testing.assert_close(exact, s, rtol=1e-12, atol=1e-14)


def test_gammapo_margins_stay_on_simplex_and_favour_confident_pairs():
    c = cases("simpo_gamma_dynamic")[0]
    out = preference_loss("gammapo", c.policy, **c.kwargs)
    n = c.kwargs["lengths"]
    r = 2.0 * (c.policy[:, 0] / n[:, 0] - c.policy[:, 1] / n[:, 1])
    # the margins sum to gamma_0 * N and grow with the reward margin
    per = out.per_example
    assert torch.isfinite(per).all()
    g = r + torch.log(torch.expm1(per))  # invert ls: per = log(1 + e^(g - r))
    torch.testing.assert_close(g.sum(), torch.tensor(0.5 * len(r), dtype=torch.float64), rtol=1e-6, atol=1e-6)
    order = torch.argsort(r)
    assert torch.all(torch.diff(g[order]) >= -1e-9)


def test_orpo_stable_near_zero_logprob():
    lp = torch.tensor([[-1e-6, -30.0]], dtype=torch.float64)
    out = preference_loss("orpo", lp, lengths=torch.ones_like(lp))
    assert torch.isfinite(out.loss)


def test_simpo_metrics_use_length_normalised_rewards():
    c = cases("simpo")[0]
    out = preference_loss("simpo", c.policy, **c.kwargs)
    mw, _ = M(c)
    torch.testing.assert_close(out.metrics["rewards/chosen"], (2.5 * mw).mean())
