"""Section 2 (pairwise heads): float64 references written from LOSSES.md, identities.

The references below use only torch/math and the formulas as LOSSES.md writes them; they never call
pygpo helpers. Defaults are spelled out from LOSSES.md too.
"""

from __future__ import annotations

import math

import pytest
import torch

from loss_cases import Case, all_cases, cases, compare_with_reference, ids
from pygpo.losses import preference_loss


def sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def logsig(z):
    return -torch.log1p(torch.exp(-z))


def L(z):  # ls(z) = -log sigmoid(z)
    return torch.log1p(torch.exp(-z))


def split(c: Case):
    lp, rp = c.policy, c.ref
    return lp[:, 0], lp[:, 1], rp[:, 0], rp[:, 1]


def U(c: Case):
    lw, ll, rw, rl = split(c)
    return lw - rw, ll - rl


def mean(x):
    return x.sum() / x.numel()


def ref_dpo(c):
    b = c.kwargs.get("beta", 0.1)
    uw, ul = U(c)
    per = L(b * (uw - ul))
    return per, mean(per)


def ref_cdpo(c):
    b, e = c.kwargs.get("beta", 0.1), c.kwargs.get("eps", 0.1)
    uw, ul = U(c)
    h = uw - ul
    per = (1 - e) * L(b * h) + e * L(-b * h)
    return per, mean(per)


def ref_robust(c):
    b, e = c.kwargs.get("beta", 0.1), c.kwargs.get("eps", 0.1)
    uw, ul = U(c)
    h = uw - ul
    per = ((1 - e) * L(b * h) - e * L(-b * h)) / (1 - 2 * e)
    return per, mean(per)


def ref_ipo(c):
    b = c.kwargs.get("beta", 0.1)
    uw, ul = U(c)
    if c.kwargs.get("length_normalize", True):
        n = c.kwargs["lengths"]
        hb = uw / n[:, 0] - ul / n[:, 1]
    else:
        hb = uw - ul
    per = (hb - 1 / (2 * b)) ** 2
    return per, mean(per)


def ref_hinge(c):
    b = c.kwargs.get("beta", 0.1)
    uw, ul = U(c)
    per = torch.clamp(1 - b * (uw - ul), min=0)
    return per, mean(per)


def ref_exo(c):
    b, e = c.kwargs.get("beta", 0.1), c.kwargs.get("eps", 1e-3)
    uw, ul = U(c)
    z = b * (uw - ul)
    per = sig(z) * (logsig(z) - math.log(1 - e)) + sig(-z) * (logsig(-z) - math.log(e))
    return per, mean(per)


def ref_nca(c):
    b = c.kwargs.get("beta", 0.1)
    uw, ul = U(c)
    per = L(b * uw) + 0.5 * L(-b * uw) + 0.5 * L(-b * ul)
    return per, mean(per)


def ref_bco_pair(c):
    b = c.kwargs.get("beta", 0.1)
    d = c.kwargs.get("delta", 0.0)
    uw, ul = U(c)
    per = L(b * uw - d) + L(-(b * ul - d))
    return per, mean(per)


def ref_sppo_hard(c):
    b = c.kwargs.get("beta", 0.1)
    uw, ul = U(c)
    per = (uw - 1 / (2 * b)) ** 2 + (ul + 1 / (2 * b)) ** 2
    return per, mean(per)


def ref_sppo(c):
    b = c.kwargs.get("beta", 0.1)
    eta = c.kwargs.get("eta") or 1 / b
    p = c.kwargs["win_probs"]
    uw, ul = U(c)
    per = 0.5 * ((uw - eta * (p[:, 0] - 0.5)) ** 2 + (ul - eta * (p[:, 1] - 0.5)) ** 2)
    return per, mean(per)


def _sorted(x):
    return torch.sort(x).values


def ref_aot(c):
    b, e = c.kwargs.get("beta", 0.1), c.kwargs.get("eps", 0.0)
    lw, ll, rw, rl = split(c)
    d = _sorted(lw - ll) - _sorted(rw - rl)
    per = (1 - e) * L(b * d) + e * L(-b * d)
    return per, mean(per)


def ref_aot_unpaired(c):
    b, e = c.kwargs.get("beta", 0.1), c.kwargs.get("eps", 0.0)
    uw, ul = U(c)
    d = _sorted(uw) - _sorted(ul)
    per = (1 - e) * L(b * d) + e * L(-b * d)
    return per, mean(per)


def ref_apo_zero(c):
    b = c.kwargs.get("beta", 0.1)
    uw, ul = U(c)
    per = (1 - sig(b * uw)) + sig(b * ul)
    return per, mean(per)


def ref_apo_down(c):
    b = c.kwargs.get("beta", 0.1)
    uw, ul = U(c)
    per = sig(b * uw) + (1 - sig(b * (uw - ul)))
    return per, mean(per)


def ref_discopop(c):
    b, tau = c.kwargs.get("beta", 0.1), c.kwargs.get("tau", 0.05)
    uw, ul = U(c)
    z = b * (uw - ul)
    m = sig(z / tau)
    per = (1 - m) * L(z) + m * torch.exp(-z)
    return per, mean(per)


def ref_sigmoid_norm(c):
    b = c.kwargs.get("beta", 0.1)
    n = c.kwargs["lengths"]
    uw, ul = U(c)
    per = L(b * (uw / n[:, 0] - ul / n[:, 1]))
    return per, mean(per)


def ref_fdpo(c):
    b = c.kwargs.get("beta", 0.1)
    div = c.kwargs.get("divergence", "reverse_kl")
    a = c.kwargs.get("alpha", 0.5)

    def g(x):
        if div == "reverse_kl":
            return x
        if div == "forward_kl":
            return 1 - torch.exp(-x)
        if div == "js":
            return math.log(2) + torch.log(sig(x))
        return (1 - torch.exp(torch.clamp(-a * x, max=80.0))) / a

    uw, ul = U(c)
    per = L(b * (g(uw) - g(ul)))
    return per, mean(per)


def ref_hdpo(c):
    b, a = c.kwargs.get("beta", 0.1), c.kwargs.get("alpha", 0.9)
    lw, ll, rw, rl = split(c)
    per = L(a * b * (lw - ll) - b * (rw - rl))
    return per, mean(per)


def ref_dpo_shift(c):
    b, lam = c.kwargs.get("beta", 0.1), c.kwargs.get("lam", 0.95)
    uw, ul = U(c)
    per = L(b * uw - lam * b * ul)
    return per, mean(per)


def ref_mappo(c):
    b = c.kwargs.get("beta", 0.1)
    r = c.kwargs["rewards"]
    dr = torch.clamp(r[:, 0] - r[:, 1], 0, 1)
    uw, ul = U(c)
    per = L(b * uw - dr * b * ul)
    return per, mean(per)


def ref_odpo(c):
    b, a = c.kwargs.get("beta", 0.1), c.kwargs.get("alpha", 1.0)
    s = c.kwargs["scores"]
    off = a * torch.log(s[:, 0] - s[:, 1]) if c.kwargs.get("offset", "diff") == "diff" else a * torch.log(s[:, 0] / s[:, 1])
    uw, ul = U(c)
    per = L(b * (uw - ul) - off)
    return per, mean(per)


def ref_rdpo_length(c):
    b, a = c.kwargs.get("beta", 0.1), c.kwargs.get("alpha", 0.01)
    n = c.kwargs["lengths"]
    uw, ul = U(c)
    per = L(b * (uw - ul) + a * (n[:, 0] - n[:, 1]))
    return per, mean(per)


def ref_dpop(c):
    b, lam = c.kwargs.get("beta", 0.3), c.kwargs.get("lam", 50.0)
    lw, ll, rw, rl = split(c)
    h = (lw - rw) - (ll - rl)
    per = L(b * (h - lam * torch.clamp(rw - lw, min=0)))
    return per, mean(per)


def ref_modpo(c):
    b, w0 = c.kwargs.get("beta", 0.1), c.kwargs.get("w0", 0.5)
    m = c.kwargs["margin_rewards"]
    if m.dim() == 2:
        m = m[:, :, None]
    w_rest = c.kwargs.get("w_rest") or [(1 - w0) / m.shape[2]] * m.shape[2]
    dot = sum(w_rest[i] * (m[:, 0, i] - m[:, 1, i]) for i in range(m.shape[2]))
    uw, ul = U(c)
    per = L((b * (uw - ul) - dot) / w0)
    return per, mean(per)


def ref_todo(c):
    b, th = c.kwargs.get("beta", 0.01), c.kwargs.get("theta", -0.5)
    ties = c.kwargs["ties"]
    uw, ul = U(c)
    z = b * (uw - ul)
    tie = -math.log(math.exp(-2 * th) - 1) + L(z + th) + L(-z + th)
    per = torch.where(ties, tie, L(z + th))
    return per, mean(per)


def ref_wpo(c):
    b = c.kwargs.get("beta", 0.1)
    n, s2 = c.kwargs["lengths"], c.kwargs["log_sum_p2"]
    lp = c.policy.detach()
    w = torch.exp((lp - s2) / n)
    ww = w[:, 0] * w[:, 1]
    if c.kwargs.get("clamp", True):
        ww = torch.minimum(ww, torch.ones_like(ww))
    uw, ul = U(c)
    per = -ww * torch.log(sig(b * (uw - ul)))
    return per, mean(per)


def ref_omni_dpo(c):
    k = c.kwargs
    b, eta, gam, tref, lam, tgood = (k.get("beta", 2.0), k.get("eta", 0.7), k.get("gamma", 3.0), k.get("tau_ref", 0.8), k.get("lam", 0.001), k.get("tau_good", 3.2))
    n, s = k["lengths"], k["quality"]
    lw, ll, rw, rl = split(c)
    hbar = (lw - rw) / n[:, 0] - (ll - rl) / n[:, 1]
    wq = sig(eta * (s[:, 0] - s[:, 1]))
    wp = (1 - sig(b * (lw / n[:, 0] - ll / n[:, 1]) - tref)) ** gam
    ind = ((rw > lw) & (s[:, 0] >= tgood)).double()
    per = -wq * wp * torch.log(sig(b * hbar)) - lam * ind * lw / n[:, 0]
    return per, mean(per)


def ref_reward_aware(c):
    k = c.kwargs
    b, eta, mode = k.get("beta", 0.1), k.get("eta", 1.0), k.get("mode", "bwd_kl")
    R = k["rewards"]
    uw, ul = U(c)
    a = b * (uw - ul)
    bb = eta * (R[:, 0] - R[:, 1])
    if mode == "sq":
        per = (a - bb) ** 2
    elif mode == "bwd_kl":
        per = sig(bb) * (logsig(bb) - logsig(a)) + sig(-bb) * (logsig(-bb) - logsig(-a))
    elif mode == "fwd_kl":
        per = sig(a) * (logsig(a) - logsig(bb)) + sig(-a) * (logsig(-a) - logsig(-bb))
    else:
        per = (R[:, 0] - R[:, 1]).abs() * L(a)
    return per, mean(per)


def ref_inpo(c):
    eta = c.kwargs.get("eta", 0.0075)
    tau = c.kwargs.get("tau") or eta / 3
    rt = c.kwargs["prev_ref_logps"]
    lw, ll, r0w, r0l = split(c)
    hp = (lw - ll) - (tau / eta) * (r0w - r0l) - (1 - tau / eta) * (rt[:, 0] - rt[:, 1])
    per = (hp - 1 / (2 * eta)) ** 2
    return per, mean(per)


def ref_mrpo(c):
    k = c.kwargs
    b, eps, a_fixed = k.get("beta", 0.1), k.get("eps", 0.1), k.get("a")
    rs = k["ref2_logps"]
    lw, ll, rpw, rpl = split(c)
    rsw, rsl = rs[:, 0], rs[:, 1]
    bw, bl = (rpw + rsw) / 2, (rpl + rsl) / 2
    eps_w = eps * bw.abs() / (bw.abs() + bl.abs())
    eps_l = eps * bl.abs() / (bw.abs() + bl.abs())

    def clip(x, rp, e):  # rp < 0 here: (1+e)*rp is the lower bound
        return torch.minimum(torch.maximum(x, (1 + e) * rp), (1 - e) * rp)

    hw, hl = clip(rsw, rpw, eps_w), clip(rsl, rpl, eps_l)
    if a_fixed is None:
        ms, mp = (rsw - rsl).abs(), (rpw - rpl).abs()
        a = ms / (ms + mp + 1e-6)
    else:
        a = torch.full_like(lw, a_fixed)

    def comb(h, rp):
        mx = torch.maximum(h, rp)
        return h + rp - (mx + torch.log(a * torch.exp(h - mx) + (1 - a) * torch.exp(rp - mx)))

    tw, tl = comb(hw, rpw), comb(hl, rpl)
    per = L(b * ((lw - ll) - (tw - tl)))
    return per, mean(per)


def ref_diffusion_dpo(c):
    b, T = c.kwargs.get("beta", 5000.0), c.kwargs.get("T", 1000.0)
    ew, el, erw, erl = split(c)
    per = L(-b * T * ((ew - erw) - (el - erl)))
    return per, mean(per)


REFERENCES = {
    "dpo": ref_dpo,
    "cdpo": ref_cdpo,
    "robust": ref_robust,
    "ipo": ref_ipo,
    "hinge": ref_hinge,
    "exo": ref_exo,
    "nca": ref_nca,
    "bco_pair": ref_bco_pair,
    "sppo_hard": ref_sppo_hard,
    "sppo": ref_sppo,
    "aot": ref_aot,
    "aot_unpaired": ref_aot_unpaired,
    "apo_zero": ref_apo_zero,
    "apo_down": ref_apo_down,
    "discopop": ref_discopop,
    "sigmoid_norm": ref_sigmoid_norm,
    "fdpo": ref_fdpo,
    "hdpo": ref_hdpo,
    "dpo_shift": ref_dpo_shift,
    "mappo": ref_mappo,
    "odpo": ref_odpo,
    "rdpo_length": ref_rdpo_length,
    "dpop": ref_dpop,
    "modpo": ref_modpo,
    "todo": ref_todo,
    "wpo": ref_wpo,
    "omni_dpo": ref_omni_dpo,
    "reward_aware": ref_reward_aware,
    "inpo": ref_inpo,
    "mrpo": ref_mrpo,
    "diffusion_dpo": ref_diffusion_dpo,
}

CASES = all_cases(REFERENCES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case):
    compare_with_reference(case, REFERENCES[case.key])


def test_sigmoid_alias_is_dpo():
    c = cases("dpo")[0]
    a = preference_loss("sigmoid", c.policy, c.ref, beta=0.3)
    torch.testing.assert_close(a.per_example, ref_dpo(c)[0])


# ---- special-case identities -------------------------------------------------------------------


def _dpo(c, beta):
    return preference_loss("dpo", c.policy, c.ref, beta=beta).per_example


@pytest.mark.parametrize("name,beta,special", [
    ("cdpo", 0.4, dict(eps=0.0)),
    ("robust", 0.4, dict(eps=0.0)),
    ("fdpo", 0.3, dict(divergence="reverse_kl")),
    ("hdpo", 0.3, dict(alpha=1.0)),
    ("dpo_shift", 0.3, dict(lam=1.0)),
    ("dpop", 0.3, dict(lam=0.0)),
], ids=["cdpo_eps0", "robust_eps0", "fdpo_reverse_kl", "hdpo_alpha1", "dpo_shift_lam1", "dpop_lam0"])
def test_special_case_is_dpo(name, beta, special):
    """Each of these heads reduces to DPO at the given hyper-parameters (to rounding)."""
    c = cases("dpo")[0]
    out = preference_loss(name, c.policy, c.ref, beta=beta, **special).per_example
    torch.testing.assert_close(out, _dpo(c, beta), rtol=1e-12, atol=1e-14)


def test_robust_is_not_cdpo():
    c = cases("dpo")[0]
    r = preference_loss("robust", c.policy, c.ref, beta=0.4, eps=0.2).per_example
    cd = preference_loss("cdpo", c.policy, c.ref, beta=0.4, eps=0.2).per_example
    assert (r - cd).abs().max() > 1e-3


def test_fdpo_alpha_limit_is_reverse_kl():
    c = cases("dpo")[0]
    out = preference_loss("fdpo", c.policy, c.ref, beta=0.3, divergence="alpha", alpha=1e-7).per_example
    torch.testing.assert_close(out, _dpo(c, 0.3), rtol=1e-5, atol=1e-6)


def test_fdpo_alpha_exponent_clamped_at_80():
    lp = torch.tensor([[-1.0, -400.0]], dtype=torch.float64)
    rp = torch.zeros_like(lp)
    out = preference_loss("fdpo", lp, rp, beta=0.1, divergence="alpha", alpha=0.5)
    g_l = (1 - math.exp(80.0)) / 0.5  # -alpha*u = 200 clamps to 80
    g_w = (1 - math.exp(0.5)) / 0.5
    torch.testing.assert_close(out.per_example, torch.log1p(torch.exp(-0.1 * torch.tensor([g_w - g_l], dtype=torch.float64))))


def test_ipo_unnormalised_with_unit_lengths_matches():
    c = cases("dpo")[0]
    ones = torch.ones_like(c.policy)
    a = preference_loss("ipo", c.policy, c.ref, beta=0.5, lengths=ones).per_example
    b = preference_loss("ipo", c.policy, c.ref, beta=0.5, length_normalize=False).per_example
    torch.testing.assert_close(a, b)


def test_mrpo_identical_references_is_dpo():
    # rs == rp: clipping is a no-op and r~ = rp + rp - log(a e^rp + (1-a) e^rp) = rp
    c = cases("dpo")[0]
    out = preference_loss("mrpo", c.policy, c.ref, beta=0.3, ref2_logps=c.ref.clone()).per_example
    torch.testing.assert_close(out, _dpo(c, 0.3), rtol=1e-10, atol=1e-12)


def test_inpo_tau_equal_eta_uses_initial_reference_only():
    c = cases("dpo")[0]
    rt = c.ref + 3.0 * torch.randn_like(c.ref)
    a = preference_loss("inpo", c.policy, c.ref, eta=0.1, tau=0.1, prev_ref_logps=rt).per_example
    b = preference_loss("inpo", c.policy, c.ref, eta=0.1, tau=0.1, prev_ref_logps=c.ref).per_example
    torch.testing.assert_close(a, b)


def test_wpo_weights_are_detached():
    c = cases("wpo")[1]  # clamp=False
    pol = c.policy.clone().requires_grad_(True)
    out = preference_loss("wpo", pol, c.ref, **c.kwargs)
    out.loss.backward()
    n, s2 = c.kwargs["lengths"], c.kwargs["log_sum_p2"]
    w = torch.exp((c.policy - s2) / n)
    ww = w[:, 0] * w[:, 1]
    b = c.kwargs["beta"]
    h = (c.policy - c.ref)[:, 0] - (c.policy - c.ref)[:, 1]
    dh = -ww * b * sig(-b * h) / c.policy.shape[0]  # d/dh of -ww*logsig(b h), weights constant
    torch.testing.assert_close(pol.grad, torch.stack([dh, -dh], dim=1))


def test_aot_sorts_along_batch():
    # permuting the batch leaves the sorted per-position losses unchanged
    c = cases("aot")[0]
    perm = torch.tensor([3, 0, 4, 1, 2])
    a = preference_loss("aot", c.policy, c.ref, beta=0.3).per_example
    b = preference_loss("aot", c.policy[perm], c.ref[perm], beta=0.3).per_example
    torch.testing.assert_close(a, b)
