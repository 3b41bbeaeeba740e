"""What :class:`pygpo.FusedPreferenceLoss` returns: the loss, per-example losses, metrics and scores."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

from torch import Tensor

from .layout import ResponseLayout
from .metrics import token_metrics
from .scores import TokenScores


class FusedPreferenceOutput(NamedTuple):
    """``loss`` (scalar), ``per_example`` ``(B,)``, ``metrics`` (name -> detached tensor), and the scores.

    ``policy_logps`` / ``ref_logps``: ``(B, K)`` sequence scores after the reducer (``ref_logps`` is
    ``None`` without a reference); ``lengths``: ``(B, K)`` completion-token counts.
    """

    loss: Tensor
    per_example: Tensor
    metrics: dict[str, Any]
    policy_logps: Tensor
    ref_logps: Optional[Tensor]
    lengths: Tensor


def with_token_metrics(head_metrics: Mapping[str, Any], scores: TokenScores, layout: ResponseLayout) -> dict[str, Any]:
    """The head's metrics plus the fused pass's token metrics (:mod:`.metrics`); where both report a name
    (``nll_loss`` of ``tpo_triple``: its gold response's NLL), the head's value wins."""
    metrics = dict(head_metrics)
    for name, value in token_metrics(scores, layout).items():
        metrics.setdefault(name, value)
    return metrics
