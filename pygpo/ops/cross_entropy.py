"""``fused_linear_cross_entropy``: ``F.cross_entropy(F.linear(h, W, b), y, ...)`` without N x V logits."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .token_rows import scatter_rows, valid_row_stats
from .token_stats import StatRequest
from .validation import check_finite, check_real

_REDUCTIONS = ("mean", "sum", "none")


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    memory_budget: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> Tensor:
    r"""Token cross-entropy of ``z = softcap(hidden @ weight.T + bias) / temperature`` against ``labels``.

    Per valid token, with ``eps = label_smoothing`` and ``lse = log sum_v exp(z_v)``:

    .. math::
        \ell = (1 - \epsilon)(\mathrm{lse} - z_y) + \epsilon\,(\mathrm{lse} - \tfrac1V \textstyle\sum_v z_v)
               + \lambda_z\,\mathrm{lse}^2

    which equals ``F.cross_entropy(logits, labels, ignore_index=..., label_smoothing=eps)`` when
    ``z_loss == 0``. ``reduction="mean"`` divides by the number of non-ignored tokens (as torch does);
    when every token is ignored it returns 0.0 rather than torch's NaN.

    Shapes: ``hidden (..., D)``, ``weight (V, D)``, ``labels (...)``, ``bias (V,)``. Returns a float32
    (float64 for float64 inputs on the torch backend) scalar, or the labels' shape for ``reduction="none"`` (0.0 at ignored tokens).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    label_smoothing = check_real("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    z_loss = check_finite("z_loss", z_loss)
    if z_loss < 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    req = StatRequest(mean_logit=label_smoothing > 0.0, temperature=temperature, softcap=softcap)
    rows = valid_row_stats(
        hidden, weight, labels, bias, ignore_index=ignore_index, req=req, backend=backend,
        memory_budget=memory_budget, deterministic=deterministic,
    )
    stats = rows.stats
    loss = -stats.logprobs
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (stats.lse - stats.mean_logit)
    if z_loss > 0.0:
        loss = loss + z_loss * stats.lse.square()
    if reduction == "none":
        return scatter_rows(loss, rows)
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / max(rows.index.numel(), 1)

