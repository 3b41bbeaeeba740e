"""Per-example inputs a loss head needs that the fused pass itself knows, filled in for the caller.

* ``lengths``: completion-token counts ``|y|`` per response;
* ``mask``: the ``(B, K, T)`` completion-token mask, for heads that take per-token scores;
* ``kl``: ``KL(p_ref || p_theta)`` per token ``(B, K, T)``, or summed per response;
* ``log_sum_p2``: ``sum_t log sum_v p_theta(v)^2`` per response (WPO);
* ``valid``: which responses exist (multi-response heads, prefix batches with varying ``K``).

Inputs the caller gives always win. Caller inputs of the labels' shape (one value per scored label
position: ``segment_ids``, SparsePO's ``mu``/``md``, ...) are moved into ``(B, K, T)`` for heads that
declare a per-token shape.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..losses.registry import LossSpec
from .layout import ResponseLayout

AUTO_INPUTS = ("lengths", "mask", "kl", "log_sum_p2", "valid")


def is_token_shape(shape: tuple) -> bool:
    """A declared shape with a token axis: ``(B, 2, T)`` or ``(B, K, T)``."""
    return len(shape) == 3 and shape[-1] == "T"


def takes_token_scores(spec: LossSpec) -> bool:
    """Whether the head's only accepted score shape is per token (SparsePO, RRPO)."""
    return all(is_token_shape(s) for s in spec.scores)


def declared_shapes(spec: LossSpec, name: str) -> tuple:
    return spec.input(name).shapes if name in spec.input_names else ()


def per_response(x: Tensor, k: int) -> Tensor:
    """``(B, K, ...)`` values as the head expects them: ``(B,)``-first for unpaired heads (``K = 1``)."""
    return x[:, 0] if k == 1 else x


def token_input(layout: ResponseLayout, name: str, value: Tensor, labels_shape: torch.Size) -> Tensor:
    """A caller's per-token input of the labels' shape moved into ``(B, K, T)`` (ids: -1 off the mask)."""
    if tuple(value.shape) != tuple(labels_shape):
        return value
    dense = layout.dense(layout.valid(value))
    if not value.dtype.is_floating_point:
        dense = torch.where(layout.mask, dense, torch.full_like(dense, -1))
    return dense


def fill_inputs(
    spec: LossSpec,
    given: Mapping[str, Any],
    layout: ResponseLayout,
    *,
    token_scores: bool,
    kl: Optional[Tensor],
    log_sum_p2: Optional[Tensor],
    labels_shape: torch.Size,
) -> dict[str, Any]:
    """The inputs of ``spec`` this batch can supply, plus ``given`` (which wins), for one head.

    ``kl`` and ``log_sum_p2`` are ``(B, K, T)`` per-token values (or ``None``); ``token_scores`` says
    whether the head receives ``(B, K, T)`` scores (then ``kl`` stays per token) or ``(B, K)``.
    """
    k = layout.responses_per_example
    mask = layout.mask
    out: dict[str, Any] = {}
    names = spec.input_names
    if "lengths" in names:
        lengths = layout.lengths.to(torch.float32)
        out["lengths"] = per_response(lengths, k)
    if "mask" in names:
        out["mask"] = mask
    if "kl" in names and kl is not None:
        summed = torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)
        per_token = token_scores and any(is_token_shape(s) for s in declared_shapes(spec, "kl"))
        out["kl"] = kl if per_token else per_response(summed, k)
    if "log_sum_p2" in names and log_sum_p2 is not None:
        out["log_sum_p2"] = per_response(log_sum_p2.sum(-1), k)
    if "valid" in names and not bool(layout.present.all()):
        out["valid"] = layout.present
    for name, value in given.items():
        if isinstance(value, Tensor) and name in names and any(is_token_shape(s) for s in declared_shapes(spec, name)):
            value = token_input(layout, name, value, labels_shape)
        out[name] = value
    return {k_: v for k_, v in out.items() if k_ in names or k_ in spec.defaults}
