"""Input checks shared by the ops. Every check runs before any kernel and names the argument at fault."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_linear_inputs(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], *, ignore_index: int
) -> None:
    """Shapes, dtypes, devices and label range of a fused ``linear -> log-softmax -> gather`` call.

    hidden ``(..., D)``, weight ``(V, D)``, labels ``(...)`` integer with values in ``[0, V)`` or
    ``ignore_index``, bias ``(V,)`` or ``None``.
    """
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("labels", labels)
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating-point tensor (float32, float16, bfloat16), got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., D) with at least one dimension, got a 0-d tensor")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's second dimension D={dim}; "
            f"got hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (e.g. torch.long), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])} "
            f"(hidden is {tuple(hidden.shape)})"
        )
    devices = {"hidden": hidden.device, "weight": weight.device, "labels": labels.device}
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
    check_label_range(labels, vocab, ignore_index=ignore_index)

def check_label_range(labels: Tensor, vocab: int, *, ignore_index: int) -> None:
    """Every label lies in ``[0, vocab)`` or equals ``ignore_index`` (one host sync on GPU)."""
    valid = labels != ignore_index
    if labels.numel() and bool(valid.any()):
        lo, hi = int(labels[valid].min()), int(labels[valid].max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {lo if lo < 0 else hi}"
            )


def check_positive(name: str, value: Optional[float], *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not float(value) > 0.0 or value != value:
        raise ValueError(f"{name} must be a positive number, got {value}")


def check_memory_budget(memory_budget: Optional[int]) -> None:
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
        raise ValueError(f"memory_budget must be a positive int number of bytes or None, got {memory_budget!r}")
