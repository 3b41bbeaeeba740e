"""torch backend: chunked, recomputing linear -> token statistics (see ``pygpo.ops.token_stats``).

The logits ``H @ W.T`` are produced one ``rows x vocab`` tile at a time (sizes from
``pygpo.ops.chunking``), folded into per-row online statistics in float32 and dropped. The backward
recomputes each tile, turns it into ``dRaw`` in place and accumulates ``dH`` and ``dW`` in float32
(the tile code, shared with ``torch_policy_ref``, is in ``torch_tiles``).
Runs on any device torch supports; it is the CPU default and the reference the fused backends
dispatch against.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..chunking import choose_chunks
from ..token_stats import StatRequest, TokenStats
from .torch_tiles import (acc_dtype, add_label_grad, backprop_tile, cast_grads, grad_accumulators, label_logit,
                          tile_logits)


class _Stats:
    """Running per-row statistics of the online log-sum-exp over vocabulary tiles.

    ``t`` is kept relative to the running max, ``t = sum exp(z - m) (z - m)``, so the entropy
    ``log s - t / s`` never subtracts two numbers of the size of the logits.
    """

    def __init__(self, n: int, req: StatRequest, like: Tensor):
        f32 = dict(device=like.device, dtype=acc_dtype(like))
        self.m = None
        self.s = torch.zeros(n, **f32)
        self.t = torch.zeros(n, **f32) if req.entropy else None
        self.s2 = torch.zeros(n, **f32) if req.log_sum_p2 else None
        self.sz = torch.zeros(n, **f32) if req.mean_logit else None
        self.zy = torch.zeros(n, **f32)
        self.top1 = req.top1

    def fold(self, z: Tensor, labels: Tensor, v0: int) -> None:
        """Fold logits ``z`` (rows, vocab tile starting at ``v0``) into the statistics; consumes ``z``."""
        self.zy += label_logit(z, labels, v0)
        if self.sz is not None:
            self.sz += z.sum(1)
        tile_max = z.amax(1)
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
        if self.t is not None:
            e = torch.exp(z)
            self.t.add_((e * z).sum(1))
        else:
            e = z.exp_()
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


class TorchChunkedTokenStats(torch.autograd.Function):
    """Autograd function over the valid rows: ``(M, D), (V, D), (V,)?, (M,) -> TokenStats``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, req: StatRequest, memory_budget):
        ctx.set_materialize_grads(False)
        n, vocab = hidden.shape[0], weight.shape[0]
        chunks = choose_chunks(n, vocab, memory_budget=memory_budget)
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
        result = TokenStats(*(torch.cat(v) if v[0] is not None else None for v in out.values()))
        ctx.save_for_backward(hidden, weight, bias, labels, result.lse, result.entropy, result.log_sum_p2)
        ctx.req, ctx.chunks = req, chunks
        if result.is_top1 is not None:
            ctx.mark_non_differentiable(result.is_top1)
        return tuple(result)

    @staticmethod
    def backward(ctx, g_lp, g_lse, g_ent, g_l2, g_mz, _g_top1=None):
        hidden, weight, bias, labels, lse, entropy, log_sum_p2 = ctx.saved_tensors
        req, chunks = ctx.req, ctx.chunks
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = dict(device=hidden.device, dtype=acc_dtype(hidden))  # fp32, or fp64 for fp64 inputs
        d_params = grad_accumulators(hidden, weight, bias, need_h, need_w, need_b)
        grads = [g if g is None else g.to(f32["dtype"]) for g in (g_lp, g_lse, g_ent, g_l2, g_mz)]
        g_lp, g_lse, g_ent, g_l2, g_mz = grads
        if all(g is None for g in grads):
            return None, None, None, None, None, None

        # dz = p * (a + b p - g_ent log p) + g_mz / V + g_lp 1[v = y], per-row a and b
        # (token_stats docstring, with z - lse written as log p)
        a = torch.zeros(n, **f32)
        if g_lse is not None:
            a += g_lse
        if g_lp is not None:
            a -= g_lp
        if g_ent is not None:
            a -= g_ent * entropy
        b = None
        if g_l2 is not None:
            a -= 2.0 * g_l2
            b = 2.0 * g_l2 / torch.exp(log_sum_p2)

        for r0 in range(0, n, chunks.rows):
            rows = slice(r0, r0 + chunks.rows)
            h = hidden[rows]
            for v0 in range(0, vocab, chunks.vocab):
                cols = slice(v0, v0 + chunks.vocab)
                z, tanh = tile_logits(h, weight, bias, cols, req)
                log_p = z.sub_(lse[rows, None])
                coef = a[rows, None]
                if g_ent is not None:
                    coef = coef - g_ent[rows, None] * log_p
                dz = log_p.exp_()  # p, in place
                if b is not None:
                    coef = coef + b[rows, None] * dz
                dz.mul_(coef)
                if g_mz is not None:
                    dz += g_mz[rows, None] / vocab
                if g_lp is not None:
                    add_label_grad(dz, labels[rows], v0, g_lp[rows])
                backprop_tile(dz, tanh, req, h, weight, rows, cols, d_params)
        return cast_grads(d_params, hidden, weight, bias) + (None, None, None)


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
    return TokenStats(*TorchChunkedTokenStats.apply(hidden, weight, bias, labels, req, memory_budget))
