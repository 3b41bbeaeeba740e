"""Section 8 (batch-level losses) and the stateful classes (state updates, state_dict round trips)."""

from __future__ import annotations

import math

import pytest
import torch

from loss_cases import Case, all_cases, cases, compare_with_reference, ids
from pygpo.losses import (
    BCOLoss,
    BCOPairLoss,
    BetaDPOLoss,
    GroupRobustLoss,
    HyperParameterError,
    NonFiniteError,
    get,
    preference_loss,
)


def L(z):
    return torch.log1p(torch.exp(-z))


def H(c):
    u = c.policy - c.ref
    return u[:, 0] - u[:, 1]


def ref_dr_dpo(c):
    b, bp = c.kwargs.get("beta", 0.1), c.kwargs.get("beta_prime", 1.0)
    l = L(b * H(c))
    loss = -bp * torch.log(torch.exp(-l / bp).mean())
    return l, loss


def ref_group_robust(c):
    b = c.kwargs.get("beta", 0.1)
    g = c.kwargs["groups"]
    G = int(g.max()) + 1
    a = c.kwargs.get("group_weights", torch.full((G,), 1.0 / G, dtype=torch.float64))
    l = L(b * H(c))
    loss = sum(a[k] * l[g == k].mean() for k in range(G) if (g == k).any())
    n = torch.stack([(g == k).sum() for k in range(G)]).double()
    per = len(l) * a[g] * l / n[g]
    return per, loss


def ref_relative(c):
    b, tau = c.kwargs.get("beta", 0.1), c.kwargs.get("tau", 0.5)
    e = c.kwargs["embeddings"]
    u = c.policy - c.ref
    B = len(u)
    per = []
    for i in range(B):
        cos = torch.stack([torch.dot(e[i], e[j]) / (e[i].norm() * e[j].norm()) for j in range(B)])
        w = torch.exp(-(1 - cos) / tau)
        w = w / w.sum()
        per.append(sum(L(b * w[j] * (u[i, 0] - u[j, 1])) for j in range(B)) / B)
    per = torch.stack(per)
    return per, per.mean()


REFERENCES = {"dr_dpo": ref_dr_dpo, "group_robust": ref_group_robust, "relative": ref_relative}
CASES = all_cases(REFERENCES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case):
    compare_with_reference(case, REFERENCES[case.key])


def test_dr_dpo_large_beta_prime_tends_to_dpo():
    c = cases("dpo")[0]
    dr = preference_loss("dr_dpo", c.policy, c.ref, beta=0.3, beta_prime=1e6).loss
    torch.testing.assert_close(dr, preference_loss("dpo", c.policy, c.ref, beta=0.3).loss, rtol=1e-5, atol=1e-6)


# ---- beta-DPO ---------------------------------------------------------------------------------


def ref_beta_dpo(c, m0, sel, beta0, a):
    """Everything but the random selection ``sel`` from the formula (the selection's distribution is
    tested by test_beta_dpo_selection_probabilities)."""
    h = H(c)
    M = h.detach()
    beta_b = max(beta0 * (1 + a * (float(M[sel].mean()) - float(m0))), 1e-3)
    per = L(beta_b * h)
    return per, per[sel].mean(), beta_b


@pytest.mark.parametrize("stats", [True, False], ids=["given_stats", "batch_stats"])
def test_beta_dpo_matches_reference(stats):
    c = cases("beta_dpo")[0]
    g = torch.Generator().manual_seed(7)
    pol = c.policy.clone().requires_grad_(True)
    if stats:
        m0, sm = torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
        out = preference_loss("beta_dpo", pol, c.ref, beta=0.2, rho=0.4, a=0.5, m0=m0, sm=sm, generator=g)
    else:
        M = H(c)
        m0, sm = M.mean(), M.std()
        out = preference_loss("beta_dpo", pol, c.ref, beta=0.2, rho=0.4, a=0.5, generator=g)
    pol_r = c.policy.clone().requires_grad_(True)
    sel = out.metrics["selected"]
    assert sel.dtype == torch.bool and int(sel.sum()) == 3  # floor(5 * 0.6)
    per, loss, beta_b = ref_beta_dpo(Case(c.key, pol_r, c.ref), m0, sel, 0.2, 0.5)
    torch.testing.assert_close(out.metrics["beta_batch"], torch.tensor(beta_b, dtype=torch.float64))
    torch.testing.assert_close(out.per_example, per.detach())
    torch.testing.assert_close(out.loss, loss.detach())
    out.loss.backward()
    loss.backward()
    torch.testing.assert_close(pol.grad, pol_r.grad)


def test_beta_dpo_selection_probabilities():
    # keep 1 of 3: the kept index is drawn with p ~ exp(-(M - M0)^2 / (2 sM^2))
    lp = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0]], dtype=torch.float64)
    rp = torch.zeros_like(lp)
    m0, sm = torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    n = 1500
    for _ in range(n):
        out = preference_loss("beta_dpo", lp, rp, rho=0.5, m0=m0, sm=sm, generator=g, check_finite=False)
        counts += out.metrics["selected"].float()
    w = torch.exp(-0.5 * (torch.tensor([0.0, 1.0, 2.5]) - 1.0) ** 2)
    p = w / w.sum()
    sd = (p * (1 - p) / n).sqrt()
    assert torch.all((counts / n - p).abs() < 4 * sd)


def test_beta_dpo_beta_floor():
    c = cases("dpo")[0]
    out = preference_loss("beta_dpo", c.policy, c.ref, beta=0.1, rho=0.0, a=50.0, m0=torch.tensor(100.0), sm=torch.tensor(1.0))
    assert float(out.metrics["beta_batch"]) == pytest.approx(1e-3)


def test_beta_dpo_class_ema_and_state_dict():
    loss_fn = BetaDPOLoss(beta=0.1, rho=0.2, a=0.6, generator=torch.Generator().manual_seed(1))
    hs = []
    for step in range(3):
        c = cases("dpo")[0]
        lp = c.policy + 0.5 * step
        out = loss_fn(lp, c.ref)
        hs.append((lp - c.ref)[:, 0] - (lp - c.ref)[:, 1])
        assert torch.isfinite(out.loss)
    m0 = torch.zeros((), dtype=torch.float64)
    sm = torch.zeros((), dtype=torch.float64)
    for h in hs:  # EMA updated with the batch before use, zero-initialised (authors' code)
        m0 = 0.9 * m0 + 0.1 * h.mean()
        sm = 0.9 * sm + 0.1 * h.std()
    torch.testing.assert_close(loss_fn.m0, m0)
    torch.testing.assert_close(loss_fn.sm, sm)
    state = loss_fn.state_dict()
    assert set(state) == {"m0", "sm", "steps"} and int(state["steps"]) == 3
    other = BetaDPOLoss(beta=0.1, rho=0.2, a=0.6)
    other.load_state_dict(state)
    torch.testing.assert_close(other.m0, m0)
    # eval mode: no update
    other.eval()
    other(cases("dpo")[0].policy, cases("dpo")[0].ref)
    torch.testing.assert_close(other.m0, m0)


def test_stateful_rejects_bad_batch_before_updating():
    loss_fn = BetaDPOLoss()
    c = cases("dpo")[0]
    bad = c.policy.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="example 2"):
        loss_fn(bad, c.ref)
    assert float(loss_fn.m0) == 0.0 and int(loss_fn.steps) == 0


def test_stateful_hyperparameter_ranges():
    with pytest.raises(HyperParameterError, match="rho"):
        BetaDPOLoss(rho=1.0)
    with pytest.raises(HyperParameterError, match="beta"):
        BCOPairLoss(beta=0.0)
    with pytest.raises(HyperParameterError, match="num_groups"):
        GroupRobustLoss(0)


# ---- BCO running mean ---------------------------------------------------------------------------


def test_bco_pair_running_mean():
    fn = BCOPairLoss(beta=0.2)
    seen = []
    for step in range(3):
        c = cases("dpo")[0]
        lp = c.policy + step
        out = fn(lp, c.ref)
        seen.append(0.2 * (lp - c.ref).flatten())
        delta = torch.cat(seen).mean()
        u = lp - c.ref
        expected = L(0.2 * u[:, 0] - delta) + L(-(0.2 * u[:, 1] - delta))
        torch.testing.assert_close(out.per_example, expected)
    torch.testing.assert_close(fn.mean, torch.cat(seen).mean())
    assert float(fn.count) == 30.0
    clone = BCOPairLoss(beta=0.2)
    clone.load_state_dict(fn.state_dict())
    clone.eval()
    c = cases("dpo")[0]
    torch.testing.assert_close(clone(c.policy, c.ref).loss, fn.eval()(c.policy, c.ref).loss)
    torch.testing.assert_close(clone.mean, fn.mean)  # eval: no update


def test_bco_pair_without_running_mean_is_functional_default():
    c = cases("dpo")[0]
    fn = BCOPairLoss(beta=0.2, running_mean=False)
    torch.testing.assert_close(fn(c.policy, c.ref).loss, preference_loss("bco_pair", c.policy, c.ref, beta=0.2).loss)


def test_bco_unpaired_running_mean():
    c = cases("bco")[0]
    fn = BCOLoss(beta=0.3)
    out = fn(c.policy, c.ref, labels=c.kwargs["labels"])
    delta = (0.3 * (c.policy - c.ref)).mean()
    u = c.policy - c.ref
    expected = torch.where(c.kwargs["labels"], L(0.3 * u - delta), L(-(0.3 * u - delta)))
    torch.testing.assert_close(out.per_example, expected)


# ---- group robust -------------------------------------------------------------------------------


def test_group_robust_weight_update():
    c = cases("group_robust")[0]
    groups = c.kwargs["groups"]
    fn = GroupRobustLoss(3, beta=0.3, eta_a=0.5, C=0.2)
    out = fn(c.policy, c.ref, groups=groups)
    l = L(0.3 * H(c))
    a = torch.full((3,), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(out.loss, sum(a[k] * l[groups == k].mean() for k in range(3)))
    Lg = torch.stack([l[groups == k].mean() for k in range(3)])
    Ng = torch.stack([(groups == k).sum() for k in range(3)]).double()
    new = a * torch.exp(0.5 * (Lg + 0.2 / Ng.sqrt()))
    new = new / new.sum()
    torch.testing.assert_close(fn.weights, new)
    clone = GroupRobustLoss(3, beta=0.3)
    clone.load_state_dict(fn.state_dict())
    torch.testing.assert_close(clone.weights, new)


def test_group_robust_absent_group_keeps_relative_weight():
    c = cases("group_robust")[0]
    fn = GroupRobustLoss(4, beta=0.3, eta_a=0.5)
    fn(c.policy, c.ref, groups=c.kwargs["groups"])  # group 3 absent
    l = L(0.3 * H(c))
    g = c.kwargs["groups"]
    raw = torch.tensor([math.exp(0.5 * float(l[g == k].mean())) if (g == k).any() else 1.0 for k in range(4)], dtype=torch.float64)
    torch.testing.assert_close(fn.weights, raw / raw.sum())


def test_specs_point_to_state_classes():
    assert get("bco_pair").stateful is BCOPairLoss
    assert get("bco").stateful is BCOLoss
    assert get("beta_dpo").stateful is BetaDPOLoss
    assert get("group_robust").stateful is GroupRobustLoss
