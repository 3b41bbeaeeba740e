"""The reference of a fused preference loss in its three forms, and per-token inputs laid out per response.

A caller gives the reference model's scores as exactly one of

* ``ref_hidden`` + ``ref_weight`` (+ ``ref_bias``): final hidden states, scored under ``no_grad`` in the
  fused pass beside the policy (the only form that gives the token KL over the vocabulary);
* ``ref_logps``: cached ``(B, K)`` per-response sums of token log-probs;
* ``ref_token_logps``: cached per-token log-probs, of the labels' shape or ``(B, K, T)``.

:func:`resolve_reference` checks the choice against the loss before any kernel runs; the other helpers
turn each form into the per-token ``(B, K, T)`` or per-response ``(B, K)`` scores the reducer needs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops.validation import REF_NAMES, check_projection, check_reference_inputs, check_same_device
from .layout import ResponseLayout

#: Reducers whose reference scores can come from per-response sums (``mean`` divides them by the lengths).
SEQUENCE_REF_REDUCERS = ("sum", "mean")


class ReferenceInputError(ValueError):
    """The reference was given in several forms at once, or in a form this loss cannot use."""


class Reference(NamedTuple):
    """The reference in one of its forms: ``"hidden"`` (h, W, b), ``"sequence"`` or ``"tokens"`` (cached values)."""

    kind: str
    hidden: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    values: Optional[Tensor] = None


def upcast(x: Tensor) -> Tensor:
    """Scores in float32 at least (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def resolve_reference(ref_hidden: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
                      ref_logps: Optional[Tensor], ref_token_logps: Optional[Tensor], *, layout: ResponseLayout,
                      hidden: Tensor, weight: Tensor, labels_shape, loss: object, use: str, needs_kl: bool,
                      reducer: str) -> Optional[Reference]:
    """The reference form the caller gave, checked against the loss, or ``None`` without one.

    ``use`` is the loss's need for a reference (``"required"``, ``"optional"``, ``"none"``), ``needs_kl``
    whether it needs the token KL (then only hidden states will do); ``loss`` names it in errors.
    """
    given = [name for name, v in (("ref_hidden", ref_hidden), ("ref_logps", ref_logps),
                                  ("ref_token_logps", ref_token_logps)) if v is not None]
    if len(given) > 1:
        raise ReferenceInputError(f"the reference is given in several forms at once ({', '.join(given)}); give exactly one")
    if (ref_weight is not None or ref_bias is not None) and ref_hidden is None:
        raise ReferenceInputError("ref_weight/ref_bias were given without ref_hidden")
    if not given:
        if use == "required":
            raise ReferenceInputError(
                f"loss {loss!r} needs a reference: ref_hidden + ref_weight, ref_logps (B, K) or ref_token_logps"
            )
        return None
    if use == "none" and not (needs_kl and ref_hidden is not None):
        raise ReferenceInputError(f"loss {loss!r} is reference-free; drop {given[0]}")
    if ref_hidden is not None:
        if ref_weight is None:
            raise ReferenceInputError("ref_hidden needs ref_weight (the reference model's lm_head weight)")
        check_reference_projection(ref_hidden, ref_weight, ref_bias, hidden, weight, one_pass=needs_kl)
        return Reference("hidden", ref_hidden, ref_weight, ref_bias)
    if needs_kl:
        raise ReferenceInputError(
            f"loss {loss!r} needs the token KL over the vocabulary, so the reference must be given as "
            "ref_hidden + ref_weight, not as cached log-probs"
        )
    shape = (layout.batch_size, layout.responses_per_example)
    if ref_logps is not None:
        if reducer not in SEQUENCE_REF_REDUCERS:
            raise ReferenceInputError(
                f"reducer {reducer!r} needs per-token reference log-probs (ref_token_logps or ref_hidden); "
                "ref_logps holds per-response sums"
            )
        if ref_logps.dim() == 1 and shape[1] == 1:
            ref_logps = ref_logps[:, None]
        if tuple(ref_logps.shape) != shape:
            raise ReferenceInputError(f"ref_logps must have shape {shape} (examples, responses), got {tuple(ref_logps.shape)}")
        return Reference("sequence", values=upcast(ref_logps.detach()))
    # the shape is checked here, before any kernel runs
    per_token("ref_token_logps", ref_token_logps, layout, labels_shape, error=ReferenceInputError, check_only=True)
    return Reference("tokens", values=ref_token_logps.detach())


def per_token(name: str, values: Tensor, layout: ResponseLayout, labels_shape, *, error: type = ValueError,
              check_only: bool = False) -> Optional[Tensor]:
    """``(B, K, T)`` from per-token values of exactly the labels' shape or exactly ``(B, K, T)`` (any
    other shape raises, even with the same number of elements: the layouts differ)."""
    dense_shape = (layout.batch_size, layout.responses_per_example, layout.max_length)
    shape = tuple(values.shape) if isinstance(values, Tensor) else None
    if shape not in (tuple(labels_shape), dense_shape):
        got = f"shape {shape}" if shape is not None else f"a {type(values).__name__}"
        raise error(f"{name} must have the labels' shape {tuple(labels_shape)} or {dense_shape} (examples, "
                    f"responses, longest response) in completion-token order, got {got}")
    if check_only:
        return None
    if shape == tuple(labels_shape):
        return layout.dense(layout.valid(values))
    return values


def reference_tokens(ref: Optional[Reference], ref_logps: Optional[Tensor], layout: ResponseLayout,
                     labels_shape) -> Optional[Tensor]:
    """Per-token ``(B, K, T)`` reference log-probs (0 past each response), or ``None`` where the reference
    is absent or cached as sums; ``ref_logps`` are the fused pass's per-token reference scores."""
    if ref is None or ref.kind == "sequence":
        return None
    if ref.kind == "hidden":
        return layout.dense(ref_logps)
    values = upcast(per_token("ref_token_logps", ref.values, layout, labels_shape, error=ReferenceInputError))
    return torch.where(layout.mask.to(values.device), values, torch.zeros((), dtype=values.dtype))


def cached_sequence(ref: Reference, layout: ResponseLayout, reducer: str) -> Tensor:
    """``(B, K)`` reference scores from cached per-response sums (the ``mean`` reducer divides them)."""
    ref_seq = ref.values
    if reducer == "mean":
        ref_seq = ref_seq / layout.lengths.to(ref_seq.device).clamp(min=1).to(ref_seq.dtype)
    return ref_seq


def check_reference_projection(ref_hidden: Tensor, ref_weight: Tensor, ref_bias: Optional[Tensor], hidden: Tensor,
                               weight: Tensor, *, one_pass: bool) -> None:
    """The reference scores the same labels over the same vocabulary, checked before any pass runs and
    named ``ref_*``: ref_hidden ``(..., D_ref)`` floating point with hidden's leading shape, ref_weight
    ``(V, D_ref)`` and ref_bias ``(V,)`` (or ``None``) of ref_hidden's dtype, all on hidden's device (the
    policy's labels index both passes). ``one_pass``: the token-KL pass reads both models together
    (:func:`pygpo.fused_linear_kl`), so the reference must also have the policy's dtype; otherwise it is
    scored in a pass of its own, in its own dtype."""
    if not isinstance(ref_hidden, Tensor) or not isinstance(ref_weight, Tensor):
        raise ReferenceInputError("ref_hidden and ref_weight must be torch.Tensors")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]) or ref_hidden.dim() != hidden.dim():
        raise ReferenceInputError(
            f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])} (one row per policy row), "
            f"got {tuple(ref_hidden.shape)}"
        )
    if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
        raise ReferenceInputError(
            f"ref_weight must be (V, D_ref) with the policy's vocabulary size V={weight.shape[0]} (the same labels "
            f"are scored by both models), got {tuple(ref_weight.shape)}"
        )
    if ref_weight.shape[1] != ref_hidden.shape[-1]:
        raise ReferenceInputError(
            f"ref_weight's hidden size {ref_weight.shape[1]} must match ref_hidden's last dimension {ref_hidden.shape[-1]}"
        )
    if one_pass:
        check_reference_inputs(ref_hidden, ref_weight, ref_bias, hidden=hidden, weight=weight)
        return
    check_projection(ref_hidden, ref_weight, ref_bias, names=REF_NAMES)
    check_same_device(hidden=hidden, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
