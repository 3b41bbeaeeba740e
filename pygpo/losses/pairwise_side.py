"""Section 2 of LOSSES.md, second part: pairwise heads that need side information.

Rewards, scores, tie flags, lengths, per-token statistics or extra reference streams, each given per
pair. Notation as in :mod:`pygpo.losses.pairwise`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from ._math import ls, logsig
from .common_inputs import LENGTHS_PAIR, SUM_LOGPS, log_ratios, mean_scores, token_sums
from .constraints import BOOL, NONNEGATIVE, POSITIVE, REAL, FloatSequence, Interval, OneOf
from .errors import HyperParameterError
from .registry import HeadResult, LossInput, LossSpec, register
from .validation import in_unit_interval, require

# --------------------------------------------------------------------------- mappo


@register(
    "mappo",
    section=2,
    kind="pairwise",
    paper="MaPPO: Maximum a Posteriori Preference Optimization with Prior Knowledge (2025)",
    formula="ls(beta*u_w - dr*beta*u_l), dr = r_w - r_l with rewards normalised to [0,1] (dr clipped to [0,1]: this spec's safeguard, not the paper's)",
    inputs=(LossInput("rewards", (("B", 2),), "prior rewards [r_w, r_l], normalised to [0, 1]"),),
    defaults={"beta": 0.1},
    ranges={"beta": POSITIVE},
    extra={"check": in_unit_interval("rewards")},
)
def mappo(policy: Tensor, ref: Tensor, *, beta: float, rewards: Tensor) -> HeadResult:
    """MaPPO: the rejected log-ratio scaled by the prior reward gap ``dr`` (clipped to [0, 1])."""
    u_w, u_l = log_ratios(policy, ref)
    dr = torch.clamp(rewards[:, 0] - rewards[:, 1], 0.0, 1.0)
    return HeadResult(ls(beta * u_w - dr * beta * u_l), metrics={"reward_gap": dr.mean()})


# --------------------------------------------------------------------------- odpo


def _check_odpo(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
    s = inputs["scores"]
    require(spec, s[:, 0] > s[:, 1], "ODPO needs scores s_w > s_l")
    if hp["offset"] == "ratio":
        require(spec, s[:, 1] > 0, "ODPO offset='ratio' needs scores s_w > s_l > 0")


@register(
    "odpo",
    section=2,
    kind="pairwise",
    paper="Direct Preference Optimization with an Offset (Amini et al., 2024)",
    formula="ls(beta*h - alpha*log(s_w - s_l)) (offset='diff'), or alpha*log(s_w/s_l) (offset='ratio')",
    inputs=(LossInput("scores", (("B", 2),), "response scores [s_w, s_l] with s_w > s_l (> 0 for offset='ratio')"),),
    defaults={"beta": 0.1, "alpha": 1.0, "offset": "diff"},
    ranges={"beta": POSITIVE, "alpha": NONNEGATIVE, "offset": OneOf(("diff", "ratio"))},
    extra={"check": _check_odpo},
)
def odpo(policy: Tensor, ref: Tensor, *, beta: float, alpha: float, offset: str, scores: Tensor) -> HeadResult:
    """ODPO: the margin must exceed an offset that grows with the score gap."""
    u_w, u_l = log_ratios(policy, ref)
    if offset == "diff":
        off = alpha * torch.log(scores[:, 0] - scores[:, 1])
    else:
        off = alpha * (torch.log(scores[:, 0]) - torch.log(scores[:, 1]))
    return HeadResult(ls(beta * (u_w - u_l) - off), metrics={"offset": off.mean()})


# --------------------------------------------------------------------------- rdpo_length


@register(
    "rdpo_length",
    section=2,
    kind="pairwise",
    paper="Disentangling Length from Quality in Direct Preference Optimization (R-DPO; Park et al., 2024) / "
    "Iterative Length-Regularized DPO (Liu et al., 2024)",
    formula="ls(beta*h + alpha*(|y_w| - |y_l|))",
    inputs=(LENGTHS_PAIR,),
    defaults={"beta": 0.1, "alpha": 0.01},
    ranges={"beta": POSITIVE, "alpha": NONNEGATIVE},
)
def rdpo_length(policy: Tensor, ref: Tensor, *, beta: float, alpha: float, lengths: Tensor) -> HeadResult:
    """R-DPO: a length term inside the sigmoid (longer chosen responses lower the push)."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(ls(beta * (u_w - u_l) + alpha * (lengths[:, 0] - lengths[:, 1])))


# --------------------------------------------------------------------------- dpop


@register(
    "dpop",
    section=2,
    kind="pairwise",
    paper="Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive (Pal et al., 2024)",
    formula="ls(beta*(h - lam*relu(rp_w - lp_w))), penalty inside the sigmoid scaled by beta (paper Eq. 3; lam_code = beta*lam)",
    defaults={"beta": 0.3, "lam": 50.0},
    ranges={"beta": POSITIVE, "lam": NONNEGATIVE},
)
def dpop(policy: Tensor, ref: Tensor, *, beta: float, lam: float) -> HeadResult:
    """DPO-Positive: penalise the chosen log-prob falling below the reference's."""
    u_w, u_l = log_ratios(policy, ref)
    penalty = torch.relu(ref[:, 0] - policy[:, 0])
    return HeadResult(ls(beta * (u_w - u_l - lam * penalty)), metrics={"dpop_penalty": penalty.mean()})


# --------------------------------------------------------------------------- modpo


def _modpo_w_rest(hp: dict[str, Any], n_obj: int) -> list[float]:
    if hp["w_rest"] is None:
        return [(1.0 - hp["w0"]) / n_obj] * n_obj
    return [float(w) for w in hp["w_rest"]]


def _check_modpo(spec: LossSpec, inputs: dict[str, Any], hp: dict[str, Any], policy: Tensor) -> None:
    m = inputs["margin_rewards"]
    n_obj = 1 if m.dim() == 2 else m.shape[2]
    if hp["w_rest"] is not None and len(hp["w_rest"]) != n_obj:
        raise HyperParameterError(
            f"modpo: hyper-parameter w_rest has {len(hp['w_rest'])} entries but margin_rewards has "
            f"{n_obj} objective(s); valid range: a sequence of {n_obj} floats or None"
        )


@register(
    "modpo",
    section=2,
    kind="pairwise",
    paper="Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference Optimization (Zhou et al., 2023)",
    formula="ls((beta*h - w_rest . (m(y_w) - m(y_l))) / w_0)",
    inputs=(LossInput("margin_rewards", (("B", 2), ("B", 2, "M")), "margin rewards m(y) of the other objectives, [w, l] (x M objectives)"),),
    defaults={"beta": 0.1, "w0": 0.5, "w_rest": None},
    ranges={"beta": POSITIVE, "w0": POSITIVE, "w_rest": FloatSequence()},
    notes="w_rest=None splits 1 - w0 evenly over the M objectives (weights summing to 1, as the paper's).",
    extra={"check": _check_modpo},
)
def modpo(
    policy: Tensor, ref: Tensor, *, beta: float, w0: float, w_rest: Any, margin_rewards: Tensor
) -> HeadResult:
    """MODPO: DPO for objective 0 with the other objectives' reward margins folded in."""
    m = margin_rewards if margin_rewards.dim() == 3 else margin_rewards.unsqueeze(-1)
    w = torch.tensor(_modpo_w_rest({"w0": w0, "w_rest": w_rest}, m.shape[2]), dtype=policy.dtype, device=policy.device)
    margin = ((m[:, 0] - m[:, 1]) * w).sum(dim=-1)
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(ls((beta * (u_w - u_l) - margin) / w0))


# --------------------------------------------------------------------------- todo


@register(
    "todo",
    section=2,
    kind="pairwise",
    paper="TODO: Enhancing LLM Alignment with Ternary Preferences (Guo et al., 2024)",
    formula="non-tie: ls(beta*h + theta); tie: -log(exp(-2theta) - 1) + ls(beta*h + theta) + ls(-beta*h + theta)",
    inputs=(LossInput("ties", (("B",),), "tie flag per pair (bool)", dtype="bool"),),
    defaults={"beta": 0.01, "theta": -0.5},
    ranges={"beta": POSITIVE, "theta": Interval(-math.inf, 0.0, hi_closed=False)},
)
def todo(policy: Tensor, ref: Tensor, *, beta: float, theta: float, ties: Tensor) -> HeadResult:
    """TODO (Rao-Kupper ties): the pair loss, or the tie likelihood for tied pairs."""
    u_w, u_l = log_ratios(policy, ref)
    z = beta * (u_w - u_l)
    pref = ls(z + theta)
    tie = -math.log(math.expm1(-2.0 * theta)) + ls(z + theta) + ls(-z + theta)
    return HeadResult(torch.where(ties, tie, pref), metrics={"tie_fraction": ties.to(policy.dtype).mean()})


# --------------------------------------------------------------------------- wpo


@register(
    "wpo",
    section=2,
    kind="pairwise",
    paper="WPO: Enhancing RLHF with Weighted Preference Optimization (Zhou et al., 2024)",
    formula="-min(1, w_w*w_l) * logsig(beta*h) (clamp=True, as the paper's code; clamp=False as TRL), "
    "w(y) = exp(mean_t[lp_t - log sum_v p_theta(v)^2]), detached",
    inputs=(
        LENGTHS_PAIR,
        LossInput("log_sum_p2", (("B", 2),), "sum over completion tokens of log sum_v p_theta(v)^2 (fused-kernel output), [w, l]"),
        SUM_LOGPS,
    ),
    defaults={"beta": 0.1, "clamp": True},
    ranges={"beta": POSITIVE, "clamp": BOOL},
    gradcheck=False,
    trl_name="sigmoid with use_weighting=True (clamp=False)",
    notes="mean_t[lp_t - log sum p^2] = (lp(y) - log_sum_p2(y)) / |y| with token-summed inputs.",
)
def wpo(policy: Tensor, ref: Tensor, *, beta: float, clamp: bool, lengths: Tensor, log_sum_p2: Tensor,
        sum_logps: Optional[Tensor] = None) -> HeadResult:
    """WPO: DPO weighted by the (detached) on-policy probability of both responses; the weight reads the
    token sums ``sum_logps`` where given (scores from another reducer), else the scores."""
    with torch.no_grad():
        w = torch.exp((token_sums(policy, sum_logps) - log_sum_p2) / lengths)
        weight = w[:, 0] * w[:, 1]
        if clamp:
            weight = torch.clamp(weight, max=1.0)
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(-weight * logsig(beta * (u_w - u_l)), metrics={"wpo/weight": weight.mean()})


# --------------------------------------------------------------------------- omni_dpo


@register(
    "omni_dpo",
    section=2,
    kind="pairwise",
    paper="Omni-DPO: A Dual-Perspective Paradigm for Dynamic Preference Learning of LLMs (2025)",
    formula="-w_q*w_p*logsig(beta*h_bar) - lam*1[rp_w > lp_w]*1[s_w >= tau_good]*lp_w/|y_w|, h_bar = u_w/|y_w| - u_l/|y_l|, "
    "w_q = sigma(eta*(s_w - s_l)), w_p = (1 - sigma(beta*(lp_w/|y_w| - lp_l/|y_l|) - tau_ref))^gamma (not detached)",
    inputs=(LENGTHS_PAIR, LossInput("quality", (("B", 2),), "quality scores [s_w, s_l]")),
    defaults={"beta": 2.0, "eta": 0.7, "gamma": 3.0, "tau_ref": 0.8, "lam": 0.001, "tau_good": 3.2},
    ranges={
        "beta": POSITIVE,
        "eta": NONNEGATIVE,
        "gamma": NONNEGATIVE,
        "tau_ref": REAL,
        "lam": NONNEGATIVE,
        "tau_good": REAL,
    },
)
def omni_dpo(
    policy: Tensor,
    ref: Tensor,
    *,
    beta: float,
    eta: float,
    gamma: float,
    tau_ref: float,
    lam: float,
    tau_good: float,
    lengths: Tensor,
    quality: Tensor,
) -> HeadResult:
    """Omni-DPO: quality weight x performance (focal) weight on length-normalised DPO, plus a calibrated NLL."""
    hu_w, hu_l = mean_scores(policy - ref, lengths)
    m_w, m_l = mean_scores(policy, lengths)
    w_q = torch.sigmoid(eta * (quality[:, 0] - quality[:, 1]))
    w_p = (1 - torch.sigmoid(beta * (m_w - m_l) - tau_ref)) ** gamma
    gate = ((ref[:, 0] > policy[:, 0]) & (quality[:, 0] >= tau_good)).to(policy.dtype)
    loss = -w_q * w_p * logsig(beta * (hu_w - hu_l)) - lam * gate * m_w
    return HeadResult(loss, metrics={"omni/w_q": w_q.mean(), "omni/w_p": w_p.detach().mean()})


# --------------------------------------------------------------------------- reward_aware


@register(
    "reward_aware",
    section=2,
    kind="pairwise",
    paper="Reward-aware Preference Optimization: A Unified Mathematical Framework for Model Alignment (Sun et al., 2025)",
    formula="a = beta*h, b = eta*(R_w - R_l); sq: (a - b)^2; bwd_kl: sigma(b)(logsig(b) - logsig(a)) + sigma(-b)(logsig(-b) - logsig(-a)); "
    "fwd_kl: sigma(a)(logsig(a) - logsig(b)) + sigma(-a)(logsig(-a) - logsig(-b)); scale: |R_w - R_l| * ls(a)",
    inputs=(LossInput("rewards", (("B", 2),), "rewards [R_w, R_l]"),),
    defaults={"beta": 0.1, "eta": 1.0, "mode": "bwd_kl"},
    ranges={"beta": POSITIVE, "eta": NONNEGATIVE, "mode": OneOf(("sq", "bwd_kl", "fwd_kl", "scale"))},
    notes="Default mode bwd_kl: the Bernoulli KL of the Nemotron-4 RPO objective.",
)
def reward_aware(policy: Tensor, ref: Tensor, *, beta: float, eta: float, mode: str, rewards: Tensor) -> HeadResult:
    """RPO (reward-aware): a distance between the implicit margin and the reward margin."""
    u_w, u_l = log_ratios(policy, ref)
    a = beta * (u_w - u_l)
    gap = rewards[:, 0] - rewards[:, 1]
    b = eta * gap
    if mode == "sq":
        loss = (a - b) ** 2
    elif mode == "bwd_kl":
        loss = torch.sigmoid(b) * (logsig(b) - logsig(a)) + torch.sigmoid(-b) * (logsig(-b) - logsig(-a))
    elif mode == "fwd_kl":
        loss = torch.sigmoid(a) * (logsig(a) - logsig(b)) + torch.sigmoid(-a) * (logsig(-a) - logsig(-b))
    else:
        loss = gap.abs() * ls(a)
    return HeadResult(loss)


# --------------------------------------------------------------------------- inpo


@register(
    "inpo",
    section=2,
    kind="pairwise",
    paper="Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning (Zhang et al., 2024)",
    formula="(h' - 1/(2*eta))^2, h' = (lp_w - lp_l) - (tau/eta)*(r0_w - r0_l) - (1 - tau/eta)*(rt_w - rt_l)",
    inputs=(LossInput("prev_ref_logps", (("B", 2),), "scores rt of the previous iterate (ref_logps holds the initial reference r0)"),),
    defaults={"eta": 0.0075, "tau": None},
    ranges={"eta": POSITIVE, "tau": Interval(0.0, math.inf, allow_none=True)},
    notes="ref_logps is the initial reference r0; tau=None means eta/3.",
)
def inpo(policy: Tensor, ref: Tensor, *, eta: float, tau: float | None, prev_ref_logps: Tensor) -> HeadResult:
    """INPO: an IPO-style square loss against a geometric mix of the initial and previous references."""
    t = eta / 3.0 if tau is None else tau
    c = t / eta
    h = (policy[:, 0] - policy[:, 1]) - c * (ref[:, 0] - ref[:, 1]) - (1 - c) * (prev_ref_logps[:, 0] - prev_ref_logps[:, 1])
    return HeadResult((h - 1.0 / (2.0 * eta)) ** 2)


# --------------------------------------------------------------------------- mrpo


def mrpo_combined_reference(rp: Tensor, rs: Tensor, *, eps: float, a: float | None) -> Tensor:
    """MRPO's combined reference ``r~`` for ``(B, 2)`` primary ``rp`` and second ``rs`` scores.

    ``b_y = (rp + rs)/2``; ``eps_y = eps |b_y| / (|b_w| + |b_l|)``; ``rs^ = clamp(rs, (1+eps_y) rp,
    (1-eps_y) rp)`` (the two bounds sorted, so a positive ``rp`` also works); ``a`` adaptive
    ``|m_s| / (|m_s| + |m_p| + 1e-6)`` from the unclipped margins; ``r~ = rs^ + rp - log(a e^{rs^} +
    (1-a) e^{rp})`` computed as a log-sum-exp (max shift).
    """
    b = 0.5 * (rp + rs)
    denom = b.abs().sum(dim=1, keepdim=True)
    eps_y = eps * b.abs() / torch.where(denom > 0, denom, torch.ones_like(denom))
    lo = torch.minimum((1 + eps_y) * rp, (1 - eps_y) * rp)
    hi = torch.maximum((1 + eps_y) * rp, (1 - eps_y) * rp)
    rs_hat = torch.minimum(torch.maximum(rs, lo), hi)
    if a is None:
        m_s = (rs[:, 0] - rs[:, 1]).abs()
        m_p = (rp[:, 0] - rp[:, 1]).abs()
        alpha = (m_s / (m_s + m_p + 1e-6)).unsqueeze(1).expand_as(rp)
    else:
        alpha = torch.full_like(rp, float(a))
    mix = torch.logsumexp(torch.stack([torch.log(alpha) + rs_hat, torch.log1p(-alpha) + rp]), dim=0)
    return rs_hat + rp - mix


@register(
    "mrpo",
    section=2,
    kind="pairwise",
    paper="Multi-Reference Preference Optimization for Large Language Models (Le et al., 2024)",
    formula="ls(beta*[(lp_w - lp_l) - (r~_w - r~_l)]), r~(y) = rs^(y) + rp(y) - log(a*exp(rs^(y)) + (1-a)*exp(rp(y))); "
    "rs^ = clamp(rs, (1+eps_y)*rp, (1-eps_y)*rp), eps_w = eps*|b_w|/(|b_w|+|b_l|), b_y = (rp(y)+rs(y))/2; "
    "adaptive a = |m_s|/(|m_s|+|m_p|+1e-6), m = r(y_w) - r(y_l) per reference (unclipped)",
    inputs=(LossInput("ref2_logps", (("B", 2),), "scores rs of the second reference (ref_logps holds the primary rp)"),),
    defaults={"beta": 0.1, "eps": 0.1, "a": None},
    ranges={"beta": POSITIVE, "eps": Interval(0.0, 1.0, hi_closed=False), "a": Interval(0.0, 1.0, allow_none=True)},
    notes="a=None is the adaptive weight; a float fixes it.",
)
def mrpo(policy: Tensor, ref: Tensor, *, beta: float, eps: float, a: float | None, ref2_logps: Tensor) -> HeadResult:
    """MRPO: DPO against a clipped, weighted combination of two references."""
    r_tilde = mrpo_combined_reference(ref, ref2_logps, eps=eps, a=a)
    z = beta * ((policy[:, 0] - policy[:, 1]) - (r_tilde[:, 0] - r_tilde[:, 1]))
    u = policy - r_tilde
    return HeadResult(ls(z), rewards=(beta * u[:, 0], beta * u[:, 1]))


# --------------------------------------------------------------------------- diffusion_dpo


@register(
    "diffusion_dpo",
    section=2,
    kind="pairwise",
    paper="Diffusion Model Alignment Using Direct Preference Optimization (Wallace et al., 2023)",
    formula="ls(-beta*T*[(e_w - e_w_ref) - (e_l - e_l_ref)]), e = ||eps - eps_pred||^2 per sample",
    defaults={"beta": 5000.0, "T": 1000.0},
    ranges={"beta": POSITIVE, "T": POSITIVE},
    notes="policy_logps holds the policy's denoising errors e, ref_logps the reference's (both (B, 2)); "
    "rewards/* report -beta*T*(e - e_ref) and logps/* the mean errors.",
)
def diffusion_dpo(policy: Tensor, ref: Tensor, *, beta: float, T: float) -> HeadResult:
    """Diffusion-DPO: DPO with ``u = -T (e - e_ref)`` from denoising errors."""
    r = -beta * T * (policy - ref)
    return HeadResult(ls(r[:, 0] - r[:, 1]), rewards=(r[:, 0], r[:, 1]))
