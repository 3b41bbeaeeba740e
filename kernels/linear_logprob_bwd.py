"""Backward of the fused linear -> log-prob: recompute each logit tile, form ``dRaw``, produce dH, dW, db.

With ``z`` the transformed logits of the forward (softcap, then temperature), ``p = softmax(z)`` and
``log p = z - lse``, the gradient of the per-row outputs with upstream gradients ``g_lp`` (log-prob),
``g_lse``, ``g_ent`` (entropy), ``g_l2`` (log sum p^2) and ``g_mz`` (mean logit) is

    dz_v = p_v (a + b p_v - g_ent log p_v) + c + g_lp 1[v = y]
    a = g_lse - g_lp - g_ent * entropy - 2 g_l2,    b = 2 g_l2 / sum_v p_v^2,    c = g_mz / V

(``g_lp (1[v=y] - p) + g_lse p - g_ent p (log p + entropy) + 2 g_l2 (p^2/S2 - p) + g_mz / V``
regrouped), and through the transform ``dRaw = dz / temperature * (1 - tanh^2(raw / softcap))``.
Then ``dH = dRaw @ W``, ``dW = dRaw^T @ H``, ``db = sum_rows dRaw``. The per-row ``a, b, c`` are
computed once by the launcher; the kernel needs ``lse`` and these, never the N x V logits.

One kernel, two modes (a ``tl.constexpr``), program ``(row block, vocabulary block)``:

* **atomic** (fused): after forming the ``dRaw`` tile in registers, loop over ``D`` in ``BLOCK_D``
  chunks and ``tl.atomic_add`` ``dRaw @ W_chunk`` into an fp32 dH buffer and ``dRaw^T @ H_chunk``
  into an fp32 dW buffer (plus the column sums into db). One pass, no ``N x V`` memory, but the
  order of fp32 additions varies from run to run, and every element of dH (dW) receives
  ``V / BLOCK_V`` (``N / BLOCK_N``) atomic adds, which grows costly at large vocabularies.
* **write** (deterministic): store the ``dRaw`` tile, in the input dtype, for a chunk of rows, plus
  per-row-block fp32 column sums for db; the launcher then runs two plain matmuls per chunk,
  ``dH_chunk = dRaw @ W`` and ``dW += dRaw^T @ H_chunk`` (fp32 across chunks). Rows are chunked so
  the ``rows x V`` buffer stays within a memory budget (the approach of Liger-Kernel's fused linear
  cross-entropy, with the logit tile recomputed as in Cut Cross-Entropy, Wijmans et al., 2024).

The device side of both modes is ``logit_tile.accumulate_draw_tile``, the launcher side
``draw_grads.draw_grads``; ``policy_ref_bwd`` shares both.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .draw_grads import draw_flags, draw_grads, zero_grads
from .logit_tile import accumulate_draw_tile, backward_tile, draw_from_dz, transformed_logit_tile
from .online_softmax import floor_log
from .utils import autotune, logit_dot_options, transform_args


# reset_to_zero: while the autotuner times candidate configs it launches the kernel repeatedly, and the
# atomic mode accumulates into DH/DW/DB; the buffers are zeroed before each trial and after the last.
@autotune(key=["V", "D", "WRITE_DRAW", "NEED_DH", "NEED_DW"],
           reset_to_zero=["DH", "DW", "DB"])
@triton.jit
def linear_logprob_bwd_kernel(
    H, W, B, Y,
    LSE, A, B2, GENT, GLP, C,          # per-row fp32 coefficients (module docstring)
    DH, DW, DB, DRAW,                   # outputs, by mode (unused ones point at scratch)
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_L2: tl.constexpr, HAS_ENT: tl.constexpr, HAS_LP: tl.constexpr, HAS_MZ: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    WRITE_DRAW: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(pid_n, pid_v)``: rows ``[pid_n*BLOCK_N, +BLOCK_N)`` x vocabulary ``[pid_v*BLOCK_V, +BLOCK_V)``.

    Atomic mode: ``DH (N, D)``, ``DW (V, D)``, ``DB (V,)`` are fp32 contiguous accumulators.
    Write mode: ``DRAW (N, V)`` contiguous in the input dtype, ``DB (row blocks, V)`` fp32 partial sums.
    """
    pid_n, rows, cols, row_mask, col_mask = backward_tile(N, V, BLOCK_N, BLOCK_V)

    # 1. Recompute the logits of the tile exactly as the forward did.
    z, th = transformed_logit_tile(
        H, W, B, rows, cols, row_mask, col_mask, D,
        stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_temp,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )

    # 2. dz from p = exp(z - lse) and the per-row coefficients (the label's g_lp term is added below).
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    coef = tl.load(A + rows, mask=row_mask, other=0.0)[:, None]  # (BLOCK_N, 1), broadcasts below
    if HAS_L2:
        coef = coef + tl.load(B2 + rows, mask=row_mask, other=0.0)[:, None] * p
    if HAS_ENT:
        # log p floored where p == 0 exactly (a -inf logit): 0 * log 0 adds 0, not nan
        coef = coef - tl.load(GENT + rows, mask=row_mask, other=0.0)[:, None] * floor_log(log_p)
    dz = p * coef
    if HAS_MZ:
        dz += tl.load(C + rows, mask=row_mask, other=0.0)[:, None]

    # 3. The label term, then back through the temperature and the softcap; zero on padding.
    draw = draw_from_dz(dz, th, Y, GLP, rows, cols, row_mask, col_mask, inv_temp, HAS_LP, HAS_SOFTCAP)

    # 4. Into dH, dW, db (atomics) or into the dRaw buffer (deterministic).
    accumulate_draw_tile(
        draw, H, W, DH, DW, DB, DRAW, pid_n, rows, cols, row_mask, col_mask, V, D,
        stride_hn, stride_hd, stride_wv, stride_wd,
        NEED_DH, NEED_DW, NEED_DB, WRITE_DRAW, UPCAST, INPUT_PRECISION, BLOCK_D,
    )


def _row_coefficients(
    lse: Tensor,
    vocab: int,
    g_logprobs: Optional[Tensor],
    g_lse: Optional[Tensor],
    g_entropy: Optional[Tensor],
    entropy: Optional[Tensor],
    g_log_sum_p2: Optional[Tensor],
    log_sum_p2: Optional[Tensor],
    g_mean_logit: Optional[Tensor],
) -> dict[str, Optional[Tensor]]:
    """The per-row ``a, b, c`` of the module docstring (fp32, contiguous), plus ``g_ent`` and ``g_lp``."""
    f32 = lambda x: None if x is None else x.detach().float().contiguous()  # noqa: E731
    g_lp, g_lse, g_ent, g_l2, g_mz = map(f32, (g_logprobs, g_lse, g_entropy, g_log_sum_p2, g_mean_logit))
    a = torch.zeros_like(lse, dtype=torch.float32)
    if g_lse is not None:
        a += g_lse
    if g_lp is not None:
        a -= g_lp
    if g_ent is not None:
        if entropy is None:
            raise ValueError("g_entropy needs the entropy of the forward")
        a -= g_ent * entropy.float()
    b = None
    if g_l2 is not None:
        if log_sum_p2 is None:
            raise ValueError("g_log_sum_p2 needs the log_sum_p2 of the forward")
        a -= 2.0 * g_l2
        b = (2.0 * g_l2 * torch.exp(-log_sum_p2.float())).contiguous()
    c = None if g_mz is None else (g_mz / vocab).contiguous()
    return dict(A=a, B2=b, GENT=g_ent, GLP=g_lp, C=c)


def linear_logprob_bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    *,
    g_logprobs: Optional[Tensor] = None,
    g_lse: Optional[Tensor] = None,
    g_entropy: Optional[Tensor] = None,
    entropy: Optional[Tensor] = None,
    g_log_sum_p2: Optional[Tensor] = None,
    log_sum_p2: Optional[Tensor] = None,
    g_mean_logit: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    deterministic: bool = False,
    memory_budget: Optional[int] = None,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(dH, dW, db)`` of the forward's outputs, each in its input's dtype or ``None``.

    Args:
        hidden, weight, bias, labels, temperature, softcap: exactly as given to the forward.
        lse: ``(N,)`` fp32 log-sum-exp from the forward; ``entropy`` and ``log_sum_p2`` likewise,
            needed only with their upstream gradients.
        g_*: ``(N,)`` upstream gradients of each output; ``None`` means zero.
        need_*: which gradients to produce (the others are skipped and returned as ``None``).
        deterministic: the "write" mode (no atomics, bitwise reproducible) instead of the fused one.
        memory_budget: bytes allowed for the deterministic mode's ``rows x V`` dRaw buffer
            (default ``draw_grads.DEFAULT_DRAW_BUDGET``); ignored by the fused mode.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    need_bias = need_bias and bias is not None
    grads = (g_logprobs, g_lse, g_entropy, g_log_sum_p2, g_mean_logit)
    if n == 0 or all(g is None for g in grads):
        return zero_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)
    if not (need_hidden or need_weight or need_bias):
        return None, None, None

    per_row = {"LSE": lse.detach().float().contiguous()}
    per_row.update(_row_coefficients(per_row["LSE"], vocab, g_logprobs, g_lse, g_entropy, entropy,
                                     g_log_sum_p2, log_sum_p2, g_mean_logit))
    labels = labels.contiguous()
    bias_c = bias.contiguous() if bias is not None else None  # the kernel reads it with stride 1
    scratch = torch.zeros(1, device=hidden.device, dtype=torch.float32)  # stands in for absent per-row values

    def launch(rows: slice, dh: Tensor, dw: Tensor, db: Tensor, draw: Tensor, write: bool) -> None:
        """Run the kernel on ``hidden[rows]`` against the whole vocabulary (``draw_grads.Launch``)."""
        h = hidden[rows]
        m = h.shape[0]
        row_args = [per_row[k][rows] if per_row[k] is not None else scratch
                    for k in ("LSE", "A", "B2", "GENT", "GLP", "C")]
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))  # noqa: E731
        linear_logprob_bwd_kernel[grid](
            h, weight, bias_c if bias_c is not None else h, labels[rows],
            *row_args,
            dh, dw, db, draw,
            m, vocab, d,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
            *transform_args(softcap, temperature),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_L2=per_row["B2"] is not None, HAS_ENT=per_row["GENT"] is not None,
            HAS_LP=per_row["GLP"] is not None, HAS_MZ=per_row["C"] is not None,
            **draw_flags(need_hidden, need_weight, need_bias, write),
            **logit_dot_options(hidden.dtype),
        )

    return draw_grads(launch, hidden, weight, bias, need_hidden=need_hidden, need_weight=need_weight,
                      need_bias=need_bias, deterministic=deterministic, memory_budget=memory_budget)
