"""Section 6 of LOSSES.md: unpaired and single-response losses.

Scores are ``(B,)``: one response per example, with a desirable/undesirable ``labels`` flag where the
loss needs one. ``u = lp - rp``. The loss is the mean over the B responses (TRL's KTO ``nanmean``).
Metrics follow TRL's KTO: ``rewards/chosen`` and ``logps/chosen`` average over the desirable
responses, ``rewards/rejected``/``logps/rejected`` over the undesirable ones (omitted when a side is
empty), ``rewards/margins`` is their difference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._math import ls
from .constraints import BOOL, NONNEGATIVE, POSITIVE, UNIT
from .errors import MissingInputError
from .registry import HeadResult, LossInput, LossSpec, register

_ONE = (("B",),)
_LABELS = LossInput("labels", _ONE, "desirable (True) / undesirable (False) per response", dtype="bool")


def _side_mean(x: Tensor, sel: Tensor) -> Tensor:
    return torch.where(sel, x, torch.zeros_like(x)).sum() / sel.sum()


def unpaired_metrics(rewards: Tensor, logps: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """TRL KTO-style metrics from per-response rewards and scores."""
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        r, lp = rewards.detach(), logps.detach()
        n_pos = int(labels.sum())
        n_neg = labels.numel() - n_pos
        if n_pos:
            out["rewards/chosen"] = _side_mean(r, labels)
            out["logps/chosen"] = _side_mean(lp, labels)
        if n_neg:
            out["rewards/rejected"] = _side_mean(r, ~labels)
            out["logps/rejected"] = _side_mean(lp, ~labels)
        if n_pos and n_neg:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_reference_point(kl_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """KTO's ``z0 = max(0, mean(lp(y') - rp(y')))`` over mismatched pairs, detached."""
    return torch.clamp((kl_logps - kl_ref_logps).detach().mean(), min=0.0)


def _check_kto(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
    if inputs.get("z0") is None and (inputs.get("kl_logps") is None or inputs.get("kl_ref_logps") is None):
        raise MissingInputError(
            "kto: missing required input 'kl_logps' and 'kl_ref_logps' (policy/reference scores of mismatched "
            "(x, y') pairs), or 'z0' (the reference point itself)"
        )


@register(
    "kto",
    section=6,
    kind="unpaired",
    paper="KTO: Model Alignment as Prospect Theoretic Optimization (Ethayarajh et al., 2024)",
    formula="desirable w_d*(1 - sigma(beta*(u - z0))), undesirable w_u*(1 - sigma(beta*(z0 - u))), "
    "z0 = max(0, mean(lp(y') - rp(y'))) over mismatched (x, y') pairs, detached",
    inputs=(
        _LABELS,
        LossInput("kl_logps", (("M",),), "policy scores lp(y') of mismatched (x, y') pairs", required=False),
        LossInput("kl_ref_logps", (("M",),), "reference scores rp(y') of the mismatched pairs", required=False),
        LossInput("z0", ((),), "the reference point z0 itself (instead of the mismatched-pair scores)", required=False),
    ),
    defaults={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    ranges={"beta": POSITIVE, "desirable_weight": NONNEGATIVE, "undesirable_weight": NONNEGATIVE},
    scores=_ONE,
    trl_name="KTOTrainer loss_type='kto'",
    notes="z0 is the local mean; under data parallelism pass z0 (e.g. all-reduced) to match TRL's gathered KL.",
    extra={"check": _check_kto},
)
def kto(
    policy: Tensor,
    ref: Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
    labels: Tensor,
    kl_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    z0: Tensor | None = None,
) -> HeadResult:
    """KTO: prospect-theoretic value of each response relative to the reference point z0."""
    z = z0.detach() if z0 is not None else kto_reference_point(kl_logps, kl_ref_logps)  # type: ignore[arg-type]
    u = policy - ref
    loss = torch.where(
        labels,
        desirable_weight * (1 - torch.sigmoid(beta * (u - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - u))),
    )
    metrics: dict[str, Any] = {"kl": z.detach().clone()}
    metrics.update(unpaired_metrics(beta * u, policy, labels))
    return HeadResult(loss, metrics=metrics)


@register(
    "apo_zero_unpaired",
    section=6,
    kind="unpaired",
    paper="Anchored Preference Optimization and Contrastive Revisions (D'Oosterlinck et al., 2024), TRL KTO apo_zero_unpaired",
    formula="desirable 1 - sigma(beta*u), undesirable sigma(beta*u)",
    inputs=(_LABELS,),
    defaults={"beta": 0.1},
    ranges={"beta": POSITIVE},
    scores=_ONE,
    trl_name="KTOTrainer loss_type='apo_zero_unpaired'",
)
def apo_zero_unpaired(policy: Tensor, ref: Tensor, *, beta: float, labels: Tensor) -> HeadResult:
    """APO-zero on unpaired data."""
    u = policy - ref
    s = torch.sigmoid(beta * u)
    return HeadResult(torch.where(labels, 1 - s, s), metrics=unpaired_metrics(beta * u, policy, labels))


@register(
    "bco",
    section=6,
    kind="unpaired",
    paper="Binary Classifier Optimization for Large Language Model Alignment (Jung et al., 2024)",
    formula="ls(beta*u - delta) desirable, ls(-(beta*u - delta)) undesirable, delta running mean",
    inputs=(_LABELS, LossInput("delta", ((),), "reward shift delta (scalar); default 0, BCOLoss keeps the running mean", required=False)),
    defaults={"beta": 0.1},
    ranges={"beta": POSITIVE},
    scores=_ONE,
    notes="Functional form: delta is an input (default 0). pygpo.losses.BCOLoss keeps the running mean as state. "
    "BCO's optional density-ratio (UDM) reweighting is not part of this entry.",
)
def bco(policy: Tensor, ref: Tensor, *, beta: float, labels: Tensor, delta: Tensor | None = None) -> HeadResult:
    """BCO: a logistic classifier on the implicit reward, shifted by delta."""
    u = policy - ref
    d = 0.0 if delta is None else delta.detach()
    z = beta * u - d
    metrics: dict[str, Any] = {"delta": torch.as_tensor(d, dtype=policy.dtype, device=policy.device)}
    metrics.update(unpaired_metrics(beta * u, policy, labels))
    return HeadResult(torch.where(labels, ls(z), ls(-z)), metrics=metrics)


@register(
    "pmpo",
    section=6,
    kind="unpaired",
    reference="none",
    paper="Preference Optimization as Probabilistic Inference (PMPO; Abdolmaleki et al., 2024)",
    formula="-alpha*mean_{+}(lp) + (1-alpha)*mean_{-}(lp) + beta*KL(pi_ref || pi_theta) "
    "(reference first; per-token full-vocabulary KL from the fused kernel, or a sampled estimate)",
    inputs=(_LABELS, LossInput("kl", _ONE, "KL(pi_ref || pi_theta) per response (token sum)", differentiable=True)),
    defaults={"alpha": 0.5, "beta": 0.5},
    ranges={"alpha": UNIT, "beta": NONNEGATIVE},
    scores=_ONE,
    notes="mean_{+}/mean_{-} are batch means over the desirable/undesirable responses (a side with no "
    "response contributes 0); per_example[i] holds i's share so that mean(per_example) is the loss.",
)
def pmpo(policy: Tensor, ref: None, *, alpha: float, beta: float, labels: Tensor, kl: Tensor) -> HeadResult:
    """PMPO: weighted likelihood on accepted, unlikelihood on rejected, KL to the reference."""
    b = policy.shape[0]
    n_pos = labels.sum().clamp(min=1).to(policy.dtype)
    n_neg = (~labels).sum().clamp(min=1).to(policy.dtype)
    share = torch.where(labels, -alpha * policy * (b / n_pos), (1 - alpha) * policy * (b / n_neg))
    metrics: dict[str, Any] = {"kl": kl.detach().mean()}
    metrics.update(unpaired_metrics(policy, policy, labels))
    return HeadResult(share + beta * kl, metrics=metrics)


@register(
    "dro",
    section=6,
    kind="unpaired",
    paper="Offline Regularised Reinforcement Learning for Large Language Models Alignment (DRO; Richemond et al., 2024)",
    formula="0.5*(R - V - tau*u)^2, V a value prediction given per example (a separate network), R normalised to mean 0 / variance 1",
    inputs=(
        LossInput("rewards", _ONE, "scalar reward R per response"),
        LossInput("values", _ONE, "value prediction V(x) per example (may carry gradients)", differentiable=True),
    ),
    defaults={"tau": 1.0, "normalize_rewards": True},
    ranges={"tau": POSITIVE, "normalize_rewards": BOOL},
    scores=_ONE,
    notes="normalize_rewards=True standardises R over the batch (population std; a constant batch is only "
    "centred); pass normalize_rewards=False with rewards already normalised over the dataset.",
)
def dro(policy: Tensor, ref: Tensor, *, tau: float, normalize_rewards: bool, rewards: Tensor, values: Tensor) -> HeadResult:
    """DRO: squared residual of the single-trajectory soft Bellman equation."""
    r = rewards
    if normalize_rewards:
        r = r - r.mean()
        std = r.pow(2).mean().sqrt()
        r = torch.where(std > 0, r / torch.where(std > 0, std, torch.ones_like(std)), r)
    u = policy - ref
    return HeadResult(0.5 * (r - values - tau * u) ** 2, metrics={"values/mean": values.detach().mean()})
