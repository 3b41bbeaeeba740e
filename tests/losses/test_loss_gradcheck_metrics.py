"""float64 gradcheck of every differentiable loss, and the TRL-named metrics of every pairwise loss."""

from __future__ import annotations

import pytest
import torch

from loss_cases import all_cases, ids
from pygpo.losses import get, names, preference_loss

HEADS = [k for k in names() if get(k).kind != "reducer"]
NO_GRADCHECK = {"wpo", "simpo_gamma_dynamic", "beta_dpo"}  # stop-gradient on policy-dependent terms
GRAD_CASES = [c for c in all_cases(HEADS) if get(c.key).gradcheck]


def test_only_stop_gradient_losses_skip_gradcheck():
    # Their gradients are compared with the float64 references' autograd gradients instead
    # (compare_with_reference, test_beta_dpo_matches_reference).
    assert {k for k in HEADS if not get(k).gradcheck} == NO_GRADCHECK


def _grad_inputs(case):
    spec = get(case.key)
    skip = set(spec.extra.get("no_gradcheck_inputs", ()))
    return [i.name for i in spec.inputs if i.differentiable and i.name in case.kwargs and i.name not in skip]


@pytest.mark.parametrize("case", GRAD_CASES, ids=ids(GRAD_CASES))
def test_gradcheck(case):
    names_ = _grad_inputs(case)
    tensors = [case.policy.detach().clone().requires_grad_(True)]
    tensors += [case.kwargs[n].detach().clone().requires_grad_(True) for n in names_]
    ref = case.ref
    fixed = {k: v for k, v in case.kwargs.items() if k not in names_}

    def f(policy, *extra):
        kw = dict(fixed, **dict(zip(names_, extra)))
        out = preference_loss(case.key, policy, ref, **kw)
        return out.loss, out.per_example

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


# ---- metrics -----------------------------------------------------------------------------------

PAIR_KINDS = {"pairwise", "token_kl", "reference_free", "batch"}
PAIR_CASES = [c for c in all_cases(HEADS) if get(c.key).kind in PAIR_KINDS]
TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")

# Reference-free rewards: beta * (the head's policy score); m = lp / |y|.
REF_FREE_REWARD = {
    "simpo": lambda c, m, lp: c.kwargs.get("beta", 2.0) * m,
    "alphapo": None,  # shaped reward, checked in its own test below
    "simpo_gamma_dynamic": lambda c, m, lp: c.kwargs.get("beta", 2.0) * m,
    "orpo": lambda c, m, lp: c.kwargs.get("lam", 0.1) * m,
    "repo": lambda c, m, lp: m,
    "asft": lambda c, m, lp: m,
    "cpo": lambda c, m, lp: c.kwargs.get("beta", 0.1) * lp,
    "tpo_triple": lambda c, m, lp: c.kwargs.get("beta", 0.1) * lp,
}
OWN_REWARD = {"mrpo", "diffusion_dpo", "tdpo1", "tdpo2", "sparsepo", "rrpo"}


def _seq(case):
    if case.policy.dim() == 3:
        m = case.kwargs["mask"].double()
        return (case.policy * m).sum(-1), (case.ref * m).sum(-1)
    return case.policy, case.ref


@pytest.mark.parametrize("case", PAIR_CASES, ids=ids(PAIR_CASES))
def test_pair_metrics(case):
    spec = get(case.key)
    kw = dict(case.kwargs)
    if case.key == "beta_dpo":
        kw["generator"] = torch.Generator().manual_seed(0)
    out = preference_loss(case.key, case.policy, case.ref, **kw)
    for name in TRL_NAMES:
        v = out.metrics[name]
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad and torch.isfinite(v), name
    met = out.metrics
    torch.testing.assert_close(met["rewards/margins"], met["rewards/chosen"] - met["rewards/rejected"])
    assert 0.0 <= float(met["rewards/accuracies"]) <= 1.0
    lp, rp = _seq(case)
    torch.testing.assert_close(met["logps/chosen"], lp[:, 0].mean())
    torch.testing.assert_close(met["logps/rejected"], lp[:, 1].mean())
    if case.key in OWN_REWARD or REF_FREE_REWARD.get(case.key, 0) is None:
        return
    if spec.reference == "none":
        n = case.kwargs.get("lengths", torch.ones_like(lp))
        r = REF_FREE_REWARD[case.key](case, lp / n, lp)
    else:
        beta = case.kwargs.get("beta", spec.defaults.get("beta", 1.0))
        r = beta * (lp - rp)
    torch.testing.assert_close(met["rewards/chosen"], r[:, 0].mean())
    torch.testing.assert_close(met["rewards/rejected"], r[:, 1].mean())
    torch.testing.assert_close(met["rewards/accuracies"], (r[:, 0] > r[:, 1]).double().mean())


def test_loss_specific_metrics():
    c = all_cases(["orpo"])[0]
    out = preference_loss("orpo", c.policy, **c.kwargs)
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(out.metrics)
    c = all_cases(["beta_dpo"])[0]
    assert "beta_batch" in preference_loss("beta_dpo", c.policy, c.ref, **c.kwargs).metrics
    c = all_cases(["kto"])[0]
    assert "kl" in preference_loss("kto", c.policy, c.ref, **c.kwargs).metrics
    c = all_cases(["alphapo"])[0]
    out = preference_loss("alphapo", c.policy, **c.kwargs)
    n = c.kwargs["lengths"]
    ra = (1 - torch.exp(-0.3 * c.policy[:, 0] / n[:, 0])) / 0.3
    torch.testing.assert_close(out.metrics["rewards/chosen"], (2.0 * ra).mean())


def test_diffusion_rewards():
    c = all_cases(["diffusion_dpo"])[0]
    out = preference_loss("diffusion_dpo", c.policy, c.ref, **c.kwargs)
    r = -1.0 * 10.0 * (c.policy - c.ref)
    torch.testing.assert_close(out.metrics["rewards/chosen"], r[:, 0].mean())
