"""Input checks of the Liger-compatible losses, run before any compute.

Each error names the argument and the expected shape, dtype or range. Shapes as in Liger: ``_input (rows,
T, D)``, ``weight (V, D)``, ``target (rows, T)``, ``bias (V,)``, with ``rows = 2B`` (chosen over rejected)
for the paired losses and ``N`` for KTO.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch
from torch import Tensor

from ...ops.validation import check_label_range, check_projection, check_same_device, check_tensor


def check_target(name: str, target: Any, leading: torch.Size, vocab: int, ignore_index: int) -> None:
    """``target`` (``name`` in errors): integer labels of shape ``leading`` in ``[0, vocab)`` or ``ignore_index``."""
    check_tensor(name, target)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {target.dtype}")
    if tuple(target.shape) != tuple(leading):
        raise ValueError(f"{name} must have _input's leading shape {tuple(leading)}, got {tuple(target.shape)}")
    try:
        check_label_range(target, vocab, ignore_index=ignore_index)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def check_model(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], *, ignore_index: int, rows: str
) -> None:
    """``_input (rows, T, D)``, ``weight (V, D)``, ``target (rows, T)``, ``bias (V,)`` on one device."""
    check_projection(_input, weight, bias, names=("_input", "weight", "bias"))
    if _input.dim() != 3 or _input.shape[0] == 0:
        raise ValueError(f"_input must have shape ({rows}, T, D) with at least one row, got {tuple(_input.shape)}")
    check_target("target", target, _input.shape[:2], weight.shape[0], ignore_index)
    check_same_device(_input=_input, weight=weight, target=target, bias=bias)


def check_reference(
    use_ref_model: bool, ref_input: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    *, _input: Tensor, weight: Tensor,
) -> None:
    """The reference head next to the policy's: ``ref_input (rows, T, D_ref)``, ``ref_weight (V, D_ref)``."""
    if not use_ref_model:
        return
    if ref_input is None or ref_weight is None:
        missing = " and ".join(n for n, t in (("ref_input", ref_input), ("ref_weight", ref_weight)) if t is None)
        raise ValueError(
            f"use_ref_model=True needs the reference's hidden states ref_input {tuple(_input.shape[:2]) + ('D_ref',)} "
            f"and lm_head ref_weight (V, D_ref); {missing} not given (or pass use_ref_model=False)"
        )
    check_projection(ref_input, ref_weight, ref_bias, names=("ref_input", "ref_weight", "ref_bias"))
    if tuple(ref_input.shape[:-1]) != tuple(_input.shape[:-1]) or ref_input.dim() != 3:
        raise ValueError(
            f"ref_input must have _input's leading shape {tuple(_input.shape[:-1])}, got {tuple(ref_input.shape)}"
        )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the policy's vocabulary size V={weight.shape[0]}, got {tuple(ref_weight.shape)}")
    check_same_device(_input=_input, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)


def check_even_rows(_input: Tensor) -> None:
    """Paired rows: ``B`` chosen over ``B`` rejected, so ``2B`` in all."""
    if _input.shape[0] % 2:
        raise ValueError(
            f"_input must stack B chosen rows over B rejected rows (an even number of rows), got {_input.shape[0]}"
        )


def check_nonempty_rows(mask: Tensor, ignore_index: int) -> None:
    """Averaged scores need at least one valid token per row (the mean of none is 0/0)."""
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(
            f"target row {int(empty[0])} has no token other than ignore_index={ignore_index}; the log-probs are "
            "averaged per row (average_log_prob), which needs at least one token in every row"
        )


def check_kto_inputs(preference_labels: Any, kl: Any, _input: Tensor) -> None:
    """KTO's ``preference_labels (N,)`` bool on ``_input``'s device and ``kl``: None, a number or one element."""
    if preference_labels is None:
        raise ValueError("preference_labels is required: a (N,) bool tensor, True for a desirable response")
    check_tensor("preference_labels", preference_labels)
    if preference_labels.dtype != torch.bool:
        raise TypeError(f"preference_labels must be a bool tensor (True: desirable), got {preference_labels.dtype}")
    if tuple(preference_labels.shape) != (_input.shape[0],):
        raise ValueError(
            f"preference_labels must have shape (N,) = ({_input.shape[0]},), one per row of _input; "
            f"got {tuple(preference_labels.shape)}"
        )
    check_same_device(_input=_input, preference_labels=preference_labels)
    rows = _input.shape[0]
    if isinstance(kl, Tensor) and kl.numel() != 1 and tuple(kl.shape) != (rows,):
        raise ValueError(
            f"kl must be a scalar (the KTO reference point for the batch) or have shape (N,) = ({rows},), one per "
            f"row of _input; got shape {tuple(kl.shape)}"
        )
    if isinstance(kl, Tensor):
        check_same_device(_input=_input, kl=kl)
    if kl is not None and (isinstance(kl, bool) or not isinstance(kl, (Tensor, numbers.Real))):
        raise TypeError(f"kl must be a real number or a tensor, got {type(kl).__name__}")
