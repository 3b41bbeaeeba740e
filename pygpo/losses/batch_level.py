"""Section 8 of LOSSES.md: batch-level losses (functional forms).

Their value depends on the whole (micro-)batch. The functions here are pure: any state (beta-DPO's
moving statistics, the group weights of group-robust DPO) comes in as an input. The classes in
:mod:`pygpo.losses.stateful` keep that state across steps, update it, and all-reduce it across
data-parallel ranks.

Gradient accumulation: every call is one batch, so accumulation micro-batches are separate batches
(LOSSES.md's default). Data parallelism: these functions use the local batch only.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ._math import ls
from .common_inputs import log_ratios
from .constraints import POSITIVE, Interval
from .errors import InputShapeError
from .registry import HeadResult, LossInput, LossSpec, register
from .validation import require


@register(
    "dr_dpo",
    section=8,
    kind="batch",
    paper="Towards Robust Alignment of Language Models: Distributionally Robustifying Direct Preference Optimization (Dr. DPO; Wu et al., 2024)",
    formula="-beta' * log(mean_i exp(-l_i/beta')), l_i the DPO loss",
    defaults={"beta": 0.1, "beta_prime": 1.0},
    ranges={"beta": POSITIVE, "beta_prime": POSITIVE},
    notes="per_example holds the DPO losses l_i; the loss is their soft-min aggregate over the local batch.",
)
def dr_dpo(policy: Tensor, ref: Tensor, *, beta: float, beta_prime: float) -> HeadResult:
    """Dr. DPO: a log-mean-exp (soft-min) of the per-pair DPO losses, computed stably."""
    u_w, u_l = log_ratios(policy, ref)
    l = ls(beta * (u_w - u_l))
    n = l.shape[0]
    loss = -beta_prime * (torch.logsumexp(-l / beta_prime, dim=0) - math.log(n))
    return HeadResult(l, loss=loss)


def beta_dpo_select(
    m: Tensor,
    *,
    m0: Tensor,
    sm: Tensor,
    rho: float,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """beta-DPO's data filter: a boolean mask of ``floor((1-rho) B)`` (at least 1) examples drawn
    without replacement with probability proportional to ``w_i = exp(-(M_i - M0)^2 / (2 sM^2))``.

    The draw works on ``log w`` (Gumbel-top-k: the ``n`` largest ``log w_i + G_i``, ``G_i`` standard
    Gumbel, are a draw without replacement proportional to ``w``; Vieira 2014, Kool et al. 2019), so
    weights that underflow to 0 in any precision still rank by their logarithms instead of failing
    or turning uniform. Uniform when ``sM <= 0``; every example when all are kept.
    """
    b = m.shape[0]
    n_keep = max(int(b * (1 - rho)), 1)
    sel = torch.zeros(b, dtype=torch.bool, device=m.device)
    if n_keep >= b:
        return sel.fill_(True)
    with torch.no_grad():
        m64 = m.detach().double()
        log_w = -((m64 - m0) ** 2) / (2 * sm**2) if float(sm) > 0 else torch.zeros_like(m64)
        if not bool(torch.isfinite(log_w).all()):
            log_w = torch.zeros_like(m64)
        u = torch.rand(b, generator=generator, dtype=torch.float64, device=generator.device if generator else m.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)).to(m.device))
        sel[torch.topk(log_w + gumbel, n_keep).indices] = True
    return sel


@register(
    "beta_dpo",
    section=8,
    kind="batch",
    paper="beta-DPO: Direct Preference Optimization with Dynamic beta (Wu et al., 2024)",
    formula="M_i = sg[h_i]; EMA mean M0, std sM (decay 0.9); keep (1-rho)B samples drawn with p ~ exp(-(M_i-M0)^2/(2 sM^2)); "
    "beta_b = max(beta_0*(1 + a*(mean_sel M - M0)), 1e-3); loss mean_sel ls(beta_b*h)",
    inputs=(
        LossInput("m0", ((),), "EMA mean M0 of the margins (default: this batch's mean)", required=False),
        LossInput("sm", ((),), "EMA std sM of the margins (default: this batch's std)", required=False),
        LossInput("generator", (), "torch.Generator for the draw", required=False, dtype="object"),
    ),
    defaults={"beta": 0.1, "rho": 0.2, "a": 0.6},
    ranges={"beta": POSITIVE, "rho": Interval(0.0, 1.0, hi_closed=False), "a": Interval(0.0, math.inf)},
    gradcheck=False,
    notes="beta is beta_0. Defaults rho=0.2, a=0.6 from the authors' README. The functional form uses the given "
    "(or this batch's) statistics; pygpo.losses.BetaDPOLoss keeps the EMA (updated with the batch before use, "
    "as the authors' code). per_example holds ls(beta_b*h) for every pair; metrics['selected'] marks the kept ones. "
    "A generator must live on the scores' device.",
)
def beta_dpo(
    policy: Tensor,
    ref: Tensor,
    *,
    beta: float,
    rho: float,
    a: float,
    m0: Tensor | None = None,
    sm: Tensor | None = None,
    generator: Optional[torch.Generator] = None,
) -> HeadResult:
    """beta-DPO: batch-level dynamic beta with margin-guided data filtering."""
    u_w, u_l = log_ratios(policy, ref)
    h = u_w - u_l
    m = h.detach()
    mean0 = m.mean() if m0 is None else m0.detach()
    std0 = (m.std() if m.numel() > 1 else torch.zeros_like(mean0)) if sm is None else sm.detach()
    std0 = torch.nan_to_num(std0, nan=0.0)
    sel = beta_dpo_select(m, m0=mean0, sm=std0, rho=rho, generator=generator)
    sel_f = sel.to(h.dtype)
    mean_sel = (m * sel_f).sum() / sel_f.sum()
    beta_b = torch.clamp(beta * (1 + a * (mean_sel - mean0)), min=1e-3).detach()
    per = ls(beta_b * h)
    loss = (per * sel_f).sum() / sel_f.sum()
    return HeadResult(per, loss=loss, metrics={"beta_batch": beta_b, "selected": sel, "selected_fraction": sel_f.mean()})


def _check_groups(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
    g = inputs["groups"]
    w = inputs.get("group_weights")
    n = hp["num_groups"] if hp["num_groups"] is not None else (w.shape[0] if w is not None else None)
    require(spec, g >= 0, "groups must be >= 0")
    if n is not None:
        require(spec, g < n, f"groups must be < num_groups={n}")
    if w is not None:
        require(spec, (w >= 0).all(), "group_weights must be >= 0")
        if hp["num_groups"] is not None and w.shape[0] != hp["num_groups"]:
            raise InputShapeError(f"{spec.key}: group_weights has {w.shape[0]} entries, num_groups={hp['num_groups']}")


@register(
    "group_robust",
    section=8,
    kind="batch",
    paper="Group Robust Preference Optimization in Reward-free RLHF (Ramesh et al., 2024)",
    formula="sum_i a_{g(i)} l_i, a_g <- normalize(a_g * exp(eta_a*(L_g + C_g/sqrt(N_g)))) after each step",
    inputs=(
        LossInput("groups", (("B",),), "group index g(i) per pair (int)", dtype="int"),
        LossInput("group_weights", (("G",),), "group weights a_g (default uniform)", required=False),
    ),
    defaults={"beta": 0.1, "num_groups": None},
    ranges={"beta": POSITIVE, "num_groups": Interval(1, math.inf, integral=True, allow_none=True)},
    notes="l_i is the DPO loss. Read as the paper's objective sum_g a_g L_g with L_g the mean loss of group g "
    "in the batch (i.e. sum_i a_g(i) l_i / n_g(i)); the literal sum over i would scale with the batch size. "
    "The weight update lives in pygpo.losses.GroupRobustLoss.",
    extra={"check": _check_groups},
)
def group_robust(
    policy: Tensor, ref: Tensor, *, beta: float, num_groups: int | None, groups: Tensor, group_weights: Tensor | None = None
) -> HeadResult:
    """Group-robust DPO with given group weights."""
    u_w, u_l = log_ratios(policy, ref)
    l = ls(beta * (u_w - u_l))
    n_groups = num_groups or (group_weights.shape[0] if group_weights is not None else int(groups.max()) + 1)
    a = torch.full((n_groups,), 1.0 / n_groups, dtype=l.dtype, device=l.device) if group_weights is None else group_weights.detach()
    counts = torch.zeros(n_groups, dtype=l.dtype, device=l.device).index_add_(0, groups, torch.ones_like(l))
    sums = torch.zeros(n_groups, dtype=l.dtype, device=l.device).index_add_(0, groups, l.detach())
    b = l.shape[0]
    per = b * a[groups] * l / counts[groups]
    group_loss = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    return HeadResult(per, metrics={"group_losses": group_loss, "group_counts": counts, "group_weights": a.clone()})


@register(
    "relative",
    section=8,
    kind="batch",
    paper="Relative Preference Optimization: Enhancing LLM Alignment through Contrasting Responses across Identical and Diverse Prompts (Yin et al., 2024)",
    formula="(1/B) sum_j ls(beta*omega_ij*(u_w^i - u_l^j)), omega_ij = softmax_j(-(1 - cos(e_i, e_j))/tau)",
    inputs=(LossInput("embeddings", (("B", "D"),), "prompt embeddings e_i", differentiable=True),),
    defaults={"beta": 0.1, "tau": 0.5},
    ranges={"beta": POSITIVE, "tau": POSITIVE},
    notes="per_example[i] = (1/B) sum_j ls(...); the loss is its batch mean. Default tau = 0.5 (LOSSES.md gives none).",
)
def relative(policy: Tensor, ref: Tensor, *, beta: float, tau: float, embeddings: Tensor) -> HeadResult:
    """RPO (relative): every chosen response contrasted with every rejected one, weighted by prompt similarity."""
    u_w, u_l = log_ratios(policy, ref)
    e = embeddings / embeddings.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = e @ e.T
    omega = torch.softmax(-(1 - cos) / tau, dim=1)
    b = u_w.shape[0]
    per = ls(beta * omega * (u_w.unsqueeze(1) - u_l.unsqueeze(0))).sum(dim=1) / b
    return HeadResult(per)

