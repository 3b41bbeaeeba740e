"""``selective_log_softmax``: gathered log-softmax for callers that already hold the logits."""

from __future__ import annotations

import torch
from torch import Tensor

from .first_order import first_order_only
from .validation import check_ignore_index, check_integer_tensor, check_label_range, check_positive, check_tensor

#: Rows per chunk; bounds the float32 working copy to ROW_CHUNK x V.
ROW_CHUNK = 1024


class _SelectiveLogSoftmax(torch.autograd.Function):
    """``(N, V), (N,) -> (N,)`` float32 (float64 for float64 logits); rows with ``valid == False`` give 0.0 and zero gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, valid: Tensor, temperature: float):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.zeros(logits.shape[0], device=logits.device, dtype=acc)
        lse = torch.zeros_like(out)
        safe = torch.where(valid, labels, 0).long()
        for r0 in range(0, logits.shape[0], ROW_CHUNK):
            rows = slice(r0, r0 + ROW_CHUNK)
            z = logits[rows].to(acc) / temperature
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(1, safe[rows, None])[:, 0] - lse[rows]
        out = torch.where(valid, out, 0.0)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.temperature = temperature
        return out

    @staticmethod
    @first_order_only
    def backward(ctx, grad: Tensor):
        logits, safe, valid, lse = ctx.saved_tensors
        temperature = ctx.temperature
        g = torch.where(valid, grad.to(lse.dtype), 0.0) / temperature
        d_logits = torch.empty_like(logits)
        for r0 in range(0, logits.shape[0], ROW_CHUNK):
            rows = slice(r0, r0 + ROW_CHUNK)
            # d logprob_y / d z_v = 1[v = y] - p_v, times 1 / temperature for d z / d logits
            p = torch.exp(logits[rows].to(lse.dtype) / temperature - lse[rows, None])
            dz = p.mul_(-g[rows, None])
            dz.scatter_add_(1, safe[rows, None], g[rows, None])
            d_logits[rows] = dz
        return d_logits, None, None, None


def selective_log_softmax(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, temperature: float = 1.0
) -> Tensor:
    r"""``log_softmax(logits / temperature)`` gathered at ``labels``.

    .. math:: \mathrm{out}_i = z_{i,y_i} - \log \sum_v e^{z_{i,v}},\quad z = \mathrm{logits} / T

    Shapes: ``logits (..., V)``, ``labels (...)``; returns float32 (float64 for float64 logits) of the labels' shape, 0.0 where
    ``labels == ignore_index``. Works in row chunks, so no float32 copy of the whole logits is made,
    and the backward writes the logits' gradient directly in their dtype.
    """
    check_tensor("logits", logits)
    check_integer_tensor("labels", labels)
    temperature = check_positive("temperature", temperature)
    ignore_index = check_ignore_index(ignore_index)
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension, shape (..., V); got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a vocabulary of V >= 1 entries in their last dimension, got shape "
                         f"{tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits' leading shape {tuple(logits.shape[:-1])}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels on {labels.device} and logits on {logits.device} must share a device")
    vocab = logits.shape[-1]
    check_label_range(labels, vocab, ignore_index=ignore_index)
    valid = labels != ignore_index
    flat = _SelectiveLogSoftmax.apply(
        logits.reshape(-1, vocab), labels.reshape(-1), valid.reshape(-1), temperature
    )
    return flat.reshape(labels.shape)
