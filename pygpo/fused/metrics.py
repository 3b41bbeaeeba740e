"""Token-level metrics of the fused pass, named as TRL logs them.

Means are over completion tokens of the whole batch (token means, not means of per-response means):

* ``logits/chosen``, ``logits/rejected``: mean logit ``(1/V) sum_v z_v`` over the tokens of the first
  / second response of each example (``K >= 2``);
* ``entropy``: policy entropy ``-sum_v p_v log p_v``, over every completion token;
* ``nll_loss``: ``-log p_theta(y_t)`` over the chosen (first) responses' tokens (all tokens if ``K = 1``);
* ``mean_token_accuracy``: fraction of those tokens whose label is the policy's top-1 token (not with
  the token-KL pass of TDPO / SparsePO / RRPO / PMPO, which does not compute it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .layout import ResponseLayout
from .scores import TokenScores


def _mean(values: Tensor, keep: Tensor) -> Tensor:
    n = keep.sum()
    return torch.where(n > 0, (values * keep).sum() / n.clamp(min=1), torch.full_like(n, float("nan"), dtype=values.dtype))


def token_metrics(scores: TokenScores, layout: ResponseLayout) -> dict[str, Any]:
    """The metrics above, as detached float32 scalars (those whose terms were computed)."""
    k = layout.responses_per_example
    rank = layout.token_response % k
    chosen = (rank == 0).float() if k > 1 else torch.ones_like(rank, dtype=torch.float32)
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["nll_loss"] = _mean(-scores.logps.detach(), chosen)
        if scores.is_top1 is not None:
            out["mean_token_accuracy"] = _mean(scores.is_top1, chosen)
        if scores.entropy is not None:
            out["entropy"] = _mean(scores.entropy, torch.ones_like(chosen))
        if scores.mean_logit is not None and k > 1:
            out["logits/chosen"] = _mean(scores.mean_logit, chosen)
            out["logits/rejected"] = _mean(scores.mean_logit, (rank == 1).float())
    return out
