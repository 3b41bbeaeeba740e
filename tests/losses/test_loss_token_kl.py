"""Section 3 (token-level KL heads): float64 references from LOSSES.md and the sparsepo == tdpo1 identity."""

from __future__ import annotations

import pytest
import torch

from loss_cases import Case, all_cases, cases, compare_with_reference, ids
from pygpo.losses import preference_loss


def L(z):
    return torch.log1p(torch.exp(-z))


def tok_sum(x, mask):
    return (x * mask.double()).sum(-1)


def seq(c: Case):
    """Sequence scores (lp, rp, D) from per-token or sequence inputs."""
    if c.policy.dim() == 3:
        m = c.kwargs["mask"]
        return tok_sum(c.policy, m), tok_sum(c.ref, m), tok_sum(c.kwargs["kl"], m)
    return c.policy, c.ref, c.kwargs["kl"]


def ref_tdpo1(c):
    b = c.kwargs.get("beta", 0.1)
    lp, rp, D = seq(c)
    h = (lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1])
    per = L(b * (h - (D[:, 1] - D[:, 0])))
    return per, per.mean()


def ref_tdpo2(c):
    b, a = c.kwargs.get("beta", 0.1), c.kwargs.get("a", 0.5)
    lp, rp, D = seq(c)
    h = (lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1])
    per = L(b * (h - a * (D[:, 1] - D[:, 0].detach())))
    return per, per.mean()


def ref_sparsepo(c):
    k = c.kwargs
    b, lu, ld = k.get("beta", 0.1), k.get("lam_u", 0.0), k.get("lam_d", 0.0)
    m = k["mask"].double()
    mu = k.get("mu", torch.ones_like(c.policy))
    md = k.get("md", torch.ones_like(c.policy))
    u_t = c.policy - c.ref
    K = -k["kl"]
    U = (mu[:, 0] * u_t[:, 0] * m[:, 0]).sum(-1) - (mu[:, 1] * u_t[:, 1] * m[:, 1]).sum(-1)
    Dm = (md[:, 0] * K[:, 0] * m[:, 0]).sum(-1) - (md[:, 1] * K[:, 1] * m[:, 1]).sum(-1)
    l1 = lu * (mu.abs() * m).sum((1, 2)) + ld * (md.abs() * m).sum((1, 2))
    per = L(b * (U - Dm)) + l1
    return per, per.mean()


def ref_rrpo(c):
    k = c.kwargs
    b, a = k.get("beta", 0.1), k.get("alpha", 0.01)
    m, seg = k["mask"], k["segment_ids"]
    u_t = c.policy - c.ref
    n_seg = int(seg.max()) + 1
    total = torch.zeros(c.policy.shape[0], dtype=torch.float64)
    for i in range(n_seg):  # sum_i [seg_i(u_w) - seg_i(u_l)], written as in the formula
        in_w = ((seg[:, 0] == i) & m[:, 0]).double()
        in_l = ((seg[:, 1] == i) & m[:, 1]).double()
        total = total + (u_t[:, 0] * in_w).sum(-1) - (u_t[:, 1] * in_l).sum(-1)
    kl_w = (k["kl"][:, 0] * m[:, 0].double()).sum(-1)
    per = L(b * total) + a * kl_w
    return per, per.mean()


REFERENCES = {"tdpo1": ref_tdpo1, "tdpo2": ref_tdpo2, "sparsepo": ref_sparsepo, "rrpo": ref_rrpo}
CASES = all_cases(REFERENCES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case):
    compare_with_reference(case, REFERENCES[case.key])


def test_sparsepo_unit_masks_is_tdpo1():
    c = cases("sparsepo")[1]
    ones = torch.ones_like(c.policy)
    a = preference_loss("sparsepo", c.policy, c.ref, beta=0.3, kl=c.kwargs["kl"], mask=c.kwargs["mask"], mu=ones, md=ones)
    b = preference_loss("tdpo1", c.policy, c.ref, beta=0.3, kl=c.kwargs["kl"], mask=c.kwargs["mask"])
    torch.testing.assert_close(a.per_example, b.per_example, rtol=1e-12, atol=1e-14)


def test_token_and_sequence_inputs_agree():
    c = cases("tdpo1")[0]
    m = c.kwargs["mask"]
    a = preference_loss("tdpo2", c.policy, c.ref, beta=0.3, a=0.4, kl=c.kwargs["kl"], mask=m)
    b = preference_loss("tdpo2", tok_sum(c.policy, m), tok_sum(c.ref, m), beta=0.3, a=0.4, kl=tok_sum(c.kwargs["kl"], m))
    torch.testing.assert_close(a.per_example, b.per_example)


def test_tdpo2_stops_gradient_of_chosen_kl():
    c = cases("tdpo2")[1]
    kl = c.kwargs["kl"].clone().requires_grad_(True)
    out = preference_loss("tdpo2", c.policy, c.ref, beta=0.3, a=0.7, kl=kl)
    out.loss.backward()
    assert torch.all(kl.grad[:, 0] == 0)
    assert torch.all(kl.grad[:, 1] != 0)


def test_padding_garbage_is_ignored():
    c = cases("tdpo1")[0]
    m = c.kwargs["mask"]
    pol = torch.where(m, c.policy, torch.full_like(c.policy, float("nan")))
    a = preference_loss("tdpo1", pol, c.ref, beta=0.3, kl=c.kwargs["kl"], mask=m)
    b = preference_loss("tdpo1", c.policy, c.ref, beta=0.3, kl=c.kwargs["kl"], mask=m)
    torch.testing.assert_close(a.per_example, b.per_example)
