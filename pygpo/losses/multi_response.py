"""Section 7 of LOSSES.md: losses over K >= 2 responses per prompt.

Scores are ``(B, K)``; ``u = lp - rp``. An optional ``valid`` mask ``(B, K)`` drops padded responses
(every row needs at least two valid ones, one for ``sppo_k``/``gpo``). Rewards ``(B, K)``: higher
is better; ranks ``(B, K)``: 0 is best.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._math import ls
from .constraints import POSITIVE, Interval, OneOf
from .registry import HeadResult, LossInput, LossSpec, register
from .validation import in_unit_interval, require

_BK = (("B", "K"),)
_VALID = LossInput("valid", _BK, "which responses are real (bool); default all", required=False, dtype="bool")
_REWARDS = LossInput("rewards", _BK, "reward per response (higher is better)")


def _valid(policy: Tensor, valid: Tensor | None) -> Tensor:
    return torch.ones_like(policy, dtype=torch.bool) if valid is None else valid


def _check_valid(min_count: int):
    def check(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
        v = inputs.get("valid")
        if v is not None:
            require(spec, v.sum(dim=1) >= min_count, f"every row needs at least {min_count} valid response(s)")

    return check


def _neg_fill(z: Tensor, keep: Tensor) -> Tensor:
    """Replace dropped entries by a finite value far below every kept one (exp underflows to 0)."""
    low = torch.where(keep, z, torch.full_like(z, math.inf)).min().detach() - 1000.0
    return torch.where(keep, z, low)


def _masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, x, torch.zeros_like(x)).sum(dim=1) / keep.sum(dim=1).clamp(min=1).to(x.dtype)


@register(
    "mpo",
    section=7,
    kind="multi_response",
    paper="Multi-Preference Optimization: Generalizing DPO via Set-Level Contrasts (SWEPO; Gupta et al., 2024)",
    formula="-log( sum_{Y+} w e^{s} / sum_{Y+ u Y-} w e^{s} ), s = beta*u, split at the mean reward, w = exp(alpha*|R - mean R|)",
    inputs=(_REWARDS, _VALID),
    defaults={"beta": 0.1, "alpha": 1.0},
    ranges={"beta": POSITIVE, "alpha": Interval(0.0, math.inf)},
    scores=_BK,
    notes="Y+ = responses with R strictly above the row's mean reward; a row with no such response "
    "(all rewards equal) has loss 0. Default alpha = 1 (LOSSES.md gives none).",
    extra={"check": _check_valid(2)},
)
def mpo(policy: Tensor, ref: Tensor, *, beta: float, alpha: float, rewards: Tensor, valid: Tensor | None = None) -> HeadResult:
    """SWEPO: a set-level contrast of above-mean against all responses, deviation-weighted."""
    keep = _valid(policy, valid)
    mean_r = _masked_mean(rewards, keep).unsqueeze(1)
    pos = keep & (rewards > mean_r)
    logit = beta * (policy - ref) + alpha * (rewards - mean_r).abs()
    lse_all = torch.logsumexp(_neg_fill(logit, keep), dim=1)
    lse_pos = torch.logsumexp(_neg_fill(logit, pos | ~pos.any(dim=1, keepdim=True) & keep), dim=1)
    has_pos = pos.any(dim=1)
    loss = torch.where(has_pos, lse_all - lse_pos, torch.zeros_like(lse_all))
    return HeadResult(loss)


@register(
    "exo_k",
    section=7,
    kind="multi_response",
    paper="Towards Efficient and Exact Optimization of Language Model Alignment (EXO; Ji et al., 2024), general K",
    formula="KL( softmax_k(beta*u_k) || softmax_k(R_k / beta_r) )",
    inputs=(_REWARDS, _VALID),
    defaults={"beta": 0.1, "beta_r": 1.0},
    ranges={"beta": POSITIVE, "beta_r": POSITIVE},
    scores=_BK,
    notes="Default beta_r = 1 (LOSSES.md gives none).",
    extra={"check": _check_valid(2)},
)
def exo_k(policy: Tensor, ref: Tensor, *, beta: float, beta_r: float, rewards: Tensor, valid: Tensor | None = None) -> HeadResult:
    """EXO with K responses: reverse KL from the policy's to the reward's softmax over responses."""
    keep = _valid(policy, valid)
    log_pf = torch.log_softmax(_neg_fill(beta * (policy - ref), keep), dim=1)
    log_pr = torch.log_softmax(_neg_fill(rewards / beta_r, keep), dim=1)
    terms = torch.where(keep, log_pf.exp() * (log_pf - log_pr), torch.zeros_like(log_pf))
    return HeadResult(terms.sum(dim=1))


def _rank_order(policy: Tensor, ranks: Tensor | None, rewards: Tensor | None, keep: Tensor) -> Tensor:
    """Permutation per row putting responses best-first and dropped ones last."""
    k = policy.shape[1]
    if ranks is not None:
        key = ranks.to(torch.float64)
    elif rewards is not None:
        key = -rewards.to(torch.float64)
    else:
        key = torch.arange(k, device=policy.device, dtype=torch.float64).expand_as(policy)
    key = torch.where(keep, key, torch.full_like(key, math.inf))
    return torch.sort(key, dim=1, stable=True).indices


@register(
    "plackett_luce",
    section=7,
    kind="multi_response",
    paper="Direct Preference Optimization (Rafailov et al., 2023), Plackett-Luce form",
    formula="-sum_i log( e^{beta*u_(i)} / sum_{j>=i} e^{beta*u_(j)} ) over the responses sorted by rank (K=2 gives DPO)",
    inputs=(
        LossInput("ranks", _BK, "rank per response (int, 0 = best); or give rewards; default: columns already best-first", required=False, dtype="int"),
        LossInput("rewards", _BK, "reward per response, used for the order when ranks are absent", required=False),
        _VALID,
    ),
    defaults={"beta": 0.1},
    ranges={"beta": POSITIVE},
    scores=_BK,
    extra={"check": _check_valid(2)},
)
def plackett_luce(
    policy: Tensor,
    ref: Tensor,
    *,
    beta: float,
    ranks: Tensor | None = None,
    rewards: Tensor | None = None,
    valid: Tensor | None = None,
) -> HeadResult:
    """Plackett-Luce negative log-likelihood of the ranking under rewards ``beta u``."""
    keep = _valid(policy, valid)
    order = _rank_order(policy, ranks, rewards, keep)
    z = torch.gather(beta * (policy - ref), 1, order)
    kept = torch.gather(keep, 1, order)
    z = _neg_fill(z, kept)
    tail_lse = torch.logcumsumexp(z.flip(1), dim=1).flip(1)
    terms = torch.where(kept, tail_lse - z, torch.zeros_like(z))
    return HeadResult(terms.sum(dim=1))


def _pair_mask(keep: Tensor) -> Tensor:
    k = keep.shape[1]
    off_diag = ~torch.eye(k, dtype=torch.bool, device=keep.device)
    return keep.unsqueeze(2) & keep.unsqueeze(1) & off_diag


@register(
    "tpo_tree",
    section=7,
    kind="multi_response",
    paper="TPO: Aligning Large Language Models with Multi-branch & Multi-step Preference Trees (Liao et al., 2024)",
    formula="(1/(K(K-1))) sum_{i!=j} ls((s_i - s_j)*sign(R_i - R_j)), s = step-weighted mean log-ratio",
    inputs=(
        _REWARDS,
        LossInput("lengths", _BK, "normaliser of each (step-weighted) sum: s = u / lengths; default 1", required=False),
        _VALID,
    ),
    scores=_BK,
    notes="Give step-weighted sums (the 'weighted' reducer) as scores and the weight totals as lengths. "
    "K counts valid responses; tied pairs (sign 0) contribute the constant log 2, as the formula reads.",
    extra={"check": _check_valid(2)},
)
def tpo_tree(policy: Tensor, ref: Tensor, *, rewards: Tensor, lengths: Tensor | None = None, valid: Tensor | None = None) -> HeadResult:
    """TPO (tree): all ordered pairs of branches, logistic loss on the signed margin."""
    keep = _valid(policy, valid)
    s = policy - ref
    if lengths is not None:
        s = s / lengths
    margin = (s.unsqueeze(2) - s.unsqueeze(1)) * torch.sign(rewards.unsqueeze(2) - rewards.unsqueeze(1))
    pairs = _pair_mask(keep)
    k = keep.sum(dim=1).to(policy.dtype)
    total = torch.where(pairs, ls(margin), torch.zeros_like(margin)).sum(dim=(1, 2))
    return HeadResult(total / (k * (k - 1)))


def _squares(policy: Tensor, ref: Tensor, target: Tensor, valid: Tensor | None) -> Tensor:
    keep = _valid(policy, valid)
    return _masked_mean((policy - ref - target) ** 2, keep)


@register(
    "sppo_k",
    section=7,
    kind="multi_response",
    paper="Self-Play Preference Optimization for Language Model Alignment (Wu et al., 2024), K responses",
    formula="per response (u_k - eta*(P_k - 1/2))^2 (mean over k), eta = 1/beta",
    inputs=(LossInput("win_probs", _BK, "estimated win probability P_k of each response, in [0, 1]"), _VALID),
    defaults={"beta": 0.1, "eta": None},
    ranges={"beta": POSITIVE, "eta": Interval(0.0, math.inf, lo_closed=False, allow_none=True)},
    scores=_BK,
    notes="The mean over k makes K=2 equal to sppo.",
    extra={"check": in_unit_interval("win_probs", where="valid", also=_check_valid(1))},
)
def sppo_k(policy: Tensor, ref: Tensor, *, beta: float, eta: float | None, win_probs: Tensor, valid: Tensor | None = None) -> HeadResult:
    """SPPO over K responses."""
    e = 1.0 / beta if eta is None else eta
    return HeadResult(_squares(policy, ref, e * (win_probs - 0.5), valid))


@register(
    "gpo",
    section=7,
    kind="multi_response",
    paper="Beyond Bradley-Terry Models: A General Preference Model for Language Model Alignment (GPM/GPO; Zhang et al., 2024)",
    formula="per response (u_k - eta*s_k)^2 (mean over k), eta = 1/beta",
    inputs=(LossInput("scores", _BK, "general preference score s_k of each response"), _VALID),
    defaults={"beta": 0.1, "eta": None},
    ranges={"beta": POSITIVE, "eta": Interval(0.0, math.inf, lo_closed=False, allow_none=True)},
    scores=_BK,
    extra={"check": _check_valid(1)},
)
def gpo(policy: Tensor, ref: Tensor, *, beta: float, eta: float | None, scores: Tensor, valid: Tensor | None = None) -> HeadResult:
    """General preference optimisation (SPPO with general preference scores)."""
    e = 1.0 / beta if eta is None else eta
    return HeadResult(_squares(policy, ref, e * scores, valid))


@register(
    "egpo",
    section=7,
    kind="multi_response",
    paper="Extragradient Preference Optimization (EGPO; 2025)",
    formula="((u(y) - u(y')) - (P(y>y'') - P(y'>y''))/beta)^2",
    inputs=(LossInput("win_probs", (("B", 2),), "[P(y > y''), P(y' > y'')]: win probabilities of y and y' against y'', "
                      "in [0, 1]"),),
    defaults={"beta": 0.1},
    ranges={"beta": POSITIVE},
    scores=(("B", 2),),
    extra={"check": in_unit_interval("win_probs")},
)
def egpo(policy: Tensor, ref: Tensor, *, beta: float, win_probs: Tensor) -> HeadResult:
    """EGPO: squared regression of the log-ratio gap on the win-probability gap."""
    u = policy - ref
    return HeadResult(((u[:, 0] - u[:, 1]) - (win_probs[:, 0] - win_probs[:, 1]) / beta) ** 2)


@register(
    "curriculum",
    section=7,
    kind="multi_response",
    paper="Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked Preferences (Pattnaik et al., 2024)",
    formula="all pairs (i, j) with R_i > R_j as DPO pairs ls(beta*(u_i - u_j)), optionally weighted by rank gap",
    inputs=(_REWARDS, _VALID),
    defaults={"beta": 0.1, "weighting": "none"},
    ranges={"beta": POSITIVE, "weighting": OneOf(("none", "rank_gap"))},
    scores=_BK,
    notes="Per prompt: the (weighted) mean over its pairs; rank = number of valid responses with a higher "
    "reward; rank_gap weight = rank_j - rank_i. A prompt with no strict pair has loss 0.",
    extra={"check": _check_valid(2)},
)
def curriculum(policy: Tensor, ref: Tensor, *, beta: float, weighting: str, rewards: Tensor, valid: Tensor | None = None) -> HeadResult:
    """Curry-DPO pairs: every strictly ordered pair of a prompt as a DPO pair."""
    keep = _valid(policy, valid)
    u = policy - ref
    pairs = _pair_mask(keep) & (rewards.unsqueeze(2) > rewards.unsqueeze(1))
    losses = ls(beta * (u.unsqueeze(2) - u.unsqueeze(1)))
    if weighting == "rank_gap":
        higher = keep.unsqueeze(1) & (rewards.unsqueeze(1) > rewards.unsqueeze(2))  # [b, i, j]: R_j > R_i
        rank = higher.sum(dim=2).to(policy.dtype)
        w = rank.unsqueeze(1) - rank.unsqueeze(2)  # rank_j - rank_i
    else:
        w = torch.ones_like(losses)
    w = torch.where(pairs, w, torch.zeros_like(w))
    denom = w.sum(dim=(1, 2))
    total = (w * torch.where(pairs, losses, torch.zeros_like(losses))).sum(dim=(1, 2))
    loss = torch.where(denom > 0, total / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(total))
    return HeadResult(loss, metrics={"pairs": pairs.sum().to(policy.dtype)})
