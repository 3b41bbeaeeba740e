"""``prefix_attention``: attention under the prefix-sharing mask, with a torch and a Triton backend.

For every batch row ``b``, query head ``h`` (key/value head ``g = h // (Hq / Hkv)``, grouped-query
attention) and query ``q``:

    O[b, h, q] = sum_k softmax_k( scale * <Q[b, h, q], K[b, g, k]> + M_b(q, k) ) V[b, g, k]

with ``M_b(q, k) = 0`` where the layout allows ``q`` to see ``k`` (causal, same document, a response
never sees another response, and, with a sliding window ``W``, ``pos(q) - pos(k) < W``: see
:mod:`pygpo.prefix.layout`) and ``-inf`` elsewhere.

Backends:

* ``torch``: ``scaled_dot_product_attention`` with explicit *boolean* masks, one call per span of the
  layout (a prompt with its first response: causal; each later response: its prompt and itself), so
  no work is spent on padding or across responses (:mod:`pygpo.prefix.torch_attention`, which also
  holds the dense ``(B, 1, S, S)``-mask reference). The CPU default.
* ``triton``: block-sparse FlashAttention-2-style kernels (``pygpo.kernels.prefix_attention_fwd`` /
  ``_bwd``) that visit only the tiles the layout makes visible and mask only boundary tiles. The CUDA
  default; runs on CPU tensors under ``TRITON_INTERPRET=1``.

``backend="auto"`` picks ``triton`` for CUDA tensors when triton is installed, else ``torch``;
``PYGPO_BACKEND`` overrides ``auto``. float64 inputs always run on ``torch`` (``backend="triton"`` refuses them).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..ops.dispatch import resolve_backend
from ..ops.validation import check_positive
from .batch import PrefixBatch
from .layout import PrefixLayout
from .torch_attention import span_prefix_attention

LayoutLike = Union[PrefixLayout, PrefixBatch]

#: CUDA's limit on a launch grid's second axis (``gridDim.y``), where the Triton kernels put B x Hq.
MAX_GRID_Y = 65535

#: Input dtypes of the Triton kernels; ``auto`` (or ``PYGPO_BACKEND=triton``) runs others on the torch backend.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_layout(layout: LayoutLike) -> PrefixLayout:
    """The :class:`PrefixLayout` of ``layout`` (a layout or a :class:`PrefixBatch`)."""
    if isinstance(layout, PrefixBatch):
        return layout.layout
    if isinstance(layout, PrefixLayout):
        return layout
    raise TypeError(f"layout must be a PrefixLayout or a PrefixBatch, got {type(layout).__name__}")


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, layout: PrefixLayout) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument when shapes, dtypes or devices disagree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, S, d), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q (B, Hq, S, d) and k (B, Hkv, S, d) disagree on B, S or d: {tuple(q.shape)} vs {tuple(k.shape)}"
        )
    if q.shape[3] == 0:
        raise ValueError(f"q, k and v must have a head dimension d >= 1, got q {tuple(q.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the key/value heads ({k.shape[1]})"
        )
    layout.check_shape("q", q.shape, 0, 2)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: LayoutLike,
    *,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    sinks: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of ``q`` over ``k, v`` under the prefix-sharing mask of ``layout``.

    Args:
        q: ``(B, Hq, S, d)`` float32, float16 or bfloat16 (float64 too, on the torch backend only).
        k, v: ``(B, Hkv, S, d)`` with ``Hq % Hkv == 0`` (grouped-query attention).
        layout: the :class:`PrefixLayout` (or :class:`PrefixBatch`) that produced the ``(B, S)`` tokens.
        scale: softmax scale, a positive finite real; default ``d ** -0.5``.
        sliding_window: ``W``: a query at position ``p`` also needs ``p - pos(key) < W`` (Mistral, the
            local layers of Gemma 2/3), counted in the layout's positions, so every response sees the
            keys its unshared ``prompt + response`` sequence would. ``None`` (or ``W >= S``, which hides no
            key): no window.
        sinks: ``(Hq,)`` attention-sink logits (GPT-OSS): one extra logit per query head in every
            softmax's denominator, with a zero value vector,
            ``O[q] = sum_k exp(s_qk) V[k] / (exp(sinks[h]) + sum_k exp(s_qk))``; differentiable.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(B, Hq, S, d)`` in ``q.dtype``; differentiable w.r.t. ``q, k, v``. Padding rows attend only to
        themselves.
    """
    layout = as_layout(layout)
    check_attention_inputs(q, k, v, layout)
    sliding_window = layout.effective_window(sliding_window)
    check_sinks(sinks, q)
    scale = q.shape[-1] ** -0.5 if scale is None else check_positive("scale", scale)
    name = resolve_backend(backend, q.device, op="prefix_attention")
    if name == "triton" and q.dtype not in TRITON_DTYPES:
        # The kernels keep the log-sum-exp and Delta in float32 (float64 gradients would silently lose
        # precision) and do not compile for float64 on a GPU: only an explicit request is an error.
        if backend == "triton":
            raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 q, k, v, got {q.dtype}; "
                            "use backend='torch' (or 'auto') for float64")
        name = "torch"
    if name == "triton" and q.shape[0] * q.shape[1] > MAX_GRID_Y:
        # the kernels put batch x heads on the launch grid's second axis, which CUDA caps
        raise ValueError(f"backend='triton' takes at most {MAX_GRID_Y} rows x query heads per call, got "
                         f"{q.shape[0]} x {q.shape[1]}; split the batch, or use backend='torch'")
    if name == "torch":
        return span_prefix_attention(q, k, v, layout, scale, sliding_window, sinks)
    from .triton_attention import triton_prefix_attention

    return triton_prefix_attention(q, k, v, layout, scale, sliding_window=sliding_window, sinks=sinks)


def check_sinks(sinks: Optional[Tensor], q: Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``sinks`` unless it is ``None`` or a floating ``(Hq,)``
    tensor on ``q``'s device."""
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a floating-point torch.Tensor of shape (Hq,), got "
                        f"{type(sinks).__name__ if not isinstance(sinks, Tensor) else sinks.dtype}")
    if tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks must have shape (Hq,) = ({q.shape[1]},), one logit per query head, got "
                         f"{tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device {q.device}, got {sinks.device}")
