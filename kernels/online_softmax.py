"""Device functions of the forwards' online softmax: a program's rows and vocabulary split, the label's
logit, one tile's max/weight step and the fold of a tile into the common running statistics.

Both forward kernels walk their vocabulary range in ``BLOCK_V`` tiles and fold each tile of logits
into running per-row statistics (Milakov & Gimelshein, 2018, "Online normalizer calculation for
softmax"). The new running max, the shift that rescales the old sums, the tile's weights
``exp(z - m_new)`` and the statistics every forward keeps (``m, s, zy`` and the optional ``t, sz``)
are computed here; what a kernel folds beyond those (``s2``, the reference's ``u``) stays in it.

Masked vocabulary (logits of ``-inf``, e.g. from a ``-inf`` bias) has weight exactly 0 and, by the
convention ``0 log 0 = 0``, adds nothing to the entropy's ``sum exp(z - m) (z - m)``. Two floors keep
``inf - inf`` and ``0 * inf`` from ever forming: the running max never goes below the lowest finite
float (a tile of only ``-inf`` logits leaves it finite) and ``z - m`` never below :data:`LOG_FLOOR`,
where ``exp`` has long underflowed to exactly 0, so no value changes.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Floor of ``z - m`` and ``log p``: ``exp`` of anything below it is exactly 0 in float32 (and float64).
LOG_FLOOR = tl.constexpr(-1.0e4)
#: Lowest finite float32: the floor of a running max.
LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def floor_log(x):
    """``max(x, LOG_FLOOR)`` of ``z - m`` or ``log p``, written as a select so that a nan stays nan."""
    return tl.where(x < LOG_FLOOR, LOG_FLOOR, x)


@triton.jit
def label_logit(z, cols, labels, col_mask):
    """Per-row ``z[i, labels[i]]`` where the label lies among this tile's real columns, else 0.

    The label lies in exactly one tile of one split, so summing this over all tiles and splits gives
    the label's logit.
    """
    is_label = (cols[None, :] == labels[:, None]) & col_mask[None, :]
    return tl.sum(tl.where(is_label, z, 0.0), axis=1)


@triton.jit
def online_step(m, z, col_mask):
    """``(m_new, shift, zc, e)`` for folding the ``(BLOCK_N, BLOCK_V)`` tile ``z`` into running max ``m``.

    ``m_new = max(m, max_v z)`` is finite: every tile has at least one real column, and a tile of only
    ``-inf`` logits (masked vocabulary) leaves it at ``LOWEST``. The running sums rescale by
    ``exp(shift)`` with ``shift = m - m_new <= 0``; on the first tile ``m = -inf`` and every sum is 0,
    so the shift is 0 there instead of ``-inf`` (whose ``-inf * 0`` would be nan).
    ``zc = z - m_new``, floored at ``LOG_FLOOR`` (masked columns: ``e`` is 0 and ``e * zc`` stays 0), and
    ``e = exp(zc)`` are 0 on padded columns, so those add nothing and no inf or nan is ever formed.
    """
    m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
    m_new = tl.where(m_new == float("-inf"), LOWEST, m_new)
    shift = tl.where(m == float("-inf"), 0.0, m - m_new)
    zc = tl.where(col_mask[None, :], floor_log(z - m_new[:, None]), 0.0)
    e = tl.where(col_mask[None, :], tl.exp(zc), 0.0)
    return m_new, shift, zc, e


@triton.jit
def split_program(Y, PART, N, V, V_PER_SPLIT, BLOCK_N: tl.constexpr):
    """``(rows, row_mask, labels, v_start, v_end, part)`` of forward program ``(pid_n, pid_s)``.

    The program owns rows ``[pid_n * BLOCK_N, +BLOCK_N)`` (``labels`` loads as -1 past ``N``) and the
    vocabulary range ``[v_start, v_end)`` of split ``pid_s``. It writes statistic ``k`` of its rows to
    ``part + k * stride_stat`` of the contiguous ``PART (K, splits, N)`` buffer (``stride_stat = splits * N``);
    the split offset is built in int64.
    """
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(Y + rows, mask=row_mask, other=-1)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    return rows, row_mask, labels, v_start, v_end, PART + pid_s.to(tl.int64) * N + rows


@triton.jit
def empty_stats(BLOCK_N: tl.constexpr):
    """The running ``(m, s, zy, t, sz)`` of :func:`fold_logit_tile` before the first tile: ``m = -inf``,
    the sums 0 (fp32, ``(BLOCK_N,)`` each)."""
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32), zero, zero, zero, zero


@triton.jit
def fold_logit_tile(z, cols, col_mask, labels, m, s, zy, t, sz,
                    WANT_ENTROPY: tl.constexpr, WANT_MEAN: tl.constexpr):
    """Fold the ``(BLOCK_N, BLOCK_V)`` tile ``z`` into the running ``(m, s, zy, t, sz)``.

    ``m`` is the running max, ``s = sum exp(z - m)``, ``zy`` the label's logit, ``t = sum exp(z - m) (z - m)``
    (only with ``WANT_ENTROPY``) and ``sz = sum z`` (only with ``WANT_MEAN``). With ``shift = m - m'``
    and ``r = exp(shift)`` when the max grows to ``m'``: ``s <- r s + sum e`` and
    ``t <- r (t + shift s) + sum e (z - m')`` (each old ``z - m`` becomes ``z - m'``; ``t`` uses ``s``
    before this tile), with the weights ``e = exp(z - m')`` of :func:`online_step`.

    Returns ``(m', s, zy, t, sz, shift, e)``: ``shift`` and ``e`` for the kernel's own further sums.
    """
    zy += label_logit(z, cols, labels, col_mask)
    if WANT_MEAN:
        sz += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    m_new, shift, zc, e = online_step(m, z, col_mask)
    r = tl.exp(shift)
    if WANT_ENTROPY:
        t = r * (t + shift * s) + tl.sum(e * zc, axis=1)
    s = s * r + tl.sum(e, axis=1)
    return m_new, s, zy, t, sz, shift, e


@triton.jit
def store_stats(part, stride_stat, row_mask, m, s, zy, t, sz, T_ROW: tl.constexpr, SZ_ROW: tl.constexpr,
                WANT_ENTROPY: tl.constexpr, WANT_MEAN: tl.constexpr):
    """Write the running ``(m, s, zy, t, sz)`` of :func:`fold_logit_tile` to rows 0, 1, 2, ``T_ROW`` and
    ``SZ_ROW`` of the partial-statistics buffer at ``part`` (row ``k`` at ``part + k * stride_stat``, as
    :func:`split_program` gives it); ``t`` and ``sz`` only when they were computed."""
    tl.store(part + 0 * stride_stat, m, mask=row_mask)
    tl.store(part + 1 * stride_stat, s, mask=row_mask)
    tl.store(part + 2 * stride_stat, zy, mask=row_mask)
    if WANT_ENTROPY:
        tl.store(part + T_ROW * stride_stat, t, mask=row_mask)
    if WANT_MEAN:
        tl.store(part + SZ_ROW * stride_stat, sz, mask=row_mask)
