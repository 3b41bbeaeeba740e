"""Backward of the fused policy + reference forward: recompute both logit tiles, form ``dRaw``, produce dH, dW, db.

Only the policy is differentiated; the reference is a constant. With ``p = exp(z - lse)`` (policy),
``q = exp(zr - lse_r)`` (reference) and upstream gradients ``g_lp`` (log-prob) and ``g_kl`` (KL):

    dz_v = g_lp (1[v = y] - p_v) + g_kl (p_v - q_v) = p_v a - g_kl q_v + g_lp 1[v = y],   a = g_kl - g_lp

and through the transform ``dRaw = dz / temperature * (1 - tanh^2(raw / softcap))``; then
``dH = dRaw @ W``, ``dW = dRaw^T @ H``, ``db = sum_rows dRaw``. The reference tile is recomputed only
when the KL has an upstream gradient (``q`` appears nowhere else).

Program ``(row block, vocabulary block)``, in the two modes of ``linear_logprob_bwd``: fused with
fp32 atomics (default), or ``deterministic``, writing ``dRaw`` for chunks of rows within a memory
budget and running plain matmuls (bitwise reproducible). The hand-off of the ``dRaw`` tile is
``logit_tile.accumulate_draw_tile``, the launcher's side of the two modes ``draw_grads.draw_grads``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .draw_grads import draw_flags, draw_grads, zero_grads
from .logit_tile import accumulate_draw_tile, backward_tile, draw_from_dz, transformed_logit_tile
from .utils import autotune, logit_dot_options, transform_args


# reset_to_zero: the autotuner launches the kernel once per candidate config, and the atomic mode
# accumulates into DH/DW/DB; the buffers are zeroed before each trial and after the last.
@autotune(key=["V", "D", "D_REF", "WRITE_DRAW", "NEED_DH", "NEED_DW", "HAS_KL"],
           reset_to_zero=["DH", "DW", "DB"])
@triton.jit
def policy_ref_bwd_kernel(
    H, W, B, HR, WR, BR, Y,
    LSE, LSE_R, A, GKL, GLP,           # per-row fp32 values (module docstring)
    DH, DW, DB, DRAW,                   # outputs, by mode (unused ones point at scratch)
    N, V, D, D_REF,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_KL: tl.constexpr, HAS_LP: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, WRITE_DRAW: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(pid_n, pid_v)``: rows ``[pid_n*BLOCK_N, +BLOCK_N)`` x vocabulary ``[pid_v*BLOCK_V, +BLOCK_V)``.

    Buffers as in ``accumulate_draw_tile``: atomic mode ``DH (N, D)``, ``DW (V, D)``, ``DB (V,)`` fp32;
    write mode ``DRAW (N, V)`` in the input dtype and ``DB (row blocks, V)`` fp32.
    """
    pid_n, rows, cols, row_mask, col_mask = backward_tile(N, V, BLOCK_N, BLOCK_V)

    # 1. The policy tile exactly as the forward computed it, and p * a.
    z, th = transformed_logit_tile(
        H, W, B, rows, cols, row_mask, col_mask, D,
        stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_temp,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    dz = tl.exp(z - lse[:, None]) * tl.load(A + rows, mask=row_mask, other=0.0)[:, None]

    # 2. The reference tile (constant), only for the KL's -g_kl q term.
    if HAS_KL:
        zr, _thr = transformed_logit_tile(
            HR, WR, BR, rows, cols, row_mask, col_mask, D_REF,
            stride_rhn, stride_rhd, stride_rwv, stride_rwd, softcap, inv_temp,
            HAS_REF_BIAS, HAS_SOFTCAP, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        lse_r = tl.load(LSE_R + rows, mask=row_mask, other=0.0)
        g_kl = tl.load(GKL + rows, mask=row_mask, other=0.0)
        dz -= g_kl[:, None] * tl.exp(zr - lse_r[:, None])

    # 3. The label term, then back through the temperature and the softcap; zero on padding.
    draw = draw_from_dz(dz, th, Y, GLP, rows, cols, row_mask, col_mask, inv_temp, HAS_LP, HAS_SOFTCAP)

    # 4. Into dH, dW, db (atomics) or into the dRaw buffer (deterministic).
    accumulate_draw_tile(
        draw, H, W, DH, DW, DB, DRAW, pid_n, rows, cols, row_mask, col_mask, V, D,
        stride_hn, stride_hd, stride_wv, stride_wd,
        NEED_DH, NEED_DW, NEED_DB, WRITE_DRAW, UPCAST, INPUT_PRECISION, BLOCK_D,
    )


def policy_ref_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    ref_lse: Tensor,
    *,
    g_logprobs: Optional[Tensor] = None,
    g_kl: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    deterministic: bool = False,
    memory_budget: Optional[int] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(dH, dW, db)`` of the policy, each in its input's dtype or ``None``.

    Args:
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature, softcap: exactly
            as given to ``policy_ref_fwd``.
        lse, ref_lse: ``(N,)`` fp32 log-sum-exps of both models from the forward.
        g_logprobs, g_kl: ``(N,)`` upstream gradients of the log-probs and the KL; ``None`` means zero.
        need_*: which gradients to produce (the others are skipped and returned as ``None``).
        deterministic: the "write" mode (no atomics, bitwise reproducible) instead of the fused one.
        memory_budget: bytes for the deterministic mode's ``rows x V`` dRaw buffer (default
            ``draw_grads.DEFAULT_DRAW_BUDGET``); ignored by the fused mode.
    """
    n, d = hidden.shape
    d_ref = ref_hidden.shape[1]
    vocab = weight.shape[0]
    need_bias = need_bias and bias is not None
    if n == 0 or (g_logprobs is None and g_kl is None):
        return zero_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    if not (need_hidden or need_weight or need_bias):
        return None, None, None

    f32 = lambda x: None if x is None else x.detach().float().contiguous()  # noqa: E731
    g_lp, g_kl = f32(g_logprobs), f32(g_kl)
    a = torch.zeros(n, device=hidden.device, dtype=torch.float32)
    if g_kl is not None:
        a += g_kl
    if g_lp is not None:
        a -= g_lp
    per_row = dict(LSE=f32(lse), LSE_R=f32(ref_lse), A=a, GKL=g_kl, GLP=g_lp)
    labels = labels.contiguous()
    bias_c = bias.contiguous() if bias is not None else None  # the kernel reads biases with stride 1
    ref_bias_c = ref_bias.contiguous() if ref_bias is not None else None
    scratch = torch.zeros(1, device=hidden.device, dtype=torch.float32)  # stands in for absent per-row values

    def launch(rows: slice, dh: Tensor, dw: Tensor, db: Tensor, draw: Tensor, write: bool) -> None:
        """Run the kernel on ``hidden[rows]`` against the whole vocabulary (``draw_grads.Launch``)."""
        h, hr = hidden[rows], ref_hidden[rows]
        m = h.shape[0]
        row_args = [per_row[k][rows] if per_row[k] is not None else scratch for k in ("LSE", "LSE_R", "A", "GKL", "GLP")]
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
        policy_ref_bwd_kernel[grid](
            h, weight, bias_c if bias_c is not None else h,
            hr, ref_weight, ref_bias_c if ref_bias_c is not None else hr,
            labels[rows], *row_args,
            dh, dw, db, draw,
            m, vocab, d, d_ref,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            hr.stride(0), hr.stride(1), ref_weight.stride(0), ref_weight.stride(1),
            *transform_args(softcap, temperature),
            HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_KL=g_kl is not None, HAS_LP=g_lp is not None,
            **draw_flags(need_hidden, need_weight, need_bias, write),
            **logit_dot_options(hidden.dtype),
        )

    return draw_grads(launch, hidden, weight, bias, need_hidden=need_hidden, need_weight=need_weight,
                      need_bias=need_bias, deterministic=deterministic, memory_budget=memory_budget)
