"""Device functions shared by the forward and backward kernels: one tile of logits, and ``tanh``.

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
