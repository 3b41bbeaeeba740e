"""Tile helpers of the chunked torch backends: one tile of logits, its label column, and its backward.

``torch_chunked`` (one model) and ``torch_policy_ref`` (policy and reference) both produce the logits
``z = softcap * tanh((H @ W.T + b) / softcap) / temperature`` one ``rows x vocab`` tile at a time and
turn a tile's ``dz`` into ``dRaw = dz / temperature * (1 - tanh^2)`` and then into dH, dW, db the same
way; one copy of that code keeps the two backends transforming and differentiating identically.

Precision: tiles and accumulators are float32 (float64 for float64 inputs, so that gradcheck can verify
the backends); the tile matmuls run in the input dtype on accelerators (tensor cores, fp32
accumulation) and in the accumulation dtype on CPU.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..matmul_accumulate import add_matmul_
from ..token_stats import LOG_FLOOR, StatRequest

#: ``(dH, dW, db)``, each ``None`` where not needed.
Grads = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def acc_dtype(x: Tensor) -> torch.dtype:
    """float32 accumulation, or float64 for float64 inputs (so gradcheck can verify the backends)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def matmul_dtype(x: Tensor) -> torch.dtype:
    """Dtype the tile matmuls run in: the input's on accelerators (tensor cores, fp32 accumulation),
    the accumulation dtype on CPU, where half-precision matmuls are slow and round their output."""
    return x.dtype if x.device.type != "cpu" else acc_dtype(x)


def finite_max(m: Tensor) -> Tensor:
    """Row maxima with ``-inf`` (rows whose logits so far are all ``-inf``: a masked vocabulary) raised to
    the lowest finite value, so that ``z - m`` is ``-inf`` there and never ``-inf - (-inf)`` (nan)."""
    return m.clamp_min(torch.finfo(m.dtype).min)


def floor_log(x: Tensor) -> Tensor:
    """``max(x, LOG_FLOOR)`` of a tile of ``z - max`` or ``log p``, a new tensor: the factor of ``p log p``
    terms, where ``p == 0`` exactly below the floor (``pygpo.ops.token_stats``), so ``0 * log 0`` gives 0."""
    return x.clamp_min(LOG_FLOOR)


def backward_possible(*tensors: Optional[Tensor]) -> bool:
    """Whether a backward can follow a call on ``tensors``: grad mode on and one of them requires grad.
    (Inside ``autograd.Function.forward`` grad mode is always off, so callers ask before ``apply``.)"""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def transform_logits_(z: Tensor, bias: Optional[Tensor], req: StatRequest, *,
                      keep_tanh: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``z <- softcap * tanh((z + b) / softcap) / temperature`` in place (each step only where asked for);
    returns ``(z, tanh(raw / softcap))``, the second ``None`` without a softcap or unless ``keep_tanh``
    (the recomputing backward's ``dz/draw`` needs it; kept logits give it back as ``z T / softcap``)."""
    if bias is not None:
        z += bias.to(z.dtype)
    tanh = None
    if req.softcap is not None:
        if keep_tanh:
            tanh = torch.tanh(z.div_(req.softcap))
            z.copy_(tanh).mul_(req.softcap)
        else:
            z.div_(req.softcap).tanh_().mul_(req.softcap)
    if req.temperature != 1.0:
        z.div_(req.temperature)
    return z, tanh


def tile_logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], cols: slice,
                req: StatRequest) -> tuple[Tensor, Optional[Tensor]]:
    """Accumulation-precision logits ``z`` of rows ``h`` against vocabulary entries ``cols``, and
    ``tanh(raw / softcap)`` with a softcap (``None`` without; the backward's ``dz/draw`` needs it)."""
    z = torch.mm(h.to(matmul_dtype(h)), weight[cols].to(matmul_dtype(h)).t()).to(acc_dtype(h))
    return transform_logits_(z, None if bias is None else bias[cols], req, keep_tanh=True)


def label_logit(z: Tensor, labels: Tensor, v0: int) -> Tensor:
    """``z[i, labels[i] - v0]`` where the label falls in this tile of columns ``[v0, v0 + width)``, else 0."""
    cols = labels - v0
    here = (cols >= 0) & (cols < z.shape[1])
    return torch.where(here, z.gather(1, cols.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)


def add_label_grad(dz: Tensor, labels: Tensor, v0: int, g: Tensor) -> None:
    """``dz[i, labels[i] - v0] += g[i]`` where the label falls in this tile (the log-prob's one-hot term).

    A scatter of ``g`` (0 where the label lies outside the tile) into one column per row: no boolean
    indexing, which would read the mask's size back from the device on every tile."""
    local = labels - v0
    here = (local >= 0) & (local < dz.shape[1])
    cols = local.clamp(0, dz.shape[1] - 1)[:, None]
    dz.scatter_add_(1, cols, torch.where(here, g, 0.0).to(dz.dtype)[:, None])


def grad_accumulators(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_hidden: bool,
                      need_weight: bool, need_bias: bool) -> Grads:
    """Zeroed ``(dH, dW, db)`` in accumulation precision, ``None`` where not needed (or no bias)."""
    acc = dict(device=hidden.device, dtype=acc_dtype(hidden))
    return (torch.zeros(hidden.shape, **acc) if need_hidden else None,
            torch.zeros(weight.shape, **acc) if need_weight else None,
            torch.zeros(weight.shape[0], **acc) if need_bias and bias is not None else None)


def raw_grad_(dz: Tensor, tanh: Optional[Tensor], req: StatRequest) -> Tensor:
    """``dRaw = dz / temperature * (1 - tanh^2)``, in place in ``dz`` (the factor only with a softcap)."""
    if req.temperature != 1.0:
        dz.div_(req.temperature)
    if tanh is not None:
        dz.mul_(1.0 - tanh * tanh)
    return dz


def accumulate_grads(d_raw: Tensor, h: Tensor, weight: Tensor, rows: slice, cols: slice, grads: Grads) -> None:
    """``db[cols] += sum_rows dRaw``, ``dH[rows] += dRaw @ W[cols]``, ``dW[cols] += dRaw^T @ h``
    into the accumulators ``grads = (dH, dW, db)`` (any may be ``None``); ``h = hidden[rows]``."""
    d_h, d_w, d_b = grads
    if d_b is not None:
        d_b[cols] += d_raw.sum(0)
    mm_dtype = matmul_dtype(h)
    d_raw = d_raw.to(mm_dtype)
    if d_h is not None:
        add_matmul_(d_h[rows], d_raw, weight[cols].to(mm_dtype))
    if d_w is not None:
        add_matmul_(d_w[cols], d_raw.t(), h.to(mm_dtype))


def backprop_tile(dz: Tensor, tanh: Optional[Tensor], req: StatRequest, h: Tensor, weight: Tensor,
                  rows: slice, cols: slice, grads: Grads) -> None:
    """Add one tile's gradients to the accumulators ``grads = (dH, dW, db)`` (any may be ``None``).

    ``dz`` is ``d loss / d z`` of the tile of rows ``rows`` (``h = hidden[rows]``) and vocabulary
    entries ``cols``; it becomes ``dRaw`` in place (:func:`raw_grad_`), then :func:`accumulate_grads`.
    """
    accumulate_grads(raw_grad_(dz, tanh, req), h, weight, rows, cols, grads)


def fill_logits_(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], req: StatRequest,
                 rows_per_chunk: int) -> Tensor:
    """Write the whole-vocabulary logits ``z`` of every row of ``hidden`` into ``out`` (``(M, V)``,
    accumulation dtype), with the bias, softcap and temperature applied in place.

    With matmuls in the accumulation dtype (CPU) one matmul writes ``out`` directly; otherwise each
    chunk of ``rows_per_chunk`` rows is multiplied in the input dtype and copied in.
    """
    mm_dtype = matmul_dtype(hidden)
    if mm_dtype == out.dtype:
        torch.mm(hidden.to(mm_dtype), weight.to(mm_dtype).t(), out=out)
    else:
        w = weight.to(mm_dtype).t()
        for r0 in range(0, hidden.shape[0], rows_per_chunk):
            out[r0 : r0 + rows_per_chunk].copy_(torch.mm(hidden[r0 : r0 + rows_per_chunk].to(mm_dtype), w))
    return transform_logits_(out, bias, req, keep_tanh=False)[0]


def cast_grads(grads: Grads, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Grads:
    """The accumulators of :func:`grad_accumulators` in the dtypes of ``hidden``, ``weight``, ``bias``."""
    return tuple(None if g is None else g.to(like.dtype) for g, like in zip(grads, (hidden, weight, bias)))
