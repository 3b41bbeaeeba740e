"""Device functions of the forwards' online softmax: the label's logit and one tile's max/weight step.

Both forward kernels walk their vocabulary range in ``BLOCK_V`` tiles and fold each tile of logits
into running per-row statistics (Milakov & Gimelshein, 2018, "Online normalizer calculation for
softmax"). What they fold differs; the new running max, the shift that rescales the old sums and the
tile's weights ``exp(z - m_new)`` do not, and are computed here.

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
