"""triton backend: fused Triton kernels for linear -> token statistics (see ``pygpo.ops.token_stats``).

The forward (``pygpo.kernels.linear_logprob_fwd``) computes ``hidden @ W.T`` tile by tile in on-chip
memory and folds each tile into online softmax statistics, so the ``M x V`` logits never exist in
global memory. The backward (``pygpo.kernels.linear_logprob_bwd``) recomputes the tiles and produces
dH, dW, db either by writing ``dRaw`` for chunks of rows and running plain matmuls (``deterministic=True``,
the public default: bitwise reproducible and the faster of the two on an H100) or fused with fp32
atomics (``deterministic=False``: no ``dRaw`` buffer).

This module imports triton at its top; only the dispatcher imports it, on demand.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pygpo.kernels import linear_logprob_bwd, linear_logprob_fwd

from ..autocast import autocast_off
from ..first_order import first_order_only
from ..token_stats import StatRequest, TokenStats
from .triton_device import check_triton_device


class TritonFusedTokenStats(torch.autograd.Function):
    """Autograd function over the valid rows: ``(M, D), (V, D), (V,)?, (M,) -> TokenStats`` fields."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, labels, req: StatRequest, memory_budget, deterministic):
        ctx.set_materialize_grads(False)  # absent upstream gradients arrive as None and cost nothing
        stats = linear_logprob_fwd(
            hidden, weight, bias, labels,
            temperature=req.temperature, softcap=req.softcap,
            entropy=req.entropy, log_sum_p2=req.log_sum_p2, mean_logit=req.mean_logit, top1=req.top1,
        )
        ctx.save_for_backward(hidden, weight, bias, labels, stats.lse, stats.entropy, stats.log_sum_p2)
        ctx.req, ctx.memory_budget, ctx.deterministic = req, memory_budget, deterministic
        if stats.is_top1 is not None:
            ctx.mark_non_differentiable(stats.is_top1)
        return tuple(stats)

    @staticmethod
    @first_order_only
    @autocast_off
    def backward(ctx, g_lp, g_lse, g_ent, g_l2, g_mz, _g_top1=None):
        hidden, weight, bias, labels, lse, entropy, log_sum_p2 = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_h, d_w, d_b = linear_logprob_bwd(
            hidden, weight, bias, labels, lse,
            g_logprobs=g_lp, g_lse=g_lse, g_entropy=g_ent, entropy=entropy,
            g_log_sum_p2=g_l2, log_sum_p2=log_sum_p2, g_mean_logit=g_mz,
            temperature=ctx.req.temperature, softcap=ctx.req.softcap,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b,
            deterministic=ctx.deterministic, memory_budget=ctx.memory_budget,
        )
        return d_h, d_w, d_b, None, None, None, None


def compute_token_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    req: StatRequest,
    *,
    memory_budget: Optional[int] = None,
    deterministic: bool = False,
) -> TokenStats:
    """Backend entry point (same contract as ``torch_chunked.compute_token_stats``).

    Args:
        hidden: ``(M, D)`` valid rows only, fp32/fp16/bf16, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        weight: ``(V, D)``, same dtype and device. bias: ``(V,)`` or ``None``.
        labels: ``(M,)`` int64 in ``[0, V)``.
        req: which optional statistics, temperature and softcap.
        memory_budget: bytes for the deterministic backward's ``rows x V`` dRaw buffer.
        deterministic: backward without atomics (bitwise reproducible); default is the fused,
            atomic backward.

    Returns:
        ``TokenStats`` of ``(M,)`` float32 tensors, ``None`` for statistics not requested.
    """
    check_triton_device(hidden)
    out = TritonFusedTokenStats.apply(hidden, weight, bias, labels, req, memory_budget, deterministic)
    return TokenStats(*out)
