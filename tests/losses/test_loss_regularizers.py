"""Section 5 (additive regularizers) and combined losses ``sum_k weight_k * mean_B(loss_k)``."""

from __future__ import annotations

import pytest
import torch

from loss_cases import all_cases, cases, compare_with_reference, ids
from pygpo.losses import UnexpectedArgumentError, preference_loss


def L(z):
    return torch.log1p(torch.exp(-z))


def ref_sft(c):
    a = c.kwargs.get("alpha", 1.0)
    n = c.kwargs["lengths"][:, 0]
    lw = c.policy[:, 0]
    loss = a * (-lw.sum() / n.sum())
    return a * (-lw * len(lw) / n.sum()), loss


def ref_rpo_sum(c):
    b, eta = c.kwargs.get("beta", 0.1), c.kwargs.get("eta", 1.0)
    per = -eta * b * c.policy[:, 0]
    return per, per.mean()


def ref_xpo(c):
    per = c.kwargs.get("alpha", 1e-5) * c.kwargs["sample_logps"]
    return per, per.mean()


def ref_selm(c):
    k = c.kwargs
    per = k.get("alpha", 1e-3) * k.get("beta", 0.1) * (k["sample_logps"] - k["sample_ref_logps"])
    return per, per.mean()


def ref_vpo(c):
    k = c.kwargs
    sign = 1.0 if k.get("mode", "offline") == "online" else -1.0
    per = sign * k.get("alpha", 1.0) * k.get("beta", 0.1) * (k["calib_logps"] - k["calib_ref_logps"]).mean(1)
    return per, per.mean()


def ref_rationale(c):
    per = L(c.kwargs.get("gamma", 1.0) * c.kwargs["rationale_logps"])
    return per, per.mean()


def ref_anchor(c):
    b, d = c.kwargs.get("beta", 0.1), c.kwargs.get("delta", 0.0)
    per = L(b * (c.policy[:, 0] - c.ref[:, 0]) - d)
    return per, per.mean()


def ref_conditional(c):
    k = c.kwargs
    b = k.get("beta", 0.1)
    per = L(b * ((c.policy[:, 0] - c.ref[:, 0]) - (k["cond_logps"] - k["cond_ref_logps"])))
    return per, per.mean()


REFERENCES = {
    "sft": ref_sft,
    "rpo_sum": ref_rpo_sum,
    "xpo": ref_xpo,
    "selm": ref_selm,
    "vpo": ref_vpo,
    "rationale": ref_rationale,
    "anchor": ref_anchor,
    "conditional": ref_conditional,
}
CASES = all_cases(REFERENCES)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_matches_reference(case):
    compare_with_reference(case, REFERENCES[case.key])


def _pair():
    c = cases("sigmoid_norm")[0]
    return c.policy, c.ref, c.kwargs["lengths"]


def test_combined_dpo_plus_sft_weights():
    lp, rp, n = _pair()
    out = preference_loss(["dpo", "sft"], lp, rp, lengths=n, loss_weights=[1.0, 0.3], beta=0.2, alpha=0.5)
    dpo = L(0.2 * ((lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1]))).mean()
    sft = 0.5 * (-lp[:, 0].sum() / n[:, 0].sum())
    torch.testing.assert_close(out.loss, dpo + 0.3 * sft)
    torch.testing.assert_close(out.per_example.mean(), out.loss)
    assert set(out.metrics) >= {"rewards/chosen", "nll_loss", "loss/dpo", "loss/sft"}


def test_combined_forms_agree():
    lp, rp, n = _pair()
    a = preference_loss({"dpo": 1.0, "anchor": 0.5}, lp, rp, beta=0.2).loss
    b = preference_loss("dpo+anchor", lp, rp, beta=0.2, loss_weights=[1.0, 0.5]).loss
    c = preference_loss(["dpo", "anchor"], lp, rp, beta=0.2, loss_weights=[1.0, 0.5]).loss
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_combined_per_component_keywords():
    lp, rp, n = _pair()
    out = preference_loss(["dpo", "anchor"], lp, rp, **{"dpo.beta": 0.2, "anchor.beta": 0.05, "anchor.delta": 0.3})
    dpo = L(0.2 * ((lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1]))).mean()
    anc = L(0.05 * (lp[:, 0] - rp[:, 0]) - 0.3).mean()
    torch.testing.assert_close(out.loss, dpo + anc)


def test_reference_free_component_gets_no_reference():
    lp, rp, n = _pair()
    out = preference_loss(["dpo", "simpo"], lp, rp, lengths=n, **{"dpo.beta": 0.1, "simpo.beta": 2.0})
    simpo = preference_loss("simpo", lp, lengths=n, beta=2.0).loss
    dpo = preference_loss("dpo", lp, rp, beta=0.1).loss
    torch.testing.assert_close(out.loss, dpo + simpo)


def test_combined_unknown_keyword_rejected():
    lp, rp, n = _pair()
    with pytest.raises(UnexpectedArgumentError, match="gamma"):
        preference_loss(["dpo", "anchor"], lp, rp, gamma=1.0)


def test_single_loss_weight():
    lp, rp, n = _pair()
    a = preference_loss("dpo", lp, rp, loss_weights=[2.0]).loss
    torch.testing.assert_close(a, 2 * preference_loss("dpo", lp, rp).loss)
