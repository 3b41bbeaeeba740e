"""Torch backends of :func:`pygpo.prefix.prefix_attention`: per-span SDPA, and a dense-mask reference.

Both call ``torch.nn.functional.scaled_dot_product_attention`` with *boolean* masks (a float mask of
another dtype than the query silently gives wrong values on CPU in torch 2.13).

* :func:`span_prefix_attention` (the ``torch`` backend): one SDPA per span of the layout
  (:meth:`PrefixLayout.spans`). A prompt with its first response is a plain causal span
  (``is_causal=True``); every later response ``i`` attends to ``[prompt | response_i]``, gathered
  into one key block of ``P + R_i`` keys with the mask ``[ones(R_i, P) | tril(R_i, R_i)]``; padding
  returns its own value vector (it sees only itself). The work is that of the unshared sequences minus
  the prompt's repeats, the saving of prefix sharing ("Accelerating Direct Preference Optimization
  with Prefix Sharing", Wang & Hegde, 2024), with no padding or cross-response work. One Python loop
  iteration per span and layer: right for CPU and moderate batch sizes.
* :func:`dense_prefix_attention`: SDPA over whole rows with the ``(B, 1, S, S)`` mask of
  :meth:`PrefixLayout.dense_mask`; ``O(B S^2)`` work and memory. The reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import PrefixLayout


def _expand_kv(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    group = heads // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return k, v


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, sinks: Optional[Tensor], *,
            mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """SDPA with a boolean ``mask`` (or ``is_causal``); with ``sinks`` ``(H,)``, the explicit softmax with
    one extra logit per head in the denominator (a sink: a key of zero value), which SDPA cannot take.
    A floating ``mask`` is added to the scores (with sinks only)."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    if is_causal:  # aligned bottom-right: the queries are the last of the keys
        q_len, kv_len = q.shape[-2], k.shape[-2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is None:
        pass
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.to(scores.dtype)
    # the softmax in float32 for 16-bit inputs, with the sinks unrounded (models keep them in float32)
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    sink = sinks.to(acc).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores.to(acc), sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


def sink_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, *, scale: float,
                   mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """``(B, Hq, Lq, d)`` attention with one sink logit per query head (``sinks (Hq,)``) over
    ``k, v (B, Hkv, Lk, d)`` (grouped-query heads expanded): ``softmax([scale q k^T + mask, sinks])`` with the
    sink's column dropped, times ``v``. ``mask``: boolean (True = visible) or additive, broadcastable to
    ``(B, Hq, Lq, Lk)``; ``is_causal``: causal with the queries aligned to the last keys."""
    k, v = _expand_kv(k, v, q.shape[1])
    return _attend(q, k, v, scale, sinks, mask=mask, is_causal=is_causal)


def dense_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PrefixLayout, scale: float,
                           sliding_window: Optional[int] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """``(B, Hq, S, d)``: SDPA with the layout's dense boolean mask (grouped-query heads expanded)."""
    k, v = _expand_kv(k, v, q.shape[1])
    return _attend(q, k, v, scale, sinks, mask=layout.dense_mask(q.device, sliding_window=sliding_window))


def _window_mask(q_pos: Tensor, k_pos: Tensor, window: Optional[int]) -> Tensor:
    """``(len(q_pos), len(k_pos))`` bool: causal in positions, within the last ``window`` positions."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) if window is None else (diff >= 0) & (diff < window)


def span_prefix_attention(q: Tensor, k: Tensor, v: Tensor, layout: PrefixLayout, scale: float,
                          sliding_window: Optional[int] = None, sinks: Optional[Tensor] = None) -> Tensor:
    """``(B, Hq, S, d)``: one SDPA per span (see module docstring); differentiable through autograd.

    With ``sliding_window = W`` a query at position ``p`` sees the keys at positions ``p - W + 1 .. p``
    (positions, not row offsets: a later response restarts at its prompt length), so a branch reads
    only the prompt's last keys it can reach. ``sinks`` ``(Hq,)``: one sink logit per query head (see
    :func:`_attend`); spans then run as explicit softmaxes.

    Rows and spans are cut with ``split`` (whose backward concatenates the gradients once) rather than
    slicing (whose backward writes each piece into a fresh full-size zero tensor).
    """
    k, v = _expand_kv(k, v, q.shape[1])
    rows = []
    for spans, qb, kb, vb in zip(layout.spans(), q.split(1), k.split(1), v.split(1)):
        lens = [e - s for _, s, e, _, _ in spans]
        qs, ks, vs = qb.split(lens, dim=2), kb.split(lens, dim=2), vb.split(lens, dim=2)
        piece_at = {s: i for i, (_, s, _, _, _) in enumerate(spans)}
        pieces = []
        for i, (kind, s, e, ps, pe) in enumerate(spans):
            if kind == "causal" and (sliding_window is None or e - s <= sliding_window):
                pieces.append(_attend(qs[i], ks[i], vs[i], scale, sinks, is_causal=True))
            elif kind == "causal":
                pos = torch.arange(e - s, device=q.device)
                pieces.append(_attend(qs[i], ks[i], vs[i], scale, sinks, mask=_window_mask(pos, pos, sliding_window)))
            elif kind == "branch":
                c = piece_at[ps]  # the causal span that starts with this response's prompt
                p, r = pe - ps, e - s
                first = 0 if sliding_window is None else max(0, p + 1 - sliding_window)  # prompt keys in reach
                keys = torch.cat([ks[c][:, :, first:p], ks[i]], dim=2)
                values = torch.cat([vs[c][:, :, first:p], vs[i]], dim=2)
                k_pos = torch.arange(first, p + r, device=q.device)
                mask = _window_mask(torch.arange(p, p + r, device=q.device), k_pos, sliding_window)
                pieces.append(_attend(qs[i], keys, values, scale, sinks, mask=mask))
            elif sinks is not None:  # padding attends only to itself (and the sink)
                eye = torch.eye(e - s, dtype=torch.bool, device=q.device)
                pieces.append(_attend(qs[i], ks[i], vs[i], scale, sinks, mask=eye))
            else:  # padding attends only to itself: softmax over one key is 1
                pieces.append(vs[i])
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
