"""Section 3 of LOSSES.md: token-level KL heads.

``D(y) = sum_t KL(pi_ref(.|x,y_<t) || pi_theta(.|x,y_<t))`` over completion tokens. These heads take
the per-token KL values as an input (the fused kernel produces them, with gradient ``p_theta - p_ref``
per token); ``kl`` may carry gradients.

Scores: ``tdpo1``/``tdpo2`` accept sequence scores ``(B, 2)`` with ``kl`` ``(B, 2)`` (sums), or
per-token values ``(B, 2, T)`` with ``kl`` ``(B, 2, T)`` and ``mask``. ``sparsepo`` and ``rrpo`` need
per-token values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._math import ls
from .constraints import NONNEGATIVE, POSITIVE
from .errors import InputShapeError, MissingInputError
from .reducers import reduce_segments
from .registry import HeadResult, LossInput, LossSpec, register
from .validation import in_unit_interval

_TOKENS = ("B", 2, "T")
_MASK = LossInput("mask", (_TOKENS,), "completion-token mask (bool) for per-token inputs", required=False, dtype="bool")


def _sum(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=-1)


def _check_tdpo(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
    kl = inputs["kl"]
    if kl.dim() != policy.dim():
        raise InputShapeError(f"{spec.key}: kl must have the shape of the scores ({tuple(policy.shape)}), got {tuple(kl.shape)}")
    if policy.dim() == 3 and inputs.get("mask") is None:
        raise MissingInputError(f"{spec.key}: missing required input 'mask' (needed with per-token scores)")


def _sequence(policy: Tensor, ref: Tensor, kl: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    if policy.dim() == 3:
        assert mask is not None
        return _sum(policy, mask), _sum(ref, mask), _sum(kl, mask)
    return policy, ref, kl


_KL = LossInput("kl", (("B", 2), _TOKENS), "per-token KL(pi_ref || pi_theta) (B, 2, T), or its sums D(y) (B, 2)", differentiable=True)


@register(
    "tdpo1",
    section=3,
    kind="token_kl",
    paper="Token-level Direct Preference Optimization (Zeng et al., 2024), TDPO1",
    formula="ls(beta*(h - (D(y_l) - D(y_w))))",
    inputs=(_KL, _MASK),
    defaults={"beta": 0.1},
    ranges={"beta": POSITIVE},
    scores=(("B", 2), _TOKENS),
    extra={"check": _check_tdpo},
)
def tdpo1(policy: Tensor, ref: Tensor, *, beta: float, kl: Tensor, mask: Tensor | None = None) -> HeadResult:
    """TDPO1: DPO with the sequential-KL gap subtracted from the margin."""
    lp, rp, d = _sequence(policy, ref, kl, mask)
    u = lp - rp
    z = beta * ((u[:, 0] - u[:, 1]) - (d[:, 1] - d[:, 0]))
    return HeadResult(ls(z), rewards=(beta * u[:, 0], beta * u[:, 1]), logps=(lp[:, 0], lp[:, 1]),
                      metrics={"kl/chosen": d[:, 0].detach().mean(), "kl/rejected": d[:, 1].detach().mean()})


@register(
    "tdpo2",
    section=3,
    kind="token_kl",
    paper="Token-level Direct Preference Optimization (Zeng et al., 2024), TDPO2",
    formula="ls(beta*(h - a*(D(y_l) - sg[D(y_w)])))",
    inputs=(_KL, _MASK),
    defaults={"beta": 0.1, "a": 0.5},
    ranges={"beta": POSITIVE, "a": NONNEGATIVE},
    scores=(("B", 2), _TOKENS),
    extra={"check": _check_tdpo, "no_gradcheck_inputs": ("kl",)},
)
def tdpo2(policy: Tensor, ref: Tensor, *, beta: float, a: float, kl: Tensor, mask: Tensor | None = None) -> HeadResult:
    """TDPO2: the chosen KL is detached and the gap scaled by ``a``."""
    lp, rp, d = _sequence(policy, ref, kl, mask)
    u = lp - rp
    z = beta * ((u[:, 0] - u[:, 1]) - a * (d[:, 1] - d[:, 0].detach()))
    return HeadResult(ls(z), rewards=(beta * u[:, 0], beta * u[:, 1]), logps=(lp[:, 0], lp[:, 1]),
                      metrics={"kl/chosen": d[:, 0].detach().mean(), "kl/rejected": d[:, 1].detach().mean()})


@register(
    "sparsepo",
    section=3,
    kind="token_kl",
    paper="SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks (Christopoulou et al., 2024)",
    formula="ls(beta*(U - Dm)) + lam_u*L1(mu) + lam_d*L1(md); U = sum_t mu_w,t u_w,t - sum_t mu_l,t u_l,t, "
    "Dm = sum_t md_w,t K_w,t - sum_t md_l,t K_l,t, K_t = -KL_t; masks in [0,1] per token (all ones = tdpo1)",
    inputs=(
        LossInput("kl", (_TOKENS,), "per-token KL(pi_ref || pi_theta)", differentiable=True),
        LossInput("mask", (_TOKENS,), "completion-token mask (bool)", dtype="bool"),
        LossInput("mu", (_TOKENS,), "reward mask mu_t in [0, 1] (default all ones)", required=False, differentiable=True),
        LossInput("md", (_TOKENS,), "KL mask md_t in [0, 1] (default all ones)", required=False, differentiable=True),
    ),
    defaults={"beta": 0.1, "lam_u": 0.0, "lam_d": 0.0},
    ranges={"beta": POSITIVE, "lam_u": NONNEGATIVE, "lam_d": NONNEGATIVE},
    scores=(_TOKENS,),
    extra={"check": in_unit_interval("mu", "md", where="mask")},
    notes="L1(mask) = sum of |mask| over the completion tokens of both responses. LOSSES.md gives no "
    "defaults for lam_u/lam_d; 0 is used (the penalty matters only for learned masks).",
)
def sparsepo(
    policy: Tensor,
    ref: Tensor,
    *,
    beta: float,
    lam_u: float,
    lam_d: float,
    kl: Tensor,
    mask: Tensor,
    mu: Tensor | None = None,
    md: Tensor | None = None,
) -> HeadResult:
    """SparsePO: token-masked log-ratios and token-masked KL, with L1 sparsity on the masks."""
    ones = torch.ones_like(policy)
    mu = ones if mu is None else mu
    md = ones if md is None else md
    u_tok = policy - ref
    ru = _sum(mu * u_tok, mask)  # (B, 2)
    dk = _sum(md * (-kl), mask)
    z = beta * ((ru[:, 0] - ru[:, 1]) - (dk[:, 0] - dk[:, 1]))
    l1 = lam_u * _sum(mu.abs(), mask).sum(dim=1) + lam_d * _sum(md.abs(), mask).sum(dim=1)
    lp = _sum(policy, mask)
    return HeadResult(ls(z) + l1, rewards=(beta * ru[:, 0], beta * ru[:, 1]), logps=(lp[:, 0], lp[:, 1]))


@register(
    "rrpo",
    section=3,
    kind="token_kl",
    paper="Refined Regularized Preference Optimization (RRPO) for self-alignment of video LLMs (2025)",
    formula="ls(beta*sum_i [seg_i(u_w) - seg_i(u_l)]) + alpha*sum_{t in y_w} KL_t over aligned sub-sequences i",
    inputs=(
        LossInput("kl", (_TOKENS,), "per-token KL(pi_ref || pi_theta) (the chosen row is used)", differentiable=True),
        LossInput("mask", (_TOKENS,), "completion-token mask (bool)", dtype="bool"),
        LossInput("segment_ids", (_TOKENS,), "aligned sub-sequence index per token (int, -1 = none); segment i of y_w pairs with segment i of y_l", dtype="int"),
    ),
    defaults={"beta": 0.1, "alpha": 0.01},
    ranges={"beta": POSITIVE, "alpha": NONNEGATIVE},
    scores=(_TOKENS,),
)
def rrpo(policy: Tensor, ref: Tensor, *, beta: float, alpha: float, kl: Tensor, mask: Tensor, segment_ids: Tensor) -> HeadResult:
    """RRPO: DPO over aligned sub-sequence log-ratios plus a token-wise KL on the chosen response."""
    ids = torch.where(mask, segment_ids, torch.full_like(segment_ids, -1))
    n = int(ids.max().item()) + 1 if bool((ids >= 0).any()) else 1
    seg = reduce_segments(policy - ref, ids, num_segments=n)  # (B, 2, n)
    margin = (seg[:, 0] - seg[:, 1]).sum(dim=-1)
    kl_w = _sum(kl[:, 0], mask[:, 0])
    seg_u = seg.sum(dim=-1)
    lp = _sum(policy, mask)
    return HeadResult(ls(beta * margin) + alpha * kl_w, rewards=(beta * seg_u[:, 0], beta * seg_u[:, 1]),
                      logps=(lp[:, 0], lp[:, 1]), metrics={"kl/chosen": kl_w.detach().mean()})

