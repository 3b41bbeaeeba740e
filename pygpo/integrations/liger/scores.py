"""Per-row sequence scores and logit sums from the fused lm_head + log-prob op.

A row's score ``s`` is the sum of its tokens' log-probs, or their mean when averaging; the logits sums
come from linearity (``sum_v (h . W_v + b_v) = h . sum_v W_v + sum_v b_v``), so no logits are formed.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ...ops import fused_linear_logprobs


class FusedOps(NamedTuple):
    """pygpo's options of the fused log-prob op."""

    backend: str = "auto"
    memory_budget: Optional[int] = None
    deterministic: Optional[bool] = None

    def logps(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int) -> Tensor:
        """Per-token log-probs ``(N, T)`` of ``labels`` under ``hidden @ weight.T + bias`` (0 at ``ignore_index``)."""
        return fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, **self._asdict())


def row_logit_sums(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``sum_{t, v}`` of the logits ``hidden @ weight.T + bias`` per row ``(N,)``, by linearity, detached."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        sums = hidden.sum(dim=1, dtype=acc) @ weight.sum(dim=0, dtype=acc)
        if bias is not None:
            sums = sums + hidden.shape[1] * bias.sum(dtype=acc)
    return sums


class Scores(NamedTuple):
    """Per-row sequence scores of one model ``(N,)`` and what they were made from."""

    sums: Tensor  # token-summed log-probs
    counts: Tensor  # valid tokens per row
    scores: Tensor  # sums, or sums / counts when averaging


def sequence_scores(
    ops: FusedOps, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
    average: bool,
) -> Scores:
    """Scores of the rows of ``hidden (N, T, D)`` on ``target (N, T)``: token sums, or means when ``average``."""
    sums = ops.logps(hidden, weight, target, bias, ignore_index).sum(dim=-1)
    counts = (target != ignore_index).sum(dim=-1).to(sums.dtype)
    return Scores(sums, counts, sums / counts if average else sums)


def reference_scores(
    ops: FusedOps, use_ref_model: bool, ref_input: Optional[Tensor], ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor], target: Tensor, ignore_index: int, average: bool, policy: Tensor,
) -> Tensor:
    """The reference's scores (constants), or zeros without a reference model."""
    if not use_ref_model:
        return torch.zeros_like(policy).detach()
    with torch.no_grad():
        ref = sequence_scores(
            ops, ref_input, ref_weight, target, ref_bias, ignore_index, average  # type: ignore[arg-type]
        ).scores
    return ref.to(policy.dtype)
