"""Extreme scores and input ranges: finite where the formula is finite, clear errors where an input
leaves its documented range, and beta-DPO's draw robust to weights that underflow."""

import math

import pytest
import torch
import torch.nn.functional as F

from pygpo import preference_loss
from pygpo.losses.errors import InputValueError


def _discopop64(z, tau):
    """LOSSES.md section 2, evaluated naively in float64 (finite there for |z| <= 700)."""
    m = torch.sigmoid(z / tau)
    return (1 - m) * F.softplus(-z) + m * torch.exp(-z)


@pytest.mark.parametrize("margin", [-1000.0, -3000.0, 500.0])
def test_discopop_is_finite_where_exp_alone_overflows(margin):
    """float32: exp(-z) overflows past z = -88, yet m exp(-z) -> 0; the loss tends to -z."""
    beta, tau = 0.1, 0.05
    pol = torch.tensor([[margin, 0.0], [0.5, 0.2]], dtype=torch.float32, requires_grad=True)
    ref = torch.zeros(2, 2)
    out = preference_loss("discopop", pol, ref, beta=beta, tau=tau)
    (g,) = torch.autograd.grad(out.loss, pol)
    pol64 = pol.detach().double().requires_grad_(True)
    z = beta * (pol64[:, 0] - pol64[:, 1])
    ref_loss = _discopop64(z, tau).mean()
    (g64,) = torch.autograd.grad(ref_loss, pol64)
    assert torch.isfinite(out.per_example).all() and torch.isfinite(g).all()
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-7)


def test_beta_dpo_draw_survives_weights_that_underflow():
    """float64 margins far from M0: every weight exp(-(M - M0)^2 / (2 sM^2)) is below float32's range.
    The draw ranks by log-weights, so the margin closest to M0 is kept (its weight is e^1000 times the
    next one's)."""
    margins = torch.tensor([4.0, 9.0, 2.0, 6.0, 1.0], dtype=torch.float64)
    lp = torch.stack([margins, torch.zeros(5, dtype=torch.float64)], 1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = preference_loss("beta_dpo", lp, torch.zeros_like(lp), rho=0.5, m0=torch.tensor(50.0, dtype=torch.float64),
                              sm=torch.tensor(1.0, dtype=torch.float64), generator=g)
        sel = out.metrics["selected"]
        assert int(sel.sum()) == 2 and bool(sel[1])  # 9.0 is closest to 50
        assert torch.isfinite(out.loss)


def test_beta_dpo_keeps_everything_without_a_draw_at_rho_zero():
    lp = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    out = preference_loss("beta_dpo", lp, torch.zeros_like(lp), rho=0.0, m0=torch.tensor(1e3, dtype=torch.float64),
                          sm=torch.tensor(1e-3, dtype=torch.float64))
    assert bool(out.metrics["selected"].all())


def test_beta_dpo_two_of_three_follow_draws_without_replacement():
    """Keeping 2 of 3, example i is left out when the other two are drawn first, in either order:
    P(out_i) = w_j/W * w_k/(W - w_j) + w_k/W * w_j/(W - w_k)."""
    margins = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    lp = torch.stack([margins, torch.zeros(3, dtype=torch.float64)], 1)
    m0, sm = torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    w = torch.exp(-0.5 * (margins - 1.0) ** 2)
    big_w = float(w.sum())
    p_out = []
    for i in range(3):
        j, k = [x for x in range(3) if x != i]
        wj, wk = float(w[j]), float(w[k])
        p_out.append(wj / big_w * wk / (big_w - wj) + wk / big_w * wj / (big_w - wk))
    g = torch.Generator().manual_seed(1)
    n, left_out = 2000, torch.zeros(3)
    for _ in range(n):
        sel = preference_loss("beta_dpo", lp, torch.zeros_like(lp), rho=0.3, m0=m0, sm=sm, generator=g).metrics["selected"]
        left_out += (~sel).float()
    p = torch.tensor(p_out, dtype=torch.float32)
    sd = (p * (1 - p) / n).sqrt()
    assert torch.all((left_out / n - p).abs() < 4 * sd), (left_out / n, p)


def _pair(b=3):
    return torch.randn(b, 2, dtype=torch.float64), torch.randn(b, 2, dtype=torch.float64)


@pytest.mark.parametrize("key,bad", [("sppo", [[3.0, 0.5], [0.5, 0.5], [0.2, 0.1]]),
                                     ("egpo", [[0.5, -0.2], [0.5, 0.5], [0.2, 0.1]])])
def test_win_probabilities_outside_unit_interval_are_refused(key, bad):
    pol, ref = _pair()
    with pytest.raises(InputValueError, match=r"win_probs must lie in \[0, 1\].*example 0"):
        preference_loss(key, pol, ref, win_probs=torch.tensor(bad, dtype=torch.float64))
    preference_loss(key, pol, ref, win_probs=torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.1]], dtype=torch.float64))


def test_sppo_k_checks_win_probabilities_of_valid_responses_only():
    pol, ref = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    probs = torch.tensor([[0.2, 0.9, 7.0], [0.1, 0.5, 1.0]], dtype=torch.float64)  # 7.0 is padding
    out = preference_loss("sppo_k", pol, ref, win_probs=probs, valid=valid)
    assert math.isfinite(float(out.loss))
    probs[1, 2] = 1.5
    with pytest.raises(InputValueError, match=r"win_probs must lie in \[0, 1\].*example 1"):
        preference_loss("sppo_k", pol, ref, win_probs=probs, valid=valid)


def test_sparsepo_masks_outside_unit_interval_are_refused_on_completion_tokens_only():
    b, t = 2, 4
    pol, ref = torch.randn(b, 2, t, dtype=torch.float64), torch.randn(b, 2, t, dtype=torch.float64)
    kl = torch.rand(b, 2, t, dtype=torch.float64)
    mask = torch.ones(b, 2, t, dtype=torch.bool)
    mask[:, :, -1] = False
    mu = torch.full((b, 2, t), 0.5, dtype=torch.float64)
    mu[:, :, -1] = 9.0  # padding: not checked
    preference_loss("sparsepo", pol, ref, kl=kl, mask=mask, mu=mu)
    md = torch.full((b, 2, t), 0.5, dtype=torch.float64)
    md[1, 0, 0] = -0.5
    with pytest.raises(InputValueError, match=r"md must lie in \[0, 1\].*example 1"):
        preference_loss("sparsepo", pol, ref, kl=kl, mask=mask, mu=mu, md=md)


def _fdpo64(pol, div, beta=0.1, alpha=0.5):
    """LOSSES.md's f-DPO in float64 without any clamp (finite there for |alpha u| <= 700)."""
    a = 1.0 if div == "forward_kl" else alpha
    g = (1 - torch.exp(-a * pol)) / a
    return F.softplus(-beta * (g[:, 0] - g[:, 1]))


@pytest.mark.parametrize("div", ["forward_kl", "alpha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fdpo_exponential_divergences_stay_finite_past_fp32_overflow(div, dtype):
    """exp(-u) overflows fp32 at u = -88. Rows: both log-ratios far past it with the chosen better (float64:
    loss 0, gradient 0; a per-term clamp would give log 2), a tie far past it (log 2), the chosen alone far
    past it (a huge loss pushing u_w up), and a moderate pair (the plain formula)."""
    rows = [[-190.0, -200.0], [-300.0, -300.0], [-200.0, 1.0], [-3.0, -1.0]]
    pol = torch.tensor(rows, dtype=dtype, requires_grad=True)
    out = preference_loss("fdpo", pol, torch.zeros(4, 2, dtype=dtype), beta=0.1, divergence=div, alpha=0.5)
    (grad,) = torch.autograd.grad(out.loss, pol)
    per = out.per_example.double()
    assert torch.isfinite(per).all() and torch.isfinite(grad.float()).all()
    assert per[0] == 0 and (grad[0] == 0).all()
    assert abs(float(per[1]) - math.log(2)) < 1e-2
    assert per[2] > 1e30 and grad[2, 0] < 0 < grad[2, 1]
    pol64 = pol.detach()[3:].double().requires_grad_(True)
    want = _fdpo64(pol64, div)
    (g64,) = torch.autograd.grad(want.sum() / 4, pol64)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(per[3:], want.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad[3:].double(), g64, rtol=tol, atol=tol)
