"""Section 2 of LOSSES.md, first part: pairwise heads on ``(u_w, u_l)`` with no side information.

Notation: ``u = lp - rp`` per response, ``h = u_w - u_l``, ``ls(z) = -log sigmoid(z)``. Every head
takes ``(B, 2)`` policy and reference scores ``[chosen, rejected]`` and returns one loss per pair.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._math import ls, logsig
from .common_inputs import BETA, BETA_RANGE, LENGTHS_PAIR, log_ratios, mean_scores
from .constraints import BOOL, POSITIVE, Interval, OneOf
from .errors import MissingInputError
from .registry import HeadResult, LossInput, register
from .validation import in_unit_interval

HALF_OPEN_EPS = Interval(0.0, 0.5, hi_closed=False)


@register(
    "dpo",
    section=2,
    kind="pairwise",
    aliases=("sigmoid",),
    paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model (Rafailov et al., 2023)",
    formula="ls(beta*h)",
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="sigmoid",
)
def dpo(policy: Tensor, ref: Tensor, *, beta: float) -> HeadResult:
    """DPO: ``ls(beta * h)``."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(ls(beta * (u_w - u_l)))


@register(
    "cdpo",
    section=2,
    kind="pairwise",
    paper="conservative DPO (label smoothing): Mitchell, 'A note on DPO with noisy preferences and relationship to IPO' (2023)",
    formula="(1-eps)*ls(beta*h) + eps*ls(-beta*h)",
    defaults={"beta": 0.1, "eps": 0.1},
    ranges={"beta": POSITIVE, "eps": Interval(0.0, 0.5)},
    notes="TRL's 'sigmoid' loss ignores label_smoothing (TRL 1.16), so TRL has no counterpart.",
)
def cdpo(policy: Tensor, ref: Tensor, *, beta: float, eps: float) -> HeadResult:
    """Conservative DPO: ``(1-eps) ls(beta h) + eps ls(-beta h)``; ``eps=0`` is DPO."""
    u_w, u_l = log_ratios(policy, ref)
    z = beta * (u_w - u_l)
    return HeadResult((1 - eps) * ls(z) + eps * ls(-z))


@register(
    "robust",
    section=2,
    kind="pairwise",
    paper="Provably Robust DPO: Aligning Language Models with Noisy Feedback (Chowdhury et al., 2024)",
    formula="[(1-eps)*ls(beta*h) - eps*ls(-beta*h)] / (1-2eps)",
    defaults={"beta": 0.1, "eps": 0.1},
    ranges={"beta": POSITIVE, "eps": HALF_OPEN_EPS},
    trl_name="robust",
    notes="LOSSES.md gives no default for eps; 0.1 (the flip rate the paper studies most) is used.",
)
def robust(policy: Tensor, ref: Tensor, *, beta: float, eps: float) -> HeadResult:
    """rDPO: ``[(1-eps) ls(beta h) - eps ls(-beta h)] / (1 - 2 eps)`` (unbiased under flip rate eps)."""
    u_w, u_l = log_ratios(policy, ref)
    z = beta * (u_w - u_l)
    return HeadResult(((1 - eps) * ls(z) - eps * ls(-z)) / (1 - 2 * eps))


@register(
    "ipo",
    section=2,
    kind="pairwise",
    paper="A General Theoretical Paradigm to Understand Learning from Human Preferences (Azar et al., 2023)",
    formula="(h_bar - 1/(2*beta))^2; h_bar = u_w/|y_w| - u_l/|y_l| (length_normalize=True, as TRL); h if length_normalize=False",
    inputs=(LossInput("lengths", (("B", 2),), "completion token counts [|y_w|, |y_l|]; required when length_normalize=True", required=False),),
    defaults={"beta": 0.1, "length_normalize": True},
    ranges={"beta": POSITIVE, "length_normalize": BOOL},
    trl_name="ipo",
)
def ipo(policy: Tensor, ref: Tensor, *, beta: float, length_normalize: bool, lengths: Tensor | None = None) -> HeadResult:
    """IPO (beta = tau of Eq. 17): ``(h_bar - 1/(2 beta))^2``."""
    if length_normalize:
        if lengths is None:
            raise MissingInputError("ipo: missing required input 'lengths' (needed when length_normalize=True)")
        u_w, u_l = mean_scores(policy - ref, lengths)
    else:
        u_w, u_l = log_ratios(policy, ref)
    return HeadResult((u_w - u_l - 1.0 / (2.0 * beta)) ** 2)


@register(
    "hinge",
    section=2,
    kind="pairwise",
    paper="SLiC-HF (Zhao et al., 2023) / Statistical Rejection Sampling Improves Preference Optimization (Liu et al., 2023), hinge-norm",
    formula="relu(1 - beta*h)",
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="hinge",
)
def hinge(policy: Tensor, ref: Tensor, *, beta: float) -> HeadResult:
    """Hinge (RSO hinge-norm): ``relu(1 - beta h)``."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(torch.relu(1 - beta * (u_w - u_l)))


@register(
    "exo",
    section=2,
    kind="pairwise",
    paper="Towards Efficient and Exact Optimization of Language Model Alignment (Ji et al., 2024)",
    formula="sigma(beta*h)*(logsig(beta*h) - log(1-eps)) + sigma(-beta*h)*(logsig(-beta*h) - log eps)",
    defaults={"beta": 0.1, "eps": 1e-3},
    ranges={"beta": POSITIVE, "eps": Interval(0.0, 1.0, lo_closed=False, hi_closed=False)},
    trl_name="exo_pair",
)
def exo(policy: Tensor, ref: Tensor, *, beta: float, eps: float) -> HeadResult:
    """EXO-pref (K=2): ``KL(softmax(beta u) || [1-eps, eps])`` written out."""
    u_w, u_l = log_ratios(policy, ref)
    z = beta * (u_w - u_l)
    loss = torch.sigmoid(z) * (logsig(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (logsig(-z) - math.log(eps))
    return HeadResult(loss)


@register(
    "nca",
    section=2,
    kind="pairwise",
    paper="Noise Contrastive Alignment of Language Models with Explicit Rewards (Chen et al., 2024)",
    formula="ls(beta*u_w) + 0.5*ls(-beta*u_w) + 0.5*ls(-beta*u_l)",
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="nca_pair",
)
def nca(policy: Tensor, ref: Tensor, *, beta: float) -> HeadResult:
    """NCA (pairwise): ``ls(beta u_w) + ls(-beta u_w)/2 + ls(-beta u_l)/2``."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(ls(beta * u_w) + 0.5 * ls(-beta * u_w) + 0.5 * ls(-beta * u_l))


@register(
    "bco_pair",
    section=2,
    kind="pairwise",
    paper="Binary Classifier Optimization for Large Language Model Alignment (Jung et al., 2024)",
    formula="ls(beta*u_w - delta) + ls(-(beta*u_l - delta)); delta = running mean of all beta*u (state; 0 when running_mean=False)",
    inputs=(LossInput("delta", ((),), "reward shift delta (scalar); the functional form defaults to 0, BCOPairLoss keeps the running mean", required=False),),
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="bco_pair",
    notes="Functional form: delta is an input (default 0, i.e. running_mean=False). "
    "pygpo.losses.BCOPairLoss keeps the running mean as state.",
)
def bco_pair(policy: Tensor, ref: Tensor, *, beta: float, delta: Tensor | None = None) -> HeadResult:
    """BCO on pairs: ``ls(beta u_w - delta) + ls(-(beta u_l - delta))``."""
    u_w, u_l = log_ratios(policy, ref)
    d = 0.0 if delta is None else delta.detach()
    loss = ls(beta * u_w - d) + ls(-(beta * u_l - d))
    return HeadResult(loss, metrics={"delta": torch.as_tensor(d, dtype=policy.dtype, device=policy.device)})


@register(
    "sppo_hard",
    section=2,
    kind="pairwise",
    paper="Self-Play Preference Optimization for Language Model Alignment (Wu et al., 2024), hard labels",
    formula="(u_w - 1/(2beta))^2 + (u_l + 1/(2beta))^2",
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="sppo_hard",
)
def sppo_hard(policy: Tensor, ref: Tensor, *, beta: float) -> HeadResult:
    """SPPO with hard win probabilities (1 for the winner, 0 for the loser)."""
    u_w, u_l = log_ratios(policy, ref)
    half = 1.0 / (2.0 * beta)
    return HeadResult((u_w - half) ** 2 + (u_l + half) ** 2)


@register(
    "sppo",
    section=2,
    kind="pairwise",
    paper="Self-Play Preference Optimization for Language Model Alignment (Wu et al., 2024)",
    formula="0.5*[(u_w - eta*(P_w - 1/2))^2 + (u_l - eta*(P_l - 1/2))^2], reference = previous iterate; eta = 1/beta",
    inputs=(LossInput("win_probs", (("B", 2),), "estimated win probabilities [P_w, P_l] in [0, 1]"),),
    defaults={"beta": 0.1, "eta": None},
    ranges={"beta": POSITIVE, "eta": Interval(0.0, math.inf, lo_closed=False, allow_none=True)},
    extra={"check": in_unit_interval("win_probs")},
)
def sppo(policy: Tensor, ref: Tensor, *, beta: float, eta: float | None, win_probs: Tensor) -> HeadResult:
    """SPPO (soft): squared distance of each log-ratio to ``eta (P - 1/2)``; ``eta`` defaults to 1/beta."""
    e = 1.0 / beta if eta is None else eta
    u_w, u_l = log_ratios(policy, ref)
    loss = 0.5 * ((u_w - e * (win_probs[:, 0] - 0.5)) ** 2 + (u_l - e * (win_probs[:, 1] - 0.5)) ** 2)
    return HeadResult(loss)


def _smoothed(d: Tensor, beta: float, eps: float) -> Tensor:
    return (1 - eps) * ls(beta * d) + eps * ls(-beta * d)


@register(
    "aot",
    section=2,
    kind="pairwise",
    paper="Distributional Preference Alignment of LLMs via Optimal Transport (AOT; Melnyk et al., 2024)",
    formula="d = sort_B(lp_w - lp_l) - sort_B(rp_w - rp_l); (1-eps)*ls(beta*d) + eps*ls(-beta*d); sort along the batch",
    defaults={"beta": 0.1, "eps": 0.0},
    ranges={"beta": POSITIVE, "eps": Interval(0.0, 0.5)},
    trl_name="aot",
    notes="per_example[i] is the loss of the i-th sorted position, not of example i.",
)
def aot(policy: Tensor, ref: Tensor, *, beta: float, eps: float) -> HeadResult:
    """AOT (paired): first-order stochastic dominance via sorted margins along the batch."""
    d = torch.sort(policy[:, 0] - policy[:, 1]).values - torch.sort(ref[:, 0] - ref[:, 1]).values
    return HeadResult(_smoothed(d, beta, eps))


@register(
    "aot_unpaired",
    section=2,
    kind="pairwise",
    paper="Distributional Preference Alignment of LLMs via Optimal Transport (AOT; Melnyk et al., 2024), TRL aot_unpaired",
    formula="d = sort_B(u_w) - sort_B(u_l), same head as aot",
    defaults={"beta": 0.1, "eps": 0.0},
    ranges={"beta": POSITIVE, "eps": Interval(0.0, 0.5)},
    trl_name="aot_unpaired",
    notes="per_example[i] is the loss of the i-th sorted position, not of example i.",
)
def aot_unpaired(policy: Tensor, ref: Tensor, *, beta: float, eps: float) -> HeadResult:
    """AOT (unpaired): sorted chosen log-ratios against sorted rejected log-ratios."""
    u_w, u_l = log_ratios(policy, ref)
    d = torch.sort(u_w).values - torch.sort(u_l).values
    return HeadResult(_smoothed(d, beta, eps))


@register(
    "apo_zero",
    section=2,
    kind="pairwise",
    paper="Anchored Preference Optimization and Contrastive Revisions (D'Oosterlinck et al., 2024), APO-zero",
    formula="(1 - sigma(beta*u_w)) + sigma(beta*u_l)",
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="apo_zero",
)
def apo_zero(policy: Tensor, ref: Tensor, *, beta: float) -> HeadResult:
    """APO-zero: raise the chosen log-ratio, lower the rejected one."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult((1 - torch.sigmoid(beta * u_w)) + torch.sigmoid(beta * u_l))


@register(
    "apo_down",
    section=2,
    kind="pairwise",
    paper="Anchored Preference Optimization and Contrastive Revisions (D'Oosterlinck et al., 2024), APO-down",
    formula="sigma(beta*u_w) + (1 - sigma(beta*h))",
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="apo_down",
)
def apo_down(policy: Tensor, ref: Tensor, *, beta: float) -> HeadResult:
    """APO-down: lower both, the rejected more."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(torch.sigmoid(beta * u_w) + (1 - torch.sigmoid(beta * (u_w - u_l))))


@register(
    "discopop",
    section=2,
    kind="pairwise",
    paper="Discovering Preference Optimization Algorithms with and for Large Language Models (Lu et al., 2024)",
    formula="z = beta*h; m = sigma(z/tau); (1-m)*ls(z) + m*exp(-z)",
    defaults={"beta": 0.1, "tau": 0.05},
    ranges={"beta": POSITIVE, "tau": POSITIVE},
    trl_name="discopop",
)
def discopop(policy: Tensor, ref: Tensor, *, beta: float, tau: float) -> HeadResult:
    """DiscoPOP (log-ratio modulated): a sigmoid-gated blend of the logistic and exponential losses."""
    u_w, u_l = log_ratios(policy, ref)
    z = beta * (u_w - u_l)
    m = torch.sigmoid(z / tau)
    # m exp(-z) as exp(log m - z): finite where exp(-z) alone overflows (there m underflows faster)
    return HeadResult((1 - m) * ls(z) + torch.exp(logsig(z / tau) - z))


@register(
    "sigmoid_norm",
    section=2,
    kind="pairwise",
    paper="TRL sigmoid_norm (length-normalised DPO)",
    formula="ls(beta*h_bar), h_bar = u_w/|y_w| - u_l/|y_l|",
    inputs=(LENGTHS_PAIR,),
    defaults=BETA,
    ranges=BETA_RANGE,
    trl_name="sigmoid_norm",
)
def sigmoid_norm(policy: Tensor, ref: Tensor, *, beta: float, lengths: Tensor) -> HeadResult:
    """Length-normalised DPO: ``ls(beta h_bar)``."""
    u_w, u_l = mean_scores(policy - ref, lengths)
    return HeadResult(ls(beta * (u_w - u_l)))


FDPO_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha", "js_divergence", "alpha_divergence")


def _linear_past_80(x: Tensor) -> Tensor:
    """``exp(x)`` up to ``x = 80``, continued by its tangent there (``exp(80) (1 + x - 80)``), ``x`` capped at
    4000: finite in fp32, increasing, with a non-zero gradient everywhere below the cap."""
    x = torch.clamp(x, max=4000.0)
    return torch.exp(torch.clamp(x, max=80.0)) * (1 + torch.relu(x - 80.0))


def fdpo_margin(u_w: Tensor, u_l: Tensor, divergence: str, alpha: float) -> Tensor:
    """The f-DPO margin ``g(u_w) - g(u_l)``, ``g = f'`` of the divergence at ``t = exp(u)``.

    Forward KL is the alpha divergence at ``alpha = 1``; for both, ``g(u_w) - g(u_l) = (exp(a_l) - exp(a_w))
    / alpha`` with ``a = -alpha u``, computed in at least fp32 with ``exp`` continued linearly past an exponent
    of 80 (:func:`_linear_past_80`). That equals the formula while both exponents are at most 80 and beyond
    stays finite and keeps the margin's sign (ties give 0) and a gradient: clamping each exponent at 80 would
    score every pair past it alike (loss log 2) with no gradient, and without a clamp fp32 overflows at
    ``u = -88`` into ``inf - inf``.
    """
    if divergence == "reverse_kl":
        return u_w - u_l
    if divergence in ("js", "js_divergence"):
        return logsig(u_w) - logsig(u_l)  # the log 2 terms cancel
    a = 1.0 if divergence == "forward_kl" else alpha
    e_w, e_l = (-a * (u if u.dtype == torch.float64 else u.float()) for u in (u_w, u_l))
    return ((_linear_past_80(e_l) - _linear_past_80(e_w)) / a).to(u_w.dtype)


@register(
    "fdpo",
    section=2,
    kind="pairwise",
    paper="Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints (Wang et al., 2023)",
    formula="ls(beta*(g(u_w) - g(u_l))); g = reverse_kl u; forward_kl 1 - exp(-u); js log 2 + logsig(u); "
    "alpha (1 - exp(-alpha*u))/alpha (alpha in (0,1)); forward_kl and alpha in fp32, exp continued by its "
    "tangent past an exponent of 80",
    defaults={"beta": 0.1, "divergence": "reverse_kl", "alpha": 0.5},
    ranges={
        "beta": POSITIVE,
        "divergence": OneOf(FDPO_DIVERGENCES),
        "alpha": Interval(0.0, 1.0, lo_closed=False, hi_closed=False),
    },
    trl_name="sigmoid with f_divergence_type (alpha here = 1 - TRL's f_alpha_divergence_coef)",
    notes="Past an exponent of 80, exp is continued by its tangent rather than clamped (fdpo_margin): a clamp "
    "would score every pair past it alike, with no gradient. "
    "TRL's spellings js_divergence/alpha_divergence are accepted. TRL's alpha-divergence coefficient "
    "c gives g = (exp((c-1)u) - 1)/(c-1), which is this g with alpha = 1 - c.",
)
def fdpo(policy: Tensor, ref: Tensor, *, beta: float, divergence: str, alpha: float) -> HeadResult:
    """f-DPO: DPO on ``g(u)`` for a chosen f-divergence."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(ls(beta * fdpo_margin(u_w, u_l, divergence, alpha)))


@register(
    "hdpo",
    section=2,
    kind="pairwise",
    paper="Entropy Controllable Direct Preference Optimization (H-DPO; Omura et al., 2024)",
    formula="ls(alpha*beta*(lp_w - lp_l) - beta*(rp_w - rp_l))",
    defaults={"beta": 0.1, "alpha": 0.9},
    ranges={"beta": POSITIVE, "alpha": POSITIVE},
)
def hdpo(policy: Tensor, ref: Tensor, *, beta: float, alpha: float) -> HeadResult:
    """H-DPO: the policy margin scaled by alpha (entropy control); alpha=1 is DPO."""
    z = alpha * beta * (policy[:, 0] - policy[:, 1]) - beta * (ref[:, 0] - ref[:, 1])
    return HeadResult(ls(z))


@register(
    "dpo_shift",
    section=2,
    kind="pairwise",
    paper="DPO-Shift: Shifting the Distribution of Direct Preference Optimization (Yang et al., 2025)",
    formula="ls(beta*u_w - lam*beta*u_l)",
    defaults={"beta": 0.1, "lam": 0.95},
    ranges={"beta": POSITIVE, "lam": Interval(0.0, 1.0, lo_closed=False)},
    notes="A schedule sets lam per step by passing a new value each call.",
)
def dpo_shift(policy: Tensor, ref: Tensor, *, beta: float, lam: float) -> HeadResult:
    """DPO-Shift: the rejected reward scaled by ``lam`` in (0, 1]."""
    u_w, u_l = log_ratios(policy, ref)
    return HeadResult(ls(beta * u_w - lam * beta * u_l))


__all__ = [
    "dpo",
    "cdpo",
    "robust",
    "ipo",
    "hinge",
    "exo",
    "nca",
    "bco_pair",
    "sppo_hard",
    "sppo",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "fdpo",
    "fdpo_margin",
    "hdpo",
    "dpo_shift",
]
