"""Input declarations and small helpers shared by several heads."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .constraints import POSITIVE
from .registry import LossInput

LENGTHS_PAIR = LossInput(
    "lengths", (("B", 2),), "completion token counts [|y_w|, |y_l|] (>= 1), as `lengths=`"
)
LENGTHS_K = LossInput("lengths", (("B", "K"),), "completion token counts per response (>= 1)")
LENGTHS_ONE = LossInput("lengths", (("B",),), "completion token counts per response (>= 1)")
SUM_LOGPS = LossInput(
    "sum_logps", (("B", 2),),
    "token sums lp(y) = sum_t lp_t [w, l] for the terms defined on raw token log-probs (NLL, WPO weight) when "
    "the scores come from another reducer (mean, ld, sampled, weighted); default: the scores",
    required=False, differentiable=True,
)
NLL_MEAN_LENGTH = LossInput(
    "nll_mean_length", ((),),
    "mean token count per example of the sequences NLL_mean runs over (chosen responses; gold ones for "
    "tpo_triple), taken over every example that shares the token mean: the optimizer step's micro-batches "
    "and ranks under gradient accumulation or data parallelism; default: this batch's mean",
    required=False,
)

BETA = {"beta": 0.1}
BETA_RANGE = {"beta": POSITIVE}


def log_ratios(policy: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """``u_w = lp_w - rp_w``, ``u_l = lp_l - rp_l`` from ``(B, 2)`` scores."""
    u = policy - ref
    return u[:, 0], u[:, 1]


def mean_scores(scores: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Length-normalised columns ``s_w / |y_w|``, ``s_l / |y_l|``."""
    m = scores / lengths
    return m[:, 0], m[:, 1]


def token_sums(policy: Tensor, sum_logps: Optional[Tensor]) -> Tensor:
    """The token-summed log-probs ``lp(y)``: ``sum_logps`` where given, else the scores themselves."""
    return policy if sum_logps is None else sum_logps


def batch_token_mean_nll(lp_chosen: Tensor, len_chosen: Tensor, mean_length: Optional[Tensor] = None) -> Tensor:
    """``NLL_mean(y_w)`` spread over the batch: the per-example shares of the batch token mean.

    ``NLL_mean(y_w) = -sum_b lp_w,b / sum_b |y_w,b|`` (the mean over every chosen token of the batch,
    as TRL's ``rpo_alpha``/CPO/ORPO NLL). Share ``b`` is ``-lp_w,b / L`` with ``L = sum |y_w| / B``, the
    mean chosen length, so the batch mean of the shares equals the token mean exactly. Needs
    token-summed scores (the ``sum`` reducer).

    ``mean_length`` (0-d) replaces ``L`` by the mean over a larger set of examples that this batch is a
    part of (all micro-batches of an optimizer step, on every rank): the shares, weighted as the batch
    losses are (each micro-batch by its share of the step's examples), then sum to the token mean over
    that whole set, and each example's share depends on its own score alone.
    """
    if mean_length is not None:
        return -lp_chosen / mean_length
    b = lp_chosen.shape[0]
    return -lp_chosen * (b / len_chosen.sum())
