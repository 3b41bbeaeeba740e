"""Launcher side of the backward kernels' two modes: from ``dRaw`` tiles to dH, dW, db.

Every backward kernel of this package forms a ``(BLOCK_N, BLOCK_V)`` tile of ``dRaw`` and hands it
to ``logit_tile.accumulate_draw_tile``; what is left to the launcher is the same for all of them
(the trade-off between the modes is discussed in ``linear_logprob_bwd``):

* **fused**: zeroed fp32 accumulators for one launch over all rows (the kernel adds ``dRaw @ W``,
  ``dRaw^T @ H`` and the column sums into them with atomics), cast to the inputs' dtypes after;
* **deterministic**: rows in chunks whose ``rows x V`` dRaw buffer (input dtype) fits a memory
  budget; per chunk the kernel writes ``dRaw`` and per-row-block column sums, then two plain matmuls
  ``dH_chunk = dRaw @ W`` and ``dW += dRaw^T @ H_chunk`` (fp32 across chunks) and
  ``db += sum_blocks partial sums``. No atomics: bitwise reproducible.

The kernel-specific part comes in as ``launch(rows, dh, dw, db, draw, write)``: run the kernel on
``hidden[rows]`` against the whole vocabulary with those output buffers, in write mode if ``write``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton
from torch import Tensor

from pygpo.ops.matmul_accumulate import add_matmul_
from .utils import MIN_BLOCK_N

#: Default bytes for the ``rows x V`` dRaw buffer of the deterministic mode.
DEFAULT_DRAW_BUDGET = 1 << 30

#: ``launch(rows, dh, dw, db, draw, write)``: the backward kernel on ``hidden[rows]`` (module docstring).
Launch = Callable[[slice, Tensor, Tensor, Tensor, Tensor, bool], None]

Grads = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def zero_grads(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_hidden: bool, need_weight: bool,
               need_bias: bool) -> Grads:
    """``(dH, dW, db)`` all zero (no rows, or no upstream gradient), ``None`` where not needed."""
    zeros = lambda like, need: torch.zeros_like(like) if need else None  # noqa: E731
    return zeros(hidden, need_hidden), zeros(weight, need_weight), zeros(bias, need_bias)



def draw_flags(need_hidden: bool, need_weight: bool, need_bias: bool, write: bool) -> dict[str, bool]:
    """The ``NEED_DH``, ``NEED_DW``, ``NEED_DB`` and ``WRITE_DRAW`` constexprs of one ``launch``
    (``logit_tile.accumulate_draw_tile``): in write mode the launcher's matmuls make dH and dW, so the
    kernel only writes dRaw (and db's partial sums)."""
    return dict(NEED_DH=need_hidden and not write, NEED_DW=need_weight and not write, NEED_DB=need_bias,
                WRITE_DRAW=write)


def draw_grads(
    launch: Launch,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    *,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    deterministic: bool,
    memory_budget: Optional[int],
) -> Grads:
    """``(dH, dW, db)`` in the inputs' dtypes (``None`` where not needed), by either mode.

    Args:
        launch: the kernel launcher (module docstring); it passes the constexprs of :func:`draw_flags`.
        hidden, weight, bias: the forward's ``(N, D)``, ``(V, D)``, ``(V,)``/``None``; ``N > 0``.
        need_*: which gradients to produce; ``need_bias`` already false without a bias.
        deterministic: the write mode and matmuls instead of the fused, atomic one.
        memory_budget: bytes for the deterministic ``rows x V`` dRaw buffer (default
            ``DEFAULT_DRAW_BUDGET``); ignored by the fused mode.
    """
    if deterministic:
        return _chunked_matmul_grads(launch, hidden, weight, bias, need_hidden, need_weight, need_bias,
                                     memory_budget)
    return _fused_grads(launch, hidden, weight, bias, need_hidden, need_weight, need_bias)


def _fused_grads(launch: Launch, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_hidden: bool,
                 need_weight: bool, need_bias: bool) -> Grads:
    """One launch over all rows, the kernel accumulating into fp32 buffers with atomics."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    scratch = torch.zeros(1, **f32)  # stands in for absent buffers
    d_h = torch.zeros((n, d), **f32) if need_hidden else scratch.clone()
    d_w = torch.zeros((vocab, d), **f32) if need_weight else scratch.clone()
    d_b = torch.zeros(vocab, **f32) if need_bias else scratch.clone()
    launch(slice(0, n), d_h, d_w, d_b, scratch, False)
    return (d_h.to(hidden.dtype) if need_hidden else None,
            d_w.to(weight.dtype) if need_weight else None,
            d_b.to(bias.dtype) if need_bias else None)


def _chunked_matmul_grads(launch: Launch, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need_hidden: bool,
                          need_weight: bool, need_bias: bool, memory_budget: Optional[int]) -> Grads:
    """Rows in chunks whose dRaw (rows x V, input dtype) fits the budget; torch matmuls per chunk."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    scratch = torch.zeros(1, **f32)  # stands in for the fused mode's buffers
    budget = DEFAULT_DRAW_BUDGET if memory_budget is None else int(memory_budget)
    chunk = max(1, min(n, budget // (vocab * hidden.element_size())))
    d_h = torch.empty((n, d), device=dev, dtype=hidden.dtype) if need_hidden else None  # contiguous: mm(out=)
    d_w = None
    d_w32 = torch.zeros((vocab, d), **f32) if need_weight and chunk < n else None
    d_b32 = torch.zeros(vocab, **f32) if need_bias else None
    for r0 in range(0, n, chunk):
        rows = slice(r0, min(r0 + chunk, n))
        m = rows.stop - r0
        draw = torch.empty((m, vocab), device=dev, dtype=hidden.dtype)
        # one fp32 row of column sums per row block; sized for the smallest BLOCK_N any config uses
        db_part = torch.zeros((triton.cdiv(m, MIN_BLOCK_N), vocab), **f32) if need_bias else scratch
        launch(rows, scratch, scratch, db_part, draw, True)
        if need_hidden:
            torch.mm(draw, weight, out=d_h[rows])
        if need_weight:
            if d_w32 is None:  # a single chunk: one matmul, rounded once to the weight's dtype
                d_w = torch.mm(draw.t(), hidden[rows])
            else:
                add_matmul_(d_w32, draw.t(), hidden[rows])
        if need_bias:
            d_b32 += db_part.sum(0)
    if d_w32 is not None:
        d_w = d_w32.to(weight.dtype)
    return d_h, d_w, (d_b32.to(bias.dtype) if need_bias else None)

