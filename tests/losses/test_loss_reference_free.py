"""Section 4 (reference-free heads): float64 references from LOSSES.md; alphapo -> simpo limit."""

from __future__ import annotations

import pytest
import torch

from loss_cases import Case, all_cases, cases, compare_with_reference, ids
from pygpo.losses import preference_loss
from pygpo.losses.reference_free import gamma_po_margins


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


def exact_gammapo_margins(r: torch.Tensor, gamma_0: float, tau: float, iters: int = 60) -> torch.Tensor:
    """The gamma-PO argmin by nested bisection on its KKT conditions (float64; a different method from the
    library's Newton solver). With u_i = log(N p_i): for a multiplier mu every u_i solves
    tau u + gamma_0 sigmoid(gamma_0 e^u - r_i) = mu, increasing in u, so u_i is in [(mu - gamma_0)/tau, mu/tau];
    sum_i e^{u_i} is increasing in mu and equals N for some mu in (0, gamma_0)."""
    r = r.detach().double()
    n = r.numel()

    def u_of(mu: float) -> torch.Tensor:
        lo = torch.full_like(r, (mu - gamma_0) / tau)
        hi = torch.full_like(r, mu / tau)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = tau * mid + gamma_0 * sig(gamma_0 * torch.exp(mid) - r) < mu
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)

    lo, hi = 0.0, gamma_0
    for _ in range(iters):
        mu = 0.5 * (lo + hi)
        lo, hi = (mu, hi) if float(torch.exp(u_of(mu)).sum()) < n else (lo, mu)
    x = torch.exp(u_of(0.5 * (lo + hi)))
    return gamma_0 * n * x / x.sum()


def ref_gammapo(c):
    """ls(r - gamma) with gamma the exact argmin (a constant: stop-gradient)."""
    k = c.kwargs
    b, g0, tau = k.get("beta", 2.0), k.get("gamma_0", 0.5), k.get("tau", 10.0)
    mw, ml = M(c)
    r = b * (mw - ml)
    per = L(r - exact_gammapo_margins(r, g0, tau))
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


def wide_margins(n: int, seed: int) -> torch.Tensor:
    """float32-representable margins with |r| from ~0.01 to ~100 and one outlier at +-150."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(2 * torch.randn(n, generator=g, dtype=torch.float64))
    r[0] = 150.0 if seed % 2 else -150.0
    return r.float().double()


@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("tau", [0.02, 0.1, 0.5, 10.0])
def test_gammapo_margins_are_the_exact_argmin(tau, n):
    """gamma equals the argmin found by nested bisection, for float64 and float32 margins; p = gamma / (gamma_0 N)
    is on the simplex and the KKT conditions gamma_0 sigma(gamma_i - r_i) + tau log(N p_i) = mu hold."""
    g0 = 0.5
    r = wide_margins(n, seed=n + int(1000 * tau))
    exact = exact_gammapo_margins(r, g0, tau)
    scale = max(1.0, float(exact.max()))
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
        gam = gamma_po_margins(r.to(dtype), gamma_0=g0, tau=tau)
        assert gam.dtype == dtype and gam.shape == (n,)
        assert float((gam.double() - exact).abs().max()) <= tol * scale, dtype
        p = gam.double() / (g0 * n)
        assert bool((p > 0).all()) and abs(float(p.sum()) - 1) <= tol
        stationarity = g0 * sig(gam.double() - r) + tau * torch.log(n * p)
        assert float(stationarity.max() - stationarity.min()) <= (1e-9 if dtype == torch.float64 else 1e-5)


def test_gammapo_margins_kkt_in_float64():
    """The float64 solve meets the KKT conditions to rounding, also for gamma_0 = 2 and tau = 0.01 (N = 512)."""
    r = wide_margins(512, seed=3)
    for g0, tau in ((0.5, 0.01), (2.0, 0.01), (2.0, 100.0)):
        gam = gamma_po_margins(r, gamma_0=g0, tau=tau)
        stationarity = g0 * sig(gam - r) + tau * torch.log(gam / g0)
        assert float(stationarity.max() - stationarity.min()) <= 1e-10, (g0, tau)
        assert abs(float(gam.sum()) - g0 * 512) <= 1e-10 * g0 * 512


def test_gammapo_loss_at_small_tau_uses_the_argmin():
    """At small tau, where 20 mirror-descent steps stop short of the argmin, the loss uses the argmin."""
    r = 2 * torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lp = torch.stack([r / 2.0, torch.zeros_like(r)], 1)  # beta = 2, lengths 1: the margins are r
    for tau in (0.05, 0.3):
        compare_with_reference(Case("simpo_gamma_dynamic", lp, None, dict(tau=tau, lengths=torch.ones_like(lp))), ref_gammapo)


def test_gammapo_margins_are_deterministic_and_detached():
    r = wide_margins(64, seed=5).requires_grad_(True)
    a = gamma_po_margins(r, gamma_0=0.5, tau=0.1)
    b = gamma_po_margins(r, gamma_0=0.5, tau=0.1)
    assert torch.equal(a, b) and not a.requires_grad


def test_gammapo_margins_trace_into_one_graph():
    """No host synchronisation (.item(), bool(tensor)) and no data-dependent Python control flow: the solve
    traces into a single graph, as CUDA-graph capture needs."""
    r = wide_margins(16, seed=7).float()
    traced = torch.compile(gamma_po_margins, backend="eager", fullgraph=True)
    assert torch.equal(traced(r, gamma_0=0.5, tau=10.0), gamma_po_margins(r, gamma_0=0.5, tau=10.0))


def test_orpo_stable_near_zero_logprob():
    lp = torch.tensor([[-1e-6, -30.0]], dtype=torch.float64)
    out = preference_loss("orpo", lp, lengths=torch.ones_like(lp))
    assert torch.isfinite(out.loss)


def test_simpo_metrics_use_length_normalised_rewards():
    c = cases("simpo")[0]
    out = preference_loss("simpo", c.policy, **c.kwargs)
    mw, _ = M(c)
    torch.testing.assert_close(out.metrics["rewards/chosen"], (2.5 * mw).mean())
