"""Shared front half of the fused ops: validate, compact the valid rows, dispatch, scatter back.

Rows whose label is ``ignore_index`` are removed before any backend runs, so they cost no matmul
work; their outputs are 0.0 and they receive zero gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .dispatch import load_backend, resolve_backend
from .token_stats import StatRequest, TokenStats
from .validation import check_linear_inputs, check_memory_budget, check_positive


class ValidRowStats(NamedTuple):
    """Statistics of the valid rows and where they belong in the flattened input."""

    stats: TokenStats  # each (M,) float32 or None
    index: Tensor  # (M,) int64 positions in the flattened (N,) input
    num_rows: int  # N
    shape: torch.Size  # labels' shape


class _EmptyStats(torch.autograd.Function):
    """Stats of zero rows, still attached to the graph so every input gets a zero gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, req: StatRequest):
        ctx.save_for_backward(hidden, weight, bias)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        flags = (True, True, req.entropy, req.log_sum_p2, req.mean_logit)
        return tuple(empty.clone() if f else None for f in flags)

    @staticmethod
    def backward(ctx, *grads):
        return tuple(None if t is None else torch.zeros_like(t) for t in ctx.saved_tensors) + (None,)


def valid_row_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    *,
    ignore_index: int,
    req: StatRequest,
    backend: str,
    memory_budget: Optional[int],
    deterministic: Optional[bool],
) -> ValidRowStats:
    check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    check_positive("temperature", req.temperature)
    check_positive("softcap", req.softcap, allow_none=True)
    check_memory_budget(memory_budget)
    name = resolve_backend(backend, hidden.device)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()

    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    index = (flat_y != ignore_index).nonzero()[:, 0]
    h = flat_h.index_select(0, index)  # differentiable gather: ignored rows get zero gradient
    y = flat_y.index_select(0, index).long()
    if index.numel() == 0:
        stats = TokenStats(*_EmptyStats.apply(h, weight, bias, req))
    else:
        impl = load_backend(name)
        stats = impl.compute_token_stats(
            h.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), y, req,
            memory_budget=memory_budget, deterministic=bool(deterministic),
        )
    return ValidRowStats(stats, index, flat_y.numel(), labels.shape)


def scatter_rows(values: Tensor, rows: ValidRowStats) -> Tensor:
    """Place per-valid-row ``values`` (M,) into a zero float32 tensor of the labels' shape."""
    out = values.new_zeros(rows.num_rows).index_put((rows.index,), values)
    return out.reshape(rows.shape)
