"""Input checks shared by the ops. Every check runs before any kernel and names the argument at fault."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .dispatch import BACKENDS
from .transfer import host_twin

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: The reference projection's argument names in errors.
REF_NAMES = ("ref_hidden", "ref_weight", "ref_bias")


def check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_integer_tensor(name: str, x: object) -> Tensor:
    """``x`` is a tensor of an integer dtype (not floating point, complex or bool)."""
    check_tensor(name, x)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {x.dtype}")
    return x


def check_projection(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], *, names: tuple[str, str, str] = ("hidden", "weight", "bias")
) -> None:
    """Shapes and dtypes of one ``hidden @ weight.T + bias`` projection; ``names`` are used in the messages.

    hidden ``(..., D)`` floating point with ``D >= 1``, weight ``(V, D)`` and bias ``(V,)`` (or ``None``) of the
    same dtype.
    Devices are checked by the caller, together with the other tensors of the call.
    """
    h_name, w_name, b_name = names
    check_tensor(h_name, hidden)
    check_tensor(w_name, weight)
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{h_name} must be a floating-point tensor: float32, float16, bfloat16 (or float64, which the "
                        f"torch backend computes in float64, e.g. for gradcheck), got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape (V, D), got {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have shape (..., D) with at least one dimension, got a 0-d tensor")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"{h_name}'s last dimension ({hidden.shape[-1]}) must equal {w_name}'s second dimension D={dim}; "
            f"got {h_name} {tuple(hidden.shape)} and {w_name} {tuple(weight.shape)}"
        )
    if dim == 0:
        raise ValueError(
            f"{h_name} and {w_name} must have a hidden size D >= 1, got {h_name} {tuple(hidden.shape)} and "
            f"{w_name} {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} dtype {weight.dtype} must match {h_name} dtype {hidden.dtype}")
    if bias is not None:
        check_tensor(b_name, bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"{b_name} must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} dtype {bias.dtype} must match {h_name} dtype {hidden.dtype}")


def check_same_device(**tensors: Optional[Tensor]) -> None:
    """All given tensors (``None`` entries skipped) live on one device; the message lists each one's."""
    devices = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_linear_inputs(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], *, ignore_index: int,
    label_range: bool = True,
) -> Optional[int]:
    """Shapes, dtypes, devices and label range of a fused ``linear -> log-softmax -> gather`` call.

    hidden ``(..., D)``, weight ``(V, D)``, labels ``(...)`` integer with values in ``[0, V)`` or
    ``ignore_index``, bias ``(V,)`` or ``None``.

    Returns the number of valid labels (from :func:`check_label_range`, the check's one host sync), or
    ``None`` with ``label_range=False``: a caller that has checked the labels already (the fused loss
    checks them together with its layout) skips the device read.
    """
    check_integer_tensor("labels", labels)
    check_projection(hidden, weight, bias)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])} "
            f"(hidden is {tuple(hidden.shape)})"
        )
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if not label_range:
        return None
    return check_label_range(labels, weight.shape[0], ignore_index=ignore_index)


def check_reference_inputs(
    ref_hidden: Tensor, ref_weight: Tensor, ref_bias: Optional[Tensor], *, hidden: Tensor, weight: Tensor
) -> None:
    """The reference model's projection next to an already checked policy one (``hidden``, ``weight``).

    ref_hidden ``(..., D_ref)`` with hidden's leading shape, ref_weight ``(V, D_ref)`` with the policy's
    ``V`` (one tokenizer; ``D_ref`` may differ from ``D``), ref_bias ``(V,)`` or ``None``; the policy's
    dtype and device throughout (the fused kernels read both models in one pass).
    """
    check_projection(ref_hidden, ref_weight, ref_bias, names=REF_NAMES)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"ref_weight must have the policy's vocabulary size V={weight.shape[0]} as its first dimension; "
            f"got ref_weight {tuple(ref_weight.shape)} and weight {tuple(weight.shape)}"
        )
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"ref_hidden's leading shape {tuple(ref_hidden.shape[:-1])} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} (one reference hidden state per token)"
        )
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(
            f"ref_hidden dtype {ref_hidden.dtype} must match hidden dtype {hidden.dtype}; cast the reference's "
            "hidden states, weight and bias to the policy's dtype"
        )
    check_same_device(hidden=hidden, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)


def check_backend_name(backend: object) -> None:
    """``backend`` is one of the names :func:`pygpo.ops.dispatch.resolve_backend` takes (whether it can run
    here is decided per call, on the tensors' device)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def label_counts(labels: Tensor, vocab: int, *, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(valid, bad)``: 0-d int64 device tensors counting the labels that are not ``ignore_index``, and
    those of them outside ``[0, vocab)``. No host sync: the caller reads them together with any other
    device scalars it needs (:func:`host_ints`), then calls :func:`raise_label_range` when ``bad > 0``."""
    ignore_index = check_ignore_index(ignore_index)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    return valid.sum(dtype=torch.int64), bad.sum(dtype=torch.int64)


def host_ints(*values: Tensor) -> list[int]:
    """The elements of the integer tensors ``values`` (flattened, in order) as Python ints, read with one
    device -> host copy: one host sync however many values."""
    return torch.cat([v.reshape(-1).to(torch.int64) for v in values]).tolist()


def raise_label_range(labels: Tensor, vocab: int, *, ignore_index: int) -> None:
    """Raise the ``ValueError`` of a label outside ``[0, vocab)`` (the error path: it reads the data)."""
    valid = labels != ignore_index
    lo, hi = int(labels[valid].min()), int(labels[valid].max())
    raise ValueError(
        f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {lo if lo < 0 else hi}"
    )


def check_label_range(labels: Tensor, vocab: int, *, ignore_index: int) -> int:
    """Every label lies in ``[0, vocab)`` or equals ``ignore_index``; returns the number of valid labels.

    One fused reduction and one host sync per call on a GPU (the count comes with it, so callers that
    compact the valid rows need no second read); none when ``labels`` were copied from host labels by
    :func:`pygpo.ops.transfer.to_device`, whose host copy is checked instead."""
    twin = host_twin(labels)
    labels = labels if twin is None else twin
    n_valid, n_bad = host_ints(*label_counts(labels, vocab, ignore_index=ignore_index))
    if n_bad:
        raise_label_range(labels, vocab, ignore_index=ignore_index)
    return n_valid


def check_real(name: str, value: object, *, allow_none: bool = False) -> Optional[float]:
    """``value`` as a float: a real number (``int``, ``float`` or a NumPy scalar; ``None`` with ``allow_none``).

    ``bool`` is refused (``True`` would silently mean 1), and so are strings and tensors: ``float()``
    would accept ``"1"`` and a 0-d tensor, and the latter costs a host sync on a GPU at every call.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    return float(value)


def check_positive(name: str, value: object, *, allow_none: bool = False) -> Optional[float]:
    """``value`` is a finite real number ``> 0`` (or ``None`` with ``allow_none``): an infinite temperature
    or softcap would silently give uniform or nan log-probs. Returns it as a float."""
    number = check_real(name, value, allow_none=allow_none)
    if number is not None and not 0.0 < number < math.inf:  # false for nan too
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_finite(name: str, value: object) -> float:
    """``value`` is a finite real number (a nan or infinite option turns every loss into nan or 0)."""
    number = check_real(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def check_flag(name: str, value: object, *, allow_none: bool = False) -> None:
    """``value`` is a ``bool`` (or ``None`` with ``allow_none``): ``"no"`` would count as true."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_flags(**flags: object) -> None:
    """Every keyword's value is a ``bool`` (:func:`check_flag`, the keyword naming it)."""
    for name, value in flags.items():
        check_flag(name, value)


def check_ignore_index(ignore_index: object) -> int:
    """``ignore_index`` is an int (``None``, a float or a bool would compare against labels wrongly)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int label value (e.g. -100), got {type(ignore_index).__name__} "
                        f"{ignore_index!r}")
    return int(ignore_index)


def check_memory_budget(memory_budget: object) -> None:
    """``memory_budget`` is ``None`` or a positive int number of bytes (not a bool or a float)."""
    if memory_budget is None:
        return
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        raise TypeError(f"memory_budget must be a positive int number of bytes or None, got "
                        f"{type(memory_budget).__name__} {memory_budget!r}")
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive int number of bytes or None, got {memory_budget!r}")
