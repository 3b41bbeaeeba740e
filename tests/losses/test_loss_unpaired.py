"""Section 6 (unpaired and single-response losses): float64 references from LOSSES.md."""

from __future__ import annotations

import pytest
import torch

from loss_cases import all_cases, cases, compare_with_reference, ids
from pygpo.losses import preference_loss


def L(z):
    return torch.log1p(torch.exp(-z))


def sig(z):
    return 1 / (1 + torch.exp(-z))


def ref_kto(c):
    k = c.kwargs
    b, wd, wu = k.get("beta", 0.1), k.get("desirable_weight", 1.0), k.get("undesirable_weight", 1.0)
    if "z0" in k:
        z0 = k["z0"]
    else:
        z0 = torch.clamp((k["kl_logps"] - k["kl_ref_logps"]).mean(), min=0).detach()
    u = c.policy - c.ref
    per = torch.where(k["labels"], wd * (1 - sig(b * (u - z0))), wu * (1 - sig(b * (z0 - u))))
    return per, per.mean()


def ref_apo_zero_unpaired(c):
    b = c.kwargs.get("beta", 0.1)
    u = c.policy - c.ref
    per = torch.where(c.kwargs["labels"], 1 - sig(b * u), sig(b * u))
    return per, per.mean()


def ref_bco(c):
    b, d = c.kwargs.get("beta", 0.1), c.kwargs.get("delta", 0.0)
    u = c.policy - c.ref
    per = torch.where(c.kwargs["labels"], L(b * u - d), L(-(b * u - d)))
    return per, per.mean()


def ref_pmpo(c):
    k = c.kwargs
    a, b = k.get("alpha", 0.5), k.get("beta", 0.5)
    y = k["labels"]
    lp = c.policy
    loss = -a * lp[y].mean() + (1 - a) * lp[~y].mean() + b * k["kl"].mean()
    B = len(lp)
    per = torch.where(y, -a * lp * B / y.sum(), (1 - a) * lp * B / (~y).sum()) + b * k["kl"]
    return per, loss


def ref_dro(c):
    k = c.kwargs
    tau = k.get("tau", 1.0)
    R = k["rewards"]
    if k.get("normalize_rewards", True):
        R = (R - R.mean()) / R.std(unbiased=False)
    per = 0.5 * (R - k["values"] - tau * (c.policy - c.ref)) ** 2
    return per, per.mean()


REFERENCES = {
    "kto": ref_kto,
    "apo_zero_unpaired": ref_apo_zero_unpaired,
    "bco": ref_bco,
    "pmpo": ref_pmpo,
    "dro": ref_dro,
}
CASES = all_cases(REFERENCES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case):
    compare_with_reference(case, REFERENCES[case.key])


def test_kto_metrics_split_by_label():
    c = cases("kto")[0]
    out = preference_loss("kto", c.policy, c.ref, **c.kwargs)
    y = c.kwargs["labels"]
    r = 0.3 * (c.policy - c.ref)
    torch.testing.assert_close(out.metrics["rewards/chosen"], r[y].mean())
    torch.testing.assert_close(out.metrics["rewards/rejected"], r[~y].mean())
    torch.testing.assert_close(out.metrics["logps/chosen"], c.policy[y].mean())
    z0 = torch.clamp((c.kwargs["kl_logps"] - c.kwargs["kl_ref_logps"]).mean(), min=0)
    torch.testing.assert_close(out.metrics["kl"], z0)


def test_kto_reference_point_clamped_at_zero():
    c = cases("kto")[1]
    out = preference_loss("kto", c.policy, c.ref, **c.kwargs)
    assert float(out.metrics["kl"]) == 0.0


def test_kto_one_sided_batch_has_no_rejected_metrics():
    c = cases("kto")[2]
    ones = torch.ones_like(c.kwargs["labels"])
    out = preference_loss("kto", c.policy, c.ref, labels=ones, z0=c.kwargs["z0"])
    assert "rewards/rejected" not in out.metrics and "rewards/chosen" in out.metrics
