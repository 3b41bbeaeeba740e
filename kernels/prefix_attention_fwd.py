"""Forward of block-sparse prefix-sharing attention: ``O = softmax(scale Q K^T + M) V`` and its log-sum-exp.

One program owns a block of ``BLOCK_M`` queries of one (batch row, query head). It walks only the key
blocks its block map lists, as runs of consecutive blocks (first the *full* tiles without any mask, then
the *partial* tiles with the in-register mask of :mod:`.prefix_blocks`), folding each ``BLOCK_M x BLOCK_N`` score tile into running
row statistics with the online softmax of FlashAttention-2 (Dao, 2023), in base 2:

    s   = (scale * log2 e) * q k^T            (masked entries: -inf)
    m'  = max(m, rowmax s),   a = 2^(m - m')
    l  <- a l + rowsum 2^(s - m'),   acc <- a acc + 2^(s - m') v
    O = acc / l,   LSE2 = m + log2 l          (stored for the backward, in base-2 units)

``m`` starts at a finite ``-1e30`` so a row whose first tiles are fully masked gives ``a = 1`` and
``2^(-inf) = 0`` instead of ``NaN``. Every valid row sees at least itself, so ``l > 0`` at the end.

Attention *sinks* (a learned logit ``sigma_h`` per query head with a zero value vector, as in GPT-OSS)
join the softmax's denominator only: the running statistics start from the sink instead of from
nothing, ``m = max(sigma_h log2 e, -1e30)``, ``l = 2^(sigma_h log2 e - m)``, ``acc = 0`` (``l = 1``,
or ``l = 0`` for a sink of ``-inf``, i.e. none: ``m`` stays finite so that ``2^(m - m')`` never meets
``-inf - (-inf)``). ``LSE2`` then includes the sink, so the backward kernels need no change;
``dsigma_h = -sum_q 2^(sigma_h log2 e - LSE2_q) Delta_q`` is one reduction on the caller's side.

Which tiles exist is the prefix-sharing structure of "Accelerating Direct Preference Optimization with
Prefix Sharing" (Wang & Hegde, 2024): a response's queries visit its prompt's key blocks and its own,
never another response's. Grouped-query attention maps query head ``h`` to key/value head
``h // GROUP``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .prefix_blocks import block_d, block_runs, load_bounds, load_tile_pair, store_tile, tile_visible
from .utils import dot_precision, upcast_dots


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, k_base, v_base, kb, rows, lo1, hi1, lo2,
    stride_ks, stride_kd, stride_vs, stride_vd, S, D, qk_scale,
    MASKED: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fold key block ``kb`` into ``(acc, m_i, l_i)``; ``MASKED`` applies the layout mask and bounds."""
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = load_tile_pair(k_base, v_base, cols, stride_ks, stride_kd, stride_vs, stride_vd, S, D,
                          MASKED, EVEN_D, UPCAST, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        vis = tile_visible(rows[:, None], cols[None, :], lo1[:, None], hi1[:, None], lo2[:, None], S)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def prefix_attention_fwd_kernel(
    Q, K, V, O, LSE2, BOUNDS, SINKS,
    FULL_CNT, FULL_RUNS, PART_CNT, PART_RUNS,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    S, D, HQ, GROUP, NQB, NKB, qk_scale,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(NQB - 1 - i, b * HQ + h)``: queries ``[i * BLOCK_M, +BLOCK_M)`` of row ``b``, head ``h``.

    BOUNDS ``(B, 3, S)`` int32; FULL_CNT/PART_CNT ``(B, NQB)`` int32 run counts; FULL_RUNS/PART_RUNS
    ``(B, NQB, NKB, 2)`` int32 runs ``[start, stop)`` of full / partial key blocks; LSE2 ``(B, HQ, S)`` float32;
    SINKS ``(HQ,)`` float32 sink logits in base-2 units (read only when ``HAS_SINKS``).
    """
    # Later query blocks see more key blocks (causally); blocks launch x-fastest, so the heaviest of each
    # (row, head) go first and the last wave holds light ones instead of a long tail.
    pid_m = NQB - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    g = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < S

    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None].to(tl.int64) * stride_qs \
        + offs_d[None, :] * stride_qd
    # the mask of store_tile below: the compiler builds it once for both
    q = tl.load(q_ptrs, mask=(rows[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + g.to(tl.int64) * stride_vh

    lo1, hi1, lo2 = load_bounds(BOUNDS + b64 * 3 * S, rows, row_ok, S)

    if HAS_SINKS:
        # a sink of -inf (no sink for this head) starts from the finite floor, with weight 2^(-inf) = 0
        sink = tl.full((BLOCK_M,), 0.0, dtype=tl.float32) + tl.load(SINKS + h)
        m_i = tl.maximum(sink, -1.0e30)
        l_i = tl.exp2(sink - m_i)
    else:
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    n_full, full_runs, n_part, part_runs = block_runs(FULL_CNT, FULL_RUNS, PART_CNT, PART_RUNS, b * NQB + pid_m, NKB)
    # runs of consecutive key blocks: affine loads, which the compiler software-pipelines
    for r in range(0, n_full):
        for kb in range(tl.load(full_runs + 2 * r), tl.load(full_runs + 2 * r + 1)):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, rows, lo1, hi1, lo2,
                                      stride_ks, stride_kd, stride_vs, stride_vd, S, D, qk_scale,
                                      False, EVEN_D, UPCAST, PRECISION, BLOCK_N, BLOCK_D)
    for r in range(0, n_part):
        for kb in range(tl.load(part_runs + 2 * r), tl.load(part_runs + 2 * r + 1)):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kb, rows, lo1, hi1, lo2,
                                      stride_ks, stride_kd, stride_vs, stride_vd, S, D, qk_scale,
                                      True, EVEN_D, UPCAST, PRECISION, BLOCK_N, BLOCK_D)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    store_tile(O + b64 * stride_ob + h.to(tl.int64) * stride_oh, rows, stride_os, stride_od, out, S, D, BLOCK_D)
    tl.store(LSE2 + pid_bh.to(tl.int64) * S + rows, m_i + tl.log2(l_safe), mask=row_ok)


def prefix_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, bounds: Tensor,
    full_count: Tensor, full_runs: Tensor, part_count: Tensor, part_runs: Tensor,
    scale: float, block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 1,
    sinks2: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel.

    Args:
        q: ``(B, Hq, S, d)``; k, v: ``(B, Hkv, S, d)``; any strides.
        bounds: ``(B, 3, S)`` int32 per-query ``lo1, hi1, lo2``.
        full_count, full_runs, part_count, part_runs: ``BlockMap.query_major()`` of the
            ``block_m x block_n`` map: ``(B, nQB)`` int32 run counts and ``(B, nQB, nKB, 2)`` int32 runs of
            full / partial key blocks.
        scale: softmax scale (natural units).
        sinks2: ``(Hq,)`` float32 contiguous sink logits times ``log2 e``, or ``None``.

    Returns:
        ``o``: ``(B, Hq, S, d)`` in ``q.dtype`` (memory laid out as ``(B, S, Hq, d)``, the layout
        transformers wants back) and ``lse2``: ``(B, Hq, S)`` float32 log-sum-exp in base 2 of the scaled
        scores.
    """
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    o = torch.empty((B, S, HQ, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse2 = torch.empty((B, HQ, S), dtype=torch.float32, device=q.device)
    n_q, n_k = part_runs.shape[1], part_runs.shape[2]
    bd = block_d(D)
    grid = (n_q, B * HQ)
    prefix_attention_fwd_kernel[grid](
        q, k, v, o, lse2, bounds, lse2 if sinks2 is None else sinks2,
        full_count, full_runs, part_count, part_runs,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        S, D, HQ, HQ // HKV, n_q, n_k, scale * 1.4426950408889634,
        EVEN_D=bd == D, UPCAST=upcast_dots(q.dtype), PRECISION=dot_precision(q.dtype),
        HAS_SINKS=sinks2 is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse2
