"""Device functions shared by the forward and backward kernels: one tile of logits, ``tanh``, a backward
program's tile, the tile's ``dRaw`` from its ``dz``, and the hand-off of a ``dRaw`` tile to dH, dW, db.

Both kernels recompute the same ``BLOCK_N x BLOCK_V`` tile of ``raw = H @ W.T + b``; keeping the
code in one place guarantees that the backward differentiates exactly what the forward computed.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """``tanh(x)`` from one exponential, free of overflow for any finite ``x``.

    ``tanh |x| = (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` in ``(0, 1]``; the sign is restored after.
    (Written out because ``tanh`` is not a core ``tl`` function in every Triton we support.)
    """
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def raw_logit_tile(
    H, W, B,
    rows, cols, row_mask, col_mask, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``raw[i, j] = H[rows[i]] . W[cols[j]] + b[cols[j]]`` as an fp32 ``(BLOCK_N, BLOCK_V)`` tile.

    The reduction over ``D`` runs in ``BLOCK_D`` steps with an fp32 accumulator. Out-of-range rows,
    columns and the ragged end of ``D`` load as zeros, so they add nothing to the dot products; the
    callers mask the padded rows and columns of the result themselves.
    """
    # int64 before multiplying by the stride: rows * D and cols * D can pass 2**31.
    h_rows = H + rows.to(tl.int64)[:, None] * stride_hn
    w_rows = W + cols.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # (BLOCK_N, BLOCK_D) @ (BLOCK_D, BLOCK_V); W is stored row-major (V, D), hence the transpose.
        acc = tl.dot(h, tl.trans(w), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def transformed_logit_tile(
    H, W, B,
    rows, cols, row_mask, col_mask, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``(z, th)``: the fp32 tile ``z = softcap * tanh(raw / softcap) * inv_temp`` of :func:`raw_logit_tile`.

    ``th = tanh(raw / softcap)`` is what the backward needs for ``dz/draw``; without a softcap
    ``z = raw * inv_temp`` and ``th`` is ``raw`` (unused). Forward and backward kernels that call this
    one function transform the logits identically.
    """
    raw = raw_logit_tile(
        H, W, B, rows, cols, row_mask, col_mask, D,
        stride_hn, stride_hd, stride_wv, stride_wd,
        HAS_BIAS, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    if HAS_SOFTCAP:
        th = tanh(raw / softcap)
        z = softcap * th * inv_temp
    else:
        th = raw
        z = raw * inv_temp
    return z, th


@triton.jit
def backward_tile(N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(pid_n, rows, cols, row_mask, col_mask)`` of backward program ``(pid_n, pid_v)``: rows
    ``[pid_n * BLOCK_N, +BLOCK_N)`` of ``N`` and vocabulary ``[pid_v * BLOCK_V, +BLOCK_V)`` of ``V``."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    return pid_n, rows, cols, rows < N, cols < V


@triton.jit
def draw_from_dz(
    dz, th, Y, GLP,
    rows, cols, row_mask, col_mask, inv_temp,
    HAS_LP: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    """``dRaw`` of one tile from the kernel's ``dz`` (all of it but the label term), zero on padding.

    Adds ``g_lp 1[v = y]``, the log-prob's one-hot term (every backward kernel has it), then
    goes back through the transform of :func:`transformed_logit_tile`:
    ``dRaw = dz * inv_temp * (1 - th^2)`` with ``th = tanh(raw / softcap)`` (without a softcap the last
    factor is 1). Padded rows and columns, where ``lse`` loaded as 0 and ``p`` may be anything, are
    zeroed so that they add nothing to dH, dW, db.
    """
    if HAS_LP:
        labels = tl.load(Y + rows, mask=row_mask, other=-1)
        g_lp = tl.load(GLP + rows, mask=row_mask, other=0.0)
        dz = dz + tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0)
    draw = dz * inv_temp
    if HAS_SOFTCAP:
        draw = draw * (1.0 - th * th)
    return tl.where(row_mask[:, None] & col_mask[None, :], draw, 0.0)


@triton.jit
def accumulate_draw_tile(
    draw, H, W, DH, DW, DB, DRAW,
    pid_n, rows, cols, row_mask, col_mask, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, WRITE_DRAW: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Hand one fp32 ``(BLOCK_N, BLOCK_V)`` tile of ``dRaw`` (zero on padded rows/columns) to the gradients.

    * ``WRITE_DRAW`` (deterministic mode): store it into ``DRAW (N, V)`` (contiguous, input dtype) and,
      with ``NEED_DB``, its column sums into row ``pid_n`` of ``DB (row blocks, V)`` fp32; the launcher
      runs the matmuls.
    * otherwise (fused mode): ``tl.atomic_add`` ``dRaw @ W`` into ``DH (N, D)``, ``dRaw^T @ H`` into
      ``DW (V, D)`` and the column sums into ``DB (V,)``, all fp32 contiguous, ``BLOCK_D`` columns of
      ``D`` at a time. The dots run in the input dtype (fp32 accumulate), as torch's matmul would.

    The same two modes as ``linear_logprob_bwd_kernel`` (whose module docstring discusses them).
    """
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if WRITE_DRAW:
        offs = rows.to(tl.int64)[:, None] * V + cols[None, :]
        tl.store(DRAW + offs, draw.to(DRAW.dtype.element_ty), mask=tile_mask)
        if NEED_DB:
            tl.store(DB + pid_n.to(tl.int64) * V + cols, tl.sum(draw, axis=0), mask=col_mask)
    else:
        if NEED_DB:
            tl.atomic_add(DB + cols, tl.sum(draw, axis=0), mask=col_mask)
        if UPCAST:
            draw_op = draw
        else:
            draw_op = draw.to(H.dtype.element_ty)
        h_rows = H + rows.to(tl.int64)[:, None] * stride_hn
        w_rows = W + cols.to(tl.int64)[:, None] * stride_wv
        dh_rows = DH + rows.to(tl.int64)[:, None] * D
        dw_rows = DW + cols.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            if NEED_DH:
                w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(draw_op, w, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_D)
                tl.atomic_add(dh_rows + offs_d[None, :], dh, mask=row_mask[:, None] & d_mask[None, :])
            if NEED_DW:
                h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(draw_op), h, input_precision=INPUT_PRECISION)  # (BLOCK_V, BLOCK_D)
                tl.atomic_add(dw_rows + offs_d[None, :], dw, mask=col_mask[:, None] & d_mask[None, :])
