"""Section 4 of LOSSES.md: reference-free heads.

Scores are the policy's token-summed log-probs ``lp`` ``(B, 2)``; ``m = lp / |y|`` where a head
length-normalises (``lengths=`` required). ``NLL_mean(y_w)`` is the token mean over the batch's chosen
tokens, spread over the examples as in :func:`~pygpo.losses.common_inputs.batch_token_mean_nll`.
The pair metrics use ``beta * score`` as the reward (the head's own score: ``m`` for the
length-normalised heads, as TRL's CPO/SimPO/ORPO report).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ._math import log1mexp, logsig, ls
from .common_inputs import LENGTHS_PAIR, NLL_MEAN_LENGTH, SUM_LOGPS, batch_token_mean_nll, mean_scores, token_sums
from .constraints import NONNEGATIVE, POSITIVE, REAL, Interval
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
    inputs=(LENGTHS_PAIR, SUM_LOGPS, NLL_MEAN_LENGTH),
    defaults={"beta": 0.1, "eps": 0.0, "alpha": 1.0},
    ranges={"beta": POSITIVE, "eps": Interval(0.0, 0.5), "alpha": NONNEGATIVE},
    trl_name="CPO loss_type='sigmoid' (cpo_alpha = alpha)",
)
def cpo(policy: Tensor, ref: None, *, beta: float, eps: float, alpha: float, lengths: Tensor,
        sum_logps: Optional[Tensor] = None, nll_mean_length: Optional[Tensor] = None) -> HeadResult:
    """CPO: reference-free DPO plus a behaviour-cloning NLL on the chosen responses (on ``sum_logps`` where given)."""
    z = beta * (policy[:, 0] - policy[:, 1])
    nll = batch_token_mean_nll(token_sums(policy, sum_logps)[:, 0], lengths[:, 0], nll_mean_length)
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
    inputs=(LENGTHS_PAIR, NLL_MEAN_LENGTH),
    defaults={"lam": 0.1},
    ranges={"lam": NONNEGATIVE},
    trl_name="ORPOTrainer.odds_ratio_loss (beta = lam)",
    notes="Rewards for the metrics are lam * m (TRL's ORPO reports beta * mean log-prob with beta = lam).",
    extra={"check": lambda spec, inputs, hp, policy: require(spec, (policy / inputs["lengths"] < 0).all(dim=1),
                                                             "ORPO needs mean log-probs m = lp/|y| < 0 (probabilities below 1)")},
)
def orpo(policy: Tensor, ref: None, *, lam: float, lengths: Tensor, nll_mean_length: Optional[Tensor] = None) -> HeadResult:
    """ORPO: NLL plus a log-odds-ratio term."""
    m_w, m_l = mean_scores(policy, lengths)
    log_odds = (m_w - m_l) - (log1mexp(m_w) - log1mexp(m_l))
    ratio = logsig(log_odds)
    nll = batch_token_mean_nll(policy[:, 0], lengths[:, 0], nll_mean_length)
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
        NLL_MEAN_LENGTH,
    ),
    defaults={"beta": 0.1, "alpha": 1.0},
    ranges={"beta": POSITIVE, "alpha": NONNEGATIVE},
    extra={"check": lambda spec, inputs, hp, policy: require(spec, inputs["gold_lengths"] > 0, "gold_lengths must be >= 1")},
)
def tpo_triple(policy: Tensor, ref: None, *, beta: float, alpha: float, gold_logps: Tensor, gold_lengths: Tensor,
               nll_mean_length: Optional[Tensor] = None) -> HeadResult:
    """TPO (triple): reference-free preference term plus NLL on a third, gold response."""
    nll = batch_token_mean_nll(gold_logps, gold_lengths, nll_mean_length)
    per = ls(beta * (policy[:, 0] - policy[:, 1])) + alpha * nll
    return HeadResult(per, rewards=(beta * policy[:, 0], beta * policy[:, 1]), metrics={"nll_loss": nll.detach().mean()})


def gamma_po_iterations(gamma_0: float, tau: float) -> int:
    """Newton iterations :func:`gamma_po_margins` takes: ``1 + 2 ceil(log2(1 + 4 gamma_0 (1 + gamma_0) / tau))``.

    A function of the hyper-parameters only (never of tensor values), so the solve is a fixed
    sequence of kernels. It grows with the ratio of the loss term's slope and curvature
    (``gamma_0``, ``gamma_0^2``) to the entropy weight ``tau``, which is what lengthens the damped
    phase: 3 at the defaults (``gamma_0 = 0.5, tau = 10``), 19 at ``tau = 0.01``. It is at least one
    more than 1,600 randomised problems (``gamma_0`` up to 10, ``tau`` in [0.01, 100], ``N`` up to 512,
    ``|r|`` up to 1e4) needed to reach 1e-9; each iteration past that squares the error.
    """
    return 1 + 2 * math.ceil(math.log2(1.0 + 4.0 * gamma_0 * (1.0 + gamma_0) / tau))


def _gamma_po_terms(u: Tensor, r: Tensor, gamma_0: float, tau: float) -> Tensor:
    """Per-pair terms of ``N`` times the gamma-PO objective at ``x = exp(u)`` (``sum_i x_i = N``):
    ``ls(r_i - gamma_0 x_i) + tau x_i log x_i``."""
    x = torch.exp(u)
    return ls(r - gamma_0 * x) + tau * x * u


def _onto_simplex(u: Tensor, log_n: float) -> Tensor:
    """Shift ``u`` (last dim) so that ``sum exp(u) = N``: ``x = N softmax(u)``."""
    return u - torch.logsumexp(u, dim=-1, keepdim=True) + log_n


def _water_filling_start(r: Tensor, gamma_0: float, tau: float, log_n: float) -> Tensor:
    """``log x`` of the ``tau -> 0`` solution ``gamma_i = max(0, r_i - theta)``, ``sum_i gamma_i = gamma_0 N``
    (the sort-based threshold of a projection onto the simplex), with ``log x_i`` floored at
    ``-gamma_0 / tau``: at the argmin ``tau log x_i = mu - gamma_0 sigma(.) > -gamma_0`` (``mu > 0``)."""
    n = r.shape[0]
    desc = torch.sort(r, descending=True).values
    count = torch.arange(1, n + 1, dtype=r.dtype, device=r.device)
    thresholds = (torch.cumsum(desc, 0) - gamma_0 * n) / count
    active = (desc > thresholds).sum(0, keepdim=True)  # the active set is a prefix of the sorted margins
    theta = thresholds.gather(0, (active - 1).clamp(min=0))
    u = torch.log(torch.clamp(r - theta, min=0.0) / gamma_0).clamp(min=-gamma_0 / tau)
    return _onto_simplex(u, log_n)


def gamma_po_margins(r: Tensor, *, gamma_0: float, tau: float) -> Tensor:
    """gamma-PO target margins ``gamma_i = gamma_0 N p_i`` (detached, in ``r``'s dtype), ``r`` of shape ``(N,)``.

    ``p = argmin over the simplex of (1/N) sum_i ls(r_i - gamma_0 N p_i) + tau sum_i p_i log(N p_i)``
    ("Robust Preference Optimization via Dynamic Target Margins", Sun et al., 2025). With ``x = N p``
    (``sum x = N``) this is ``min F(x) = sum_i ls(r_i - gamma_0 x_i) + tau x_i log x_i``, strictly convex;
    the entropy keeps every ``x_i > 0``, so the argmin is the unique solution of the KKT conditions
    ``g_i = gamma_0 sigma(gamma_0 x_i - r_i) + tau log x_i = mu`` (one multiplier ``mu`` for all ``i``).

    Solved in float64 by damped Newton in the mirror (log) coordinates ``u = log x``:

    - Newton direction of the equality-constrained problem: with the Hessian ``H_i = gamma_0^2 sigma'_i
      + tau / x_i``, ``d_i = (nu - g_i) / H_i`` where ``nu = sum(g / H) / sum(1 / H)`` makes ``sum d = 0``.
      It is applied multiplicatively, ``u_i += t d_i / x_i``, then renormalised (``x = N softmax(u)``):
      the points stay on the simplex, the curve is tangent to ``d`` at ``t = 0`` (so it descends), and
      for the entropy term alone the full step is exact.
    - Step: ``t = 1`` where it meets Armijo's condition (up to rounding in ``F``), else the one of
      ``t in {2^-1, ..., 2^-11, 0}`` with the least ``F``, so ``F`` never increases and the local rate
      is quadratic.
    - Start: whichever of the uniform point (the argmin as ``tau -> inf``) and the water-filling point
      (the argmin as ``tau -> 0``, see :func:`_water_filling_start`) has the smaller ``F``.
    - A fixed :func:`gamma_po_iterations` iterations: no host synchronisation, no data-dependent
      control flow (CUDA-graph friendly), deterministic.
    """
    with torch.no_grad():
        out_dtype = r.dtype
        r = r.detach().to(torch.float64)
        n = r.shape[0]
        log_n = math.log(n)
        eps = torch.finfo(r.dtype).eps
        starts = torch.stack([torch.zeros_like(r), _water_filling_start(r, gamma_0, tau, log_n)])
        u = starts.index_select(0, torch.argmin(_gamma_po_terms(starts, r, gamma_0, tau).sum(1)).view(1))[0]
        steps = torch.pow(2.0, -torch.arange(12, dtype=r.dtype, device=r.device))
        steps = torch.cat([steps, steps.new_zeros(1)]).unsqueeze(1)  # t = 1, 1/2, ..., 2^-11, 0
        for _ in range(gamma_po_iterations(gamma_0, tau)):
            x = torch.exp(u)
            s = torch.sigmoid(gamma_0 * x - r)
            g = gamma_0 * s + tau * u
            hx = tau + gamma_0 * gamma_0 * x * s * (1 - s)  # x_i H_i
            w = x / hx  # 1 / H_i
            nu = (g * w).sum() / w.sum()
            du = (nu - g) / hx
            slope = -(w * (g - nu) ** 2).sum()  # dF/dt at t = 0
            cand = _onto_simplex(u + steps * du, log_n)
            terms = _gamma_po_terms(cand, r, gamma_0, tau)
            f = terms.sum(1)
            # rounding in F: the terms' size and the shift by log N in every u_i (sum_i tau x_i log N)
            slack = 16 * eps * (terms[-1].abs().sum() + tau * n * log_n)
            full = f[0] <= f[-1] + 1e-4 * slope + slack
            pick = torch.where(full, 0, torch.argmin(f))
            u = cand.index_select(0, pick.view(1))[0]
        return (gamma_0 * torch.exp(u)).to(out_dtype)


@register(
    "simpo_gamma_dynamic",
    section=4,
    kind="reference_free",
    reference="none",
    aliases=("gammapo",),
    paper="Robust Preference Optimization via Dynamic Target Margins (gamma-PO; Sun et al., 2025)",
    formula="ls(r_i - sg[gamma_i]), r_i the SimPO margin, gamma_i = gamma_0*N*p_i, p = argmin over the simplex of "
    "(1/N) sum_i ls(r_i - gamma_0 N p_i) + tau sum_i p_i log(N p_i)",
    inputs=(LENGTHS_PAIR,),
    defaults={"beta": 2.0, "gamma_0": 0.5, "tau": 10.0},
    ranges={"beta": POSITIVE, "gamma_0": POSITIVE, "tau": POSITIVE},
    gradcheck=False,
    notes="r_i = beta*(lp_w/|y_w| - lp_l/|y_l|). p is the exact argmin (damped Newton in float64, "
    "1 + 2*ceil(log2(1 + 4*gamma_0*(1 + gamma_0)/tau)) iterations, no host synchronisation), not the authors' "
    "20 mirror-descent steps, which stop short of it for tau < 0.5. "
    "beta, gamma_0, tau defaults from SimPO (2.0, 0.5) and the authors' configs (tau=10). "
    "N is the local (micro-)batch; the margins are not all-gathered across ranks.",
)
def simpo_gamma_dynamic(policy: Tensor, ref: None, *, beta: float, gamma_0: float, tau: float, lengths: Tensor) -> HeadResult:
    """gamma-PO on SimPO: instance-specific target margins from a KL-regularised allocation."""
    m_w, m_l = mean_scores(policy, lengths)
    r = beta * (m_w - m_l)
    gam = gamma_po_margins(r, gamma_0=gamma_0, tau=tau)
    return HeadResult(ls(r - gam), rewards=(beta * m_w, beta * m_l), metrics={"gamma/mean": gam.mean(), "gamma/max": gam.max()})
