"""Section 5 of LOSSES.md: additive regularizers.

Each key returns its term per pair; combine it with a head by passing several names to
:func:`pygpo.losses.preference_loss` (``sum_k weight_k * mean_B(loss_k)``, TRL's ``loss_weights``).
Scores are ``(B, 2)`` ``[chosen, rejected]`` token sums; terms on other sequences (samples from the
reference, calibration responses, rationales, other conditionings) come in as inputs.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._math import ls
from .common_inputs import LENGTHS_PAIR, NLL_MEAN_LENGTH, SUM_LOGPS, batch_token_mean_nll, log_ratios, token_sums
from .constraints import NONNEGATIVE, POSITIVE, REAL, OneOf
from .registry import HeadResult, LossInput, register


@register(
    "sft",
    section=5,
    kind="regularizer",
    reference="none",
    paper="Iterative Reasoning Preference Optimization (Pang et al., 2024)",
    formula="alpha * NLL_mean(y_w) (token mean over the batch's chosen tokens, TRL's rpo_alpha)",
    inputs=(LENGTHS_PAIR, SUM_LOGPS, NLL_MEAN_LENGTH),
    defaults={"alpha": 1.0},
    ranges={"alpha": NONNEGATIVE},
    trl_name="sft",
)
def sft(policy: Tensor, ref: None, *, alpha: float, lengths: Tensor, sum_logps: Optional[Tensor] = None,
        nll_mean_length: Optional[Tensor] = None) -> HeadResult:
    """Chosen-response NLL (token mean over the batch, or over a step's examples with ``nll_mean_length``),
    scaled by ``alpha``; on the token sums ``sum_logps`` where given (scores from another reducer), else on
    the scores."""
    nll = batch_token_mean_nll(token_sums(policy, sum_logps)[:, 0], lengths[:, 0], nll_mean_length)
    return HeadResult(alpha * nll, metrics={"nll_loss": nll.detach().mean()})


@register(
    "rpo_sum",
    section=5,
    kind="regularizer",
    reference="none",
    paper="Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer (RPO; Liu et al., 2024)",
    formula="-eta*beta*lp(y_w) (summed)",
    inputs=(SUM_LOGPS,),
    defaults={"beta": 0.1, "eta": 1.0},
    ranges={"beta": POSITIVE, "eta": NONNEGATIVE},
    notes="LOSSES.md gives no default for eta; 1.0 is used.",
)
def rpo_sum(policy: Tensor, ref: None, *, beta: float, eta: float, sum_logps: Optional[Tensor] = None) -> HeadResult:
    """RPO's SFT term on the token-summed chosen log-prob (``sum_logps`` where given)."""
    return HeadResult(-eta * beta * token_sums(policy, sum_logps)[:, 0])


@register(
    "xpo",
    section=5,
    kind="regularizer",
    reference="none",
    paper="Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF (Xie et al., 2024)",
    formula="alpha * lp(y~), y~ sampled from the reference",
    inputs=(LossInput("sample_logps", (("B",),), "policy score lp(y~) of a response sampled from the reference", differentiable=True),),
    defaults={"alpha": 1e-5},
    ranges={"alpha": NONNEGATIVE},
    notes="Default alpha = 1e-5 (TRL's XPOConfig default); LOSSES.md gives none.",
)
def xpo(policy: Tensor, ref: None, *, alpha: float, sample_logps: Tensor) -> HeadResult:
    """XPO exploration bonus: push down the policy's log-prob of reference samples."""
    return HeadResult(alpha * sample_logps)


@register(
    "selm",
    section=5,
    kind="regularizer",
    reference="none",
    paper="Self-Exploring Language Models: Active Preference Elicitation for Online Alignment (SELM; Zhang et al., 2024)",
    formula="alpha*beta*(lp(y_r) - rp(y_r)), y_r sampled from the reference",
    inputs=(
        LossInput("sample_logps", (("B",),), "policy score lp(y_r) of a response sampled from the reference", differentiable=True),
        LossInput("sample_ref_logps", (("B",),), "reference score rp(y_r) of that response"),
    ),
    defaults={"beta": 0.1, "alpha": 1e-3},
    ranges={"beta": POSITIVE, "alpha": NONNEGATIVE},
    notes="Default alpha = 1e-3 (LOSSES.md gives none).",
)
def selm(policy: Tensor, ref: None, *, beta: float, alpha: float, sample_logps: Tensor, sample_ref_logps: Tensor) -> HeadResult:
    """SELM optimism term on a reference sample's log-ratio."""
    return HeadResult(alpha * beta * (sample_logps - sample_ref_logps))


@register(
    "vpo",
    section=5,
    kind="regularizer",
    reference="none",
    paper="Value-Incentivized Preference Optimization: A Unified Approach to Online and Offline RLHF (Cen et al., 2024)",
    formula="sign*alpha*beta*mean(lp(y) - rp(y)) over calibration responses; sign +1 online, -1 offline",
    inputs=(
        LossInput("calib_logps", (("B", "M"),), "policy scores of M calibration responses per prompt", differentiable=True),
        LossInput("calib_ref_logps", (("B", "M"),), "reference scores of the calibration responses"),
    ),
    defaults={"beta": 0.1, "alpha": 1.0, "mode": "offline"},
    ranges={"beta": POSITIVE, "alpha": NONNEGATIVE, "mode": OneOf(("online", "offline"))},
    notes="Defaults alpha=1, mode='offline' (LOSSES.md gives none); the mean is over the M responses of each prompt.",
)
def vpo(policy: Tensor, ref: None, *, beta: float, alpha: float, mode: str, calib_logps: Tensor, calib_ref_logps: Tensor) -> HeadResult:
    """VPO value regularizer: optimism (online) or pessimism (offline) on calibration log-ratios."""
    sign = 1.0 if mode == "online" else -1.0
    return HeadResult(sign * alpha * beta * (calib_logps - calib_ref_logps).mean(dim=1))


@register(
    "rationale",
    section=5,
    kind="regularizer",
    reference="none",
    paper="Data-Centric Human Preference Optimization with Rationales (Just et al., 2024)",
    formula="ls(gamma*lp(r)), r = rationale sequence conditioned on (x, y_w, y_l)",
    inputs=(LossInput("rationale_logps", (("B",),), "policy score lp(r) of the rationale", differentiable=True),),
    defaults={"gamma": 1.0},
    ranges={"gamma": POSITIVE},
    notes="Default gamma = 1 (LOSSES.md gives none).",
)
def rationale(policy: Tensor, ref: None, *, gamma: float, rationale_logps: Tensor) -> HeadResult:
    """Rationale likelihood term."""
    return HeadResult(ls(gamma * rationale_logps))


@register(
    "anchor",
    section=5,
    kind="regularizer",
    paper="mDPO: Conditional Preference Optimization for Multimodal Large Language Models (Wang et al., 2024), reward anchor",
    formula="ls(beta*u_w - delta)",
    defaults={"beta": 0.1, "delta": 0.0},
    ranges={"beta": POSITIVE, "delta": REAL},
)
def anchor(policy: Tensor, ref: Tensor, *, beta: float, delta: float) -> HeadResult:
    """Reward anchor: keep the chosen implicit reward above ``delta``."""
    u_w, _ = log_ratios(policy, ref)
    return HeadResult(ls(beta * u_w - delta))


@register(
    "conditional",
    section=5,
    kind="regularizer",
    paper="mDPO (Wang et al., 2024); PaMi-VDPO; OPA-DPO: conditional preference",
    formula="ls(beta*[(lp(y_w|c) - rp(y_w|c)) - (lp(y_w|c') - rp(y_w|c'))]), same response under two conditionings",
    inputs=(
        LossInput("cond_logps", (("B",),), "policy score lp(y_w|c') of the chosen response under the other conditioning c'", differentiable=True),
        LossInput("cond_ref_logps", (("B",),), "reference score rp(y_w|c')"),
    ),
    defaults={"beta": 0.1},
    ranges={"beta": POSITIVE},
)
def conditional(policy: Tensor, ref: Tensor, *, beta: float, cond_logps: Tensor, cond_ref_logps: Tensor) -> HeadResult:
    """Conditional preference: the chosen response is preferred under the true conditioning c."""
    u_w, _ = log_ratios(policy, ref)
    return HeadResult(ls(beta * (u_w - (cond_logps - cond_ref_logps))))

