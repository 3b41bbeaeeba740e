"""triton backend: fused policy + reference log-probs and per-token KL (see ``pygpo.ops.policy_ref_stats``).

The forward (``pygpo.kernels.policy_ref_fwd``) computes both models' logit tiles in on-chip memory and
folds them into online statistics, so neither ``M x V`` matrix exists in global memory. The backward
(``pygpo.kernels.policy_ref_bwd``) recomputes the policy tile, and the reference tile when the KL has
an upstream gradient, and produces dH, dW, db either through a ``dRaw`` buffer and plain matmuls
(``deterministic=True``, the public default) or fused with fp32 atomics (``deterministic=False``). The reference never receives a
gradient. On request the forward also returns the policy's entropy and mean logit (metrics, not
differentiable, compiled out of the kernel when not requested).

This module imports triton at its top; only the dispatcher imports it, on demand.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pygpo.kernels.policy_ref_bwd import policy_ref_bwd
from pygpo.kernels.policy_ref_fwd import policy_ref_fwd

from ..autocast import autocast_off
from ..first_order import first_order_only
from ..policy_ref_stats import PolicyRefStats
from ..token_stats import StatRequest
from .triton_device import check_triton_device


class TritonPolicyRef(torch.autograd.Function):
    """``(M, D), (V, D), (V,)?, (M, D_ref), (V, D_ref), (V,)?, (M,) -> logprobs, ref_logprobs, kl, entropy,
    mean_logit`` (each ``(M,)``; the last two ``None`` unless requested, and never differentiable)."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, req: StatRequest,
                memory_budget, deterministic):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None and costs nothing
        out = policy_ref_fwd(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
                             temperature=req.temperature, softcap=req.softcap, entropy=req.entropy,
                             mean_logit=req.mean_logit)
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, out.lse, out.ref_lse)
        ctx.req, ctx.memory_budget, ctx.deterministic = req, memory_budget, deterministic
        ctx.mark_non_differentiable(*(x for x in (out.ref_logprobs, out.entropy, out.mean_logit) if x is not None))
        return out.logprobs, out.ref_logprobs, out.kl, out.entropy, out.mean_logit

    @staticmethod
    @first_order_only
    @autocast_off
    def backward(ctx, g_lp, g_ref, g_kl, g_ent, g_mz):
        del g_ref, g_ent, g_mz  # ref_logprobs and the metrics are marked non-differentiable
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_h, d_w, d_b = policy_ref_bwd(
            hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, ref_lse,
            g_logprobs=g_lp, g_kl=g_kl, temperature=ctx.req.temperature, softcap=ctx.req.softcap,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b,
            deterministic=ctx.deterministic, memory_budget=ctx.memory_budget,
        )
        return (d_h, d_w, d_b) + (None,) * 7


def compute_policy_ref(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Optional[Tensor],
    labels: Tensor,
    req: StatRequest,
    *,
    memory_budget: Optional[int] = None,
    deterministic: bool = False,
) -> PolicyRefStats:
    """Backend entry point (same contract as ``torch_policy_ref.compute_policy_ref``).

    Args:
        hidden: ``(M, D)`` valid rows only, fp32/fp16/bf16, on CUDA (or CPU under ``TRITON_INTERPRET=1``);
            weight ``(V, D)``, bias ``(V,)`` or ``None``, same dtype and device.
        ref_hidden: ``(M, D_ref)``; ref_weight ``(V, D_ref)``; ref_bias ``(V,)`` or ``None`` (never
            differentiated).
        labels: ``(M,)`` int64 in ``[0, V)``.
        req: ``temperature``, ``softcap``, and ``entropy`` / ``mean_logit`` (the policy's metrics to add;
            ``log_sum_p2`` is not read).
        memory_budget: bytes for the deterministic backward's ``rows x V`` dRaw buffer.
        deterministic: backward without atomics (bitwise reproducible).
    """
    check_triton_device(hidden)
    out = TritonPolicyRef.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, req,
                                memory_budget, deterministic)
    return PolicyRefStats(*out)
