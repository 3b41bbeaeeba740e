"""torch backend: chunked linear -> token statistics (see ``pygpo.ops.token_stats``).

Two strategies, chosen from the memory budget (``pygpo.ops.chunking``):

- **recompute** (large inputs): the logits ``H @ W.T`` are produced one ``rows x vocab`` tile at a
  time, folded into per-row online statistics in float32 and dropped. The backward recomputes each
  tile, turns it into ``dRaw`` in place and accumulates ``dH`` and ``dW`` in float32: four matmuls.
- **kept** (the whole ``rows x V`` fp32 matrix fits the budget): one matmul writes all logits, the
  statistics are folded a chunk of rows at a time, and ``z - max`` stays for the backward, which turns
  it into ``dRaw`` in place and runs ``dH = dRaw @ W`` and ``dW = dRaw^T @ H``: three matmuls.

The tile code, shared with ``torch_policy_ref``, is in ``torch_tiles``.
Runs on any device torch supports; it is the CPU default and the reference the fused backends
dispatch against.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..chunking import choose_chunks, kept_logits_rows
from ..autocast import autocast_off
from ..first_order import first_order_only
from ..token_stats import StatRequest, TokenStats
from .torch_tiles import (accumulate_grads, acc_dtype, add_label_grad, backprop_tile, backward_possible, cast_grads,
                          fill_logits_, finite_max, floor_log, grad_accumulators, label_logit, raw_grad_,
                          tile_logits)


class _Stats:
    """Running per-row statistics of the online log-sum-exp over vocabulary tiles.

    ``t`` is kept relative to the running max, ``t = sum exp(z - m) (z - m)``, so the entropy
    ``log s - t / s`` never subtracts two numbers of the size of the logits.
    """

    def __init__(self, n: int, req: StatRequest, like: Tensor, *, keep_logits: bool = False):
        f32 = dict(device=like.device, dtype=acc_dtype(like))
        self.m = None
        self.s = torch.zeros(n, **f32)
        self.t = torch.zeros(n, **f32) if req.entropy else None
        self.s2 = torch.zeros(n, **f32) if req.log_sum_p2 else None
        self.sz = torch.zeros(n, **f32) if req.mean_logit else None
        self.zy = torch.zeros(n, **f32)
        self.top1 = req.top1
        self.keep_logits = keep_logits

    def fold(self, z: Tensor, labels: Tensor, v0: int) -> None:
        """Fold logits ``z`` (rows, vocab tile starting at ``v0``) into the statistics; consumes ``z``,
        or with ``keep_logits`` leaves ``z - max`` in it."""
        self.zy += label_logit(z, labels, v0)
        if self.sz is not None:
            self.sz += z.sum(1)
        tile_max = finite_max(z.amax(1))  # finite under a tile of -inf logits (masked vocabulary)
        if self.m is None:
            m_new = tile_max
        else:
            m_new = torch.maximum(self.m, tile_max)
            shift = self.m - m_new  # <= 0
            rescale = torch.exp(shift)
            if self.t is not None:
                self.t.add_(shift * self.s).mul_(rescale)
            if self.s2 is not None:
                self.s2.mul_(rescale * rescale)
            self.s.mul_(rescale)
        z.sub_(m_new[:, None])
        if self.s2 is not None:
            self.s2.add_(torch.exp(2.0 * z).sum(1))
        # in place unless z is still needed: for t below, or kept for the backward
        e = torch.exp(z) if self.t is not None or self.keep_logits else z.exp_()
        if self.t is not None:
            self.t.add_(floor_log(z).mul_(e).sum(1))  # 0 log 0 = 0 where z = -inf
        self.s.add_(e.sum(1))
        self.m = m_new

    def finish(self, vocab_size: int) -> TokenStats:
        log_s = torch.log(self.s)
        lse = self.m + log_s
        entropy = log_s - self.t / self.s if self.t is not None else None
        log_sum_p2 = torch.log(self.s2) - 2.0 * log_s if self.s2 is not None else None
        mean_logit = self.sz / vocab_size if self.sz is not None else None
        is_top1 = (self.zy >= self.m).float() if self.top1 else None
        return TokenStats(self.zy - lse, lse, entropy, log_sum_p2, mean_logit, is_top1)


class _Upstream:
    """The per-row upstream gradients, arranged so that a tile's ``dz`` comes from its ``log p``:

        dz = p * (a + b p - g_ent log p) + g_mz / V + g_lp 1[v = y]

    (the ``token_stats`` docstring, with ``z - lse`` written as ``log p``), ``a`` and ``b`` per row;
    ``log p`` is floored at ``LOG_FLOOR`` in the entropy term, so that masked entries (``p = 0``) give 0.
    """

    def __init__(self, grads, labels: Tensor, entropy: Optional[Tensor], log_sum_p2: Optional[Tensor],
                 vocab: int, f32: dict):
        self.g_lp, g_lse, self.g_ent, g_l2, self.g_mz = grads
        self.labels, self.vocab = labels, vocab
        self.a = torch.zeros(labels.shape[0], **f32)
        if g_lse is not None:
            self.a += g_lse
        if self.g_lp is not None:
            self.a -= self.g_lp
        if self.g_ent is not None:
            self.a -= self.g_ent * entropy
        self.b = None
        if g_l2 is not None:
            self.a -= 2.0 * g_l2
            self.b = 2.0 * g_l2 / torch.exp(log_sum_p2)

    def dz_(self, log_p: Tensor, rows: slice, v0: int) -> Tensor:
        """``dz`` of the tile of rows ``rows``, vocabulary from ``v0``, computed in place in ``log_p``."""
        coef = self.a[rows, None]
        if self.g_ent is not None:
            coef = floor_log(log_p).mul_(-self.g_ent[rows, None]).add_(coef)  # finite where p = 0
        dz = log_p.exp_()  # p, in place
        if self.b is not None:
            coef = coef + self.b[rows, None] * dz
        dz.mul_(coef)
        if self.g_mz is not None:
            dz += self.g_mz[rows, None] / self.vocab
        if self.g_lp is not None:
            add_label_grad(dz, self.labels[rows], v0, self.g_lp[rows])
        return dz


class TorchChunkedTokenStats(torch.autograd.Function):
    """Autograd function over the valid rows: ``(M, D), (V, D), (V,)?, (M,) -> TokenStats``.

    Two strategies, chosen from the memory budget (``pygpo.ops.chunking``): when the whole ``M x V``
    logit matrix fits, it is kept (as ``z - max``) and the backward turns it into ``dRaw`` in place and
    runs two matmuls; otherwise tiles are folded and dropped, and the backward recomputes them.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, labels, req: StatRequest, memory_budget, differentiable: bool):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = acc_dtype(hidden)
        ctx.chunks = choose_chunks(n, vocab, memory_budget=memory_budget)
        # logits are kept only for a backward that can happen (not under no_grad, e.g. reference scores)
        ctx.kept_rows = (kept_logits_rows(n, vocab, torch.finfo(acc).bits // 8, memory_budget=memory_budget)
                         if differentiable else None)
        ctx.kept = None
        if ctx.kept_rows is not None:
            result, ctx.kept, row_max = _forward_kept(hidden, weight, bias, labels, req, ctx.kept_rows)
        else:
            result, row_max = _forward_tiles(hidden, weight, bias, labels, req, ctx.chunks), None
        ctx.save_for_backward(hidden, weight, bias, labels, result.lse, result.entropy, result.log_sum_p2,
                              row_max)
        ctx.req = req
        if result.is_top1 is not None:
            ctx.mark_non_differentiable(result.is_top1)
        return tuple(result)

    @staticmethod
    @first_order_only
    @autocast_off
    def backward(ctx, g_lp, g_lse, g_ent, g_l2, g_mz, _g_top1=None):
        hidden, weight, bias, labels, lse, entropy, log_sum_p2, row_max = ctx.saved_tensors
        req = ctx.req
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab = weight.shape[0]
        f32 = dict(device=hidden.device, dtype=acc_dtype(hidden))  # fp32, or fp64 for fp64 inputs
        grads = [g if g is None else g.to(f32["dtype"]) for g in (g_lp, g_lse, g_ent, g_l2, g_mz)]
        if all(g is None for g in grads):
            return None, None, None, None, None, None, None
        up = _Upstream(grads, labels, entropy, log_sum_p2, vocab, f32)
        d_params = grad_accumulators(hidden, weight, bias, need_h, need_w, need_b)
        if ctx.kept_rows is not None:
            # the kept logits are consumed in place; a second backward (retain_graph) rebuilds them
            # bit for bit, so that it gives the very same gradients
            kept, ctx.kept = ctx.kept, None
            if kept is None:
                kept = fill_logits_(torch.empty(hidden.shape[0], vocab, **f32), hidden, weight, bias, req,
                                    ctx.kept_rows).sub_(row_max[:, None])
            _backward_kept(kept, row_max, lse, up, req, hidden, weight, ctx.kept_rows, d_params)
        else:
            _backward_tiles(up, lse, req, hidden, weight, bias, ctx.chunks, d_params)
        return cast_grads(d_params, hidden, weight, bias) + (None, None, None, None)


def _forward_tiles(hidden, weight, bias, labels, req: StatRequest, chunks) -> TokenStats:
    """Fold ``rows x vocab`` tiles into the statistics, dropping each tile."""
    n, vocab = hidden.shape[0], weight.shape[0]
    out = {k: [] for k in TokenStats._fields}
    for r0 in range(0, n, chunks.rows):
        h = hidden[r0 : r0 + chunks.rows]
        y = labels[r0 : r0 + chunks.rows]
        stats = _Stats(h.shape[0], req, hidden)
        for v0 in range(0, vocab, chunks.vocab):
            z, _ = tile_logits(h, weight, bias, slice(v0, v0 + chunks.vocab), req)
            stats.fold(z, y, v0)
        for k, v in stats.finish(vocab)._asdict().items():
            out[k].append(v)
    return TokenStats(*(torch.cat(v) if v[0] is not None else None for v in out.values()))


def _forward_kept(hidden, weight, bias, labels, req: StatRequest, rows_per_chunk: int):
    """All logits at once, kept as ``z - max`` for the backward: ``(stats, kept, row_max)``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    kept = fill_logits_(torch.empty(n, vocab, device=hidden.device, dtype=acc_dtype(hidden)),
                        hidden, weight, bias, req, rows_per_chunk)
    out = {k: [] for k in TokenStats._fields}
    row_max = []
    for r0 in range(0, n, rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        stats = _Stats(kept[rows].shape[0], req, hidden, keep_logits=True)
        stats.fold(kept[rows], labels[rows], 0)
        row_max.append(stats.m)
        for k, v in stats.finish(vocab)._asdict().items():
            out[k].append(v)
    stats = TokenStats(*(torch.cat(v) if v[0] is not None else None for v in out.values()))
    return stats, kept, torch.cat(row_max)


def _backward_tiles(up: _Upstream, lse, req: StatRequest, hidden, weight, bias, chunks, d_params) -> None:
    """Recompute each tile, turn it into ``dRaw`` and accumulate its gradients."""
    for rows, v0, cols in chunks.tiles(hidden.shape[0], weight.shape[0]):
        z, tanh = tile_logits(hidden[rows], weight, bias, cols, req)
        dz = up.dz_(z.sub_(lse[rows, None]), rows, v0)
        backprop_tile(dz, tanh, req, hidden[rows], weight, rows, cols, d_params)


def _backward_kept(kept, row_max, lse, up: _Upstream, req: StatRequest, hidden, weight, rows_per_chunk: int,
                   d_params) -> None:
    """Turn the kept ``z - max`` into ``dRaw`` in place, a chunk of rows at a time, then two matmuls."""
    log_s = lse - row_max
    for r0 in range(0, kept.shape[0], rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        log_p = kept[rows].sub_(log_s[rows, None])
        # z = softcap * tanh / temperature, so tanh comes back from the logits themselves
        tanh = (log_p + lse[rows, None]).mul_(req.temperature / req.softcap) if req.softcap is not None else None
        raw_grad_(up.dz_(log_p, rows, 0), tanh, req)
    everything = slice(0, None)
    accumulate_grads(kept, hidden, weight, everything, everything, d_params)


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
    """Backend entry point; the torch backend is deterministic whatever ``deterministic`` says."""
    del deterministic
    return TokenStats(*TorchChunkedTokenStats.apply(hidden, weight, bias, labels, req, memory_budget,
                                                    backward_possible(hidden, weight, bias)))
