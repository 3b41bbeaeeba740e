"""Section 4 of LOSSES.md: reference-free heads.

Scores are the policy's token-summed log-probs ``lp`` ``(B, 2)``; ``m = lp / |y|`` where a head
length-normalises (``lengths=`` required). ``NLL_mean(y_w)`` is the token mean over the batch's chosen
tokens, spread over the examples as in :func:`~pygpo.losses.common_inputs.batch_token_mean_nll`.
The pair metrics use ``beta * score`` as the reward (the head's own score: ``m`` for the
length-normalised heads, as TRL's CPO/SimPO/ORPO report).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ._math import log1mexp, logsig, ls
from .common_inputs import LENGTHS_PAIR, SUM_LOGPS, batch_token_mean_nll, mean_scores, token_sums
from .constraints import NONNEGATIVE, POSITIVE, REAL, Interval, positive_int
from .registry import HeadResult, LossInput, LossSpec, register
from .validation import require


@register(
    "simpo",
    section=4,
    kind="reference_free",
    reference="none",
    paper="SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng et al., 2024)",
    formula="(1-eps)*ls(z) + eps*ls(-z), z = beta*(lp_w/|y_w| - lp_l/|y_l|) - gamma",
    inputs=(LENGTHS_PAIR,),
    defaults={"beta": 2.0, "gamma": 0.5, "eps": 0.0},
    ranges={"beta": POSITIVE, "gamma": REAL, "eps": Interval(0.0, 0.5)},
    trl_name="CPO loss_type='simpo' (simpo_gamma = gamma)",
    notes="gamma is absolute (not gamma/beta).",
)
def simpo(policy: Tensor, ref: None, *, beta: float, gamma: float, eps: float, lengths: Tensor) -> HeadResult:
    """SimPO: length-normalised log-prob margin with a target margin ``gamma``."""
    m_w, m_l = mean_scores(policy, lengths)
    z = beta * (m_w - m_l) - gamma
    return HeadResult((1 - eps) * ls(z) + eps * ls(-z), rewards=(beta * m_w, beta * m_l))


@register(
    "cpo",
    section=4,
    kind="reference_free",
    reference="none",
    paper="Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation (Xu et al., 2024)",
    formula="(1-eps)*ls(beta*(lp_w - lp_l)) + eps*ls(-beta*(lp_w - lp_l)) + alpha*NLL_mean(y_w)",
    inputs=(LENGTHS_PAIR, SUM_LOGPS),
    defaults={"beta": 0.1, "eps": 0.0, "alpha": 1.0},
    ranges={"beta": POSITIVE, "eps": Interval(0.0, 0.5), "alpha": NONNEGATIVE},
    trl_name="CPO loss_type='sigmoid' (cpo_alpha = alpha)",
)
def cpo(policy: Tensor, ref: None, *, beta: float, eps: float, alpha: float, lengths: Tensor,
        sum_logps: Optional[Tensor] = None) -> HeadResult:
    """CPO: reference-free DPO plus a behaviour-cloning NLL on the chosen responses (on ``sum_logps`` where given)."""
    z = beta * (policy[:, 0] - policy[:, 1])
    nll = batch_token_mean_nll(token_sums(policy, sum_logps)[:, 0], lengths[:, 0])
    per = (1 - eps) * ls(z) + eps * ls(-z) + alpha * nll
    return HeadResult(per, rewards=(beta * policy[:, 0], beta * policy[:, 1]), metrics={"nll_loss": nll.detach().mean()})


@register(
    "orpo",
    section=4,
    kind="reference_free",
    reference="none",
    paper="ORPO: Monolithic Preference Optimization without Reference Model (Hong et al., 2024)",
    formula="NLL_mean(y_w) - lam*logsig(L), L = (m_w - m_l) - (log1mexp(m_w) - log1mexp(m_l)), m = lp/|y|, "
    "log1mexp(x) = log(1 - e^x) computed stably",
    inputs=(LENGTHS_PAIR,),
    defaults={"lam": 0.1},
    ranges={"lam": NONNEGATIVE},
    trl_name="ORPOTrainer.odds_ratio_loss (beta = lam)",
    notes="Rewards for the metrics are lam * m (TRL's ORPO reports beta * mean log-prob with beta = lam).",
    extra={"check": lambda spec, inputs, hp, policy: require(spec, (policy / inputs["lengths"] < 0).all(dim=1),
                                                             "ORPO needs mean log-probs m = lp/|y| < 0 (probabilities below 1)")},
)
def orpo(policy: Tensor, ref: None, *, lam: float, lengths: Tensor) -> HeadResult:
    """ORPO: NLL plus a log-odds-ratio term."""
    m_w, m_l = mean_scores(policy, lengths)
    log_odds = (m_w - m_l) - (log1mexp(m_w) - log1mexp(m_l))
    ratio = logsig(log_odds)
    nll = batch_token_mean_nll(policy[:, 0], lengths[:, 0])
    return HeadResult(
        nll - lam * ratio,
        rewards=(lam * m_w, lam * m_l),
        metrics={"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean(), "nll_loss": nll.detach().mean()},
    )


def alphapo_reward(m: Tensor, a: float) -> Tensor:
    """AlphaPO reward shape ``(1 - exp(-a m)) / a``; ``a = 0`` is ``m`` (the SimPO limit)."""
    if a == 0:
        return m
    return -torch.expm1(-a * m) / a


@register(
    "alphapo",
    section=4,
    kind="reference_free",
    reference="none",
    paper="AlphaPO: Reward shape matters for LLM alignment (Gupta et al., 2025)",
    formula="ls(beta*(ra(y_w) - ra(y_l)) - gamma), ra(y) = (1 - exp(-a*lp(y)/|y|))/a (a -> 0 gives SimPO)",
    inputs=(LENGTHS_PAIR,),
    defaults={"beta": 2.0, "gamma": 0.5, "a": 0.25},
    ranges={"beta": POSITIVE, "gamma": REAL, "a": REAL},
    trl_name="CPO loss_type='simpo' with alpha = a",
    notes="LOSSES.md names beta and gamma without values; SimPO's (2.0, 0.5) are used so that a -> 0 "
    "with defaults is SimPO with defaults. a = 0 is accepted and is exactly SimPO (eps = 0).",
)
def alphapo(policy: Tensor, ref: None, *, beta: float, gamma: float, a: float, lengths: Tensor) -> HeadResult:
    """AlphaPO: SimPO on the shaped reward ``ra``."""
    m_w, m_l = mean_scores(policy, lengths)
    ra_w, ra_l = alphapo_reward(m_w, a), alphapo_reward(m_l, a)
    return HeadResult(ls(beta * (ra_w - ra_l) - gamma), rewards=(beta * ra_w, beta * ra_l))


@register(
    "repo",
    section=4,
    kind="reference_free",
    reference="none",
    paper="RePO: ReLU-based Preference Optimization (Wu et al., 2025)",
    formula="relu(gamma - (lp_w/|y_w| - lp_l/|y_l|)) (no beta)",
    inputs=(LENGTHS_PAIR,),
    defaults={"gamma": 0.6},
    ranges={"gamma": REAL},
    notes="No beta: rewards/* report m = lp/|y|.",
)
def repo(policy: Tensor, ref: None, *, gamma: float, lengths: Tensor) -> HeadResult:
    """RePO: a hinge on the length-normalised margin."""
    m_w, m_l = mean_scores(policy, lengths)
    return HeadResult(torch.relu(gamma - (m_w - m_l)), rewards=(m_w, m_l))


def _check_asft(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
    require(spec, policy[:, 1] / inputs["lengths"][:, 1] < 0, "ASFT needs the rejected mean log-prob lp_l/|y_l| < 0 (P_l < 1)")


@register(
    "asft",
    section=4,
    kind="reference_free",
    reference="none",
    paper="ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood (Wang et al., 2024)",
    formula="-lp_w/|y_w| + lam*[-log P_w - log(1 - P_l)], P = exp(lp/|y|) (log(1-P) computed stably)",
    inputs=(LENGTHS_PAIR,),
    defaults={"lam": 1.0},
    ranges={"lam": NONNEGATIVE},
    notes="No beta: rewards/* report m = lp/|y|.",
    extra={"check": _check_asft},
)
def asft(policy: Tensor, ref: None, *, lam: float, lengths: Tensor) -> HeadResult:
    """ASFT: mean NLL plus absolute-likelihood terms for both responses."""
    m_w, m_l = mean_scores(policy, lengths)
    return HeadResult(-m_w + lam * (-m_w - log1mexp(m_l)), rewards=(m_w, m_l))


@register(
    "tpo_triple",
    section=4,
    kind="reference_free",
    reference="none",
    paper="Triple Preference Optimization: Achieving Better Alignment using a Single Step Optimization (Saeidi et al., 2024)",
    formula="ls(beta*(lp_w - lp_l)) + alpha*NLL_mean(y_gold)",
    inputs=(
        LossInput("gold_logps", (("B",),), "policy score lp(y_gold) of the gold response (token sum)", differentiable=True),
        LossInput("gold_lengths", (("B",),), "completion token count of the gold response"),
    ),
    defaults={"beta": 0.1, "alpha": 1.0},
    ranges={"beta": POSITIVE, "alpha": NONNEGATIVE},
    extra={"check": lambda spec, inputs, hp, policy: require(spec, inputs["gold_lengths"] > 0, "gold_lengths must be >= 1")},
)
def tpo_triple(policy: Tensor, ref: None, *, beta: float, alpha: float, gold_logps: Tensor, gold_lengths: Tensor) -> HeadResult:
    """TPO (triple): reference-free preference term plus NLL on a third, gold response."""
    nll = batch_token_mean_nll(gold_logps, gold_lengths)
    per = ls(beta * (policy[:, 0] - policy[:, 1])) + alpha * nll
    return HeadResult(per, rewards=(beta * policy[:, 0], beta * policy[:, 1]), metrics={"nll_loss": nll.detach().mean()})


def gamma_po_margins(r: Tensor, *, gamma_0: float, tau: float, steps: int = 20) -> Tensor:
    """gamma-PO target margins ``gamma_i = gamma_0 N p_i`` (detached).

    ``p = argmin_{simplex} (1/N) sum_i ls(r_i - gamma_0 N p_i) + tau sum_i p_i log(N p_i)`` by
    ``steps`` of mirror descent (exponentiated gradient) from the uniform point, step size
    ``min(0.5 / tau, 1)`` (the authors' code). The gradient is
    ``gamma_0 sigma(gamma_0 N p_i - r_i) + tau (1 + log(N p_i))``.
    """
    with torch.no_grad():
        r = r.detach()
        n = r.shape[0]
        lr = min(0.5 / tau, 1.0)
        p = torch.full_like(r, 1.0 / n)
        for _ in range(steps):
            grad = gamma_0 * torch.sigmoid(gamma_0 * n * p - r) + tau * (1 + torch.log(n * p))
            p = p * torch.exp(-lr * (grad - grad.max()))
            p = p / p.sum()
        return gamma_0 * n * p


@register(
    "simpo_gamma_dynamic",
    section=4,
    kind="reference_free",
    reference="none",
    aliases=("gammapo",),
    paper="Robust Preference Optimization via Dynamic Target Margins (gamma-PO; Sun et al., 2025)",
    formula="ls(r_i - sg[gamma_i]), r_i the SimPO margin, gamma_i = gamma_0*N*p_i, p = argmin over the simplex of "
    "(1/N) sum_i ls(r_i - gamma_0 N p_i) + tau sum_i p_i log(N p_i) (mirror descent, 20 steps)",
    inputs=(LENGTHS_PAIR,),
    defaults={"beta": 2.0, "gamma_0": 0.5, "tau": 10.0, "steps": 20},
    ranges={"beta": POSITIVE, "gamma_0": POSITIVE, "tau": POSITIVE, "steps": positive_int()},
    gradcheck=False,
    notes="r_i = beta*(lp_w/|y_w| - lp_l/|y_l|). Mirror-descent step size min(0.5/tau, 1) as the authors' code; "
    "beta, gamma_0, tau defaults from SimPO (2.0, 0.5) and the authors' configs (tau=10). "
    "N is the local (micro-)batch; the margins are not all-gathered across ranks.",
)
def simpo_gamma_dynamic(policy: Tensor, ref: None, *, beta: float, gamma_0: float, tau: float, steps: int, lengths: Tensor) -> HeadResult:
    """gamma-PO on SimPO: instance-specific target margins from a KL-regularised allocation."""
    m_w, m_l = mean_scores(policy, lengths)
    r = beta * (m_w - m_l)
    gam = gamma_po_margins(r, gamma_0=gamma_0, tau=tau, steps=int(steps))
    return HeadResult(ls(r - gam), rewards=(beta * m_w, beta * m_l), metrics={"gamma/mean": gam.mean(), "gamma/max": gam.max()})
