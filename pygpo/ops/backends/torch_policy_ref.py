"""torch backend: chunked policy + reference log-probs and per-token KL (see ``pygpo.ops.policy_ref_stats``).

For each ``rows x vocab`` tile the policy logits ``H @ W.T`` and the reference logits ``Hr @ Wr.T``
are produced side by side (with the tile helpers of ``torch_tiles``, shared with ``torch_chunked``), folded
into per-row online statistics in float32 and dropped. Two tiles are alive at once, so each gets half
of the memory budget. The backward recomputes both tiles (the reference one only when the KL has an
upstream gradient), forms ``dRaw`` and accumulates ``dH``, ``dW`` and ``db`` in float32; the reference
side never receives a gradient. On request the forward also folds the policy's entropy and mean logit
into the same pass (metrics, not differentiable; no work when not requested).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..chunking import DEFAULT_MEMORY_BUDGET, Chunks, choose_chunks
from ..autocast import autocast_off
from ..first_order import first_order_only
from ..policy_ref_stats import PolicyRefStats
from ..token_stats import LOG_FLOOR, StatRequest
from .torch_tiles import (acc_dtype, add_label_grad, backprop_tile, cast_grads, finite_max, grad_accumulators,
                          label_logit, tile_logits)


class _OnlineStats:
    """Running ``m, s, zy`` (policy), ``m_r, s_r, zy_r`` (reference) and the cross term ``u`` of one row chunk.

    ``u = sum exp(zr - m_r) ((zr - z) - (m_r - m))``; the rescaling rule and why this form is safe are
    in ``pygpo.ops.policy_ref_stats``. On request also the policy's ``t = sum exp(z - m) (z - m)``
    (entropy) and ``sz = sum z`` (mean logit); ``None`` otherwise.
    """

    def __init__(self, n: int, like: Tensor, req: StatRequest):
        acc = dict(device=like.device, dtype=acc_dtype(like))
        self.m: Optional[Tensor] = None
        self.m_r: Optional[Tensor] = None
        self.s, self.s_r, self.u = (torch.zeros(n, **acc) for _ in range(3))
        self.zy, self.zy_r = torch.zeros(n, **acc), torch.zeros(n, **acc)
        self.t = torch.zeros(n, **acc) if req.entropy else None
        self.sz = torch.zeros(n, **acc) if req.mean_logit else None

    def fold(self, z: Tensor, zr: Tensor, labels: Tensor, v0: int) -> None:
        """Fold one tile of policy logits ``z`` and reference logits ``zr`` (same columns); consumes both."""
        self.zy += label_logit(z, labels, v0)
        self.zy_r += label_logit(zr, labels, v0)
        if self.sz is not None:
            self.sz += z.sum(1)
        m_new, m_r_new = finite_max(z.amax(1)), finite_max(zr.amax(1))  # finite under masked tiles
        if self.m is not None:
            m_new = torch.maximum(self.m, m_new)
            m_r_new = torch.maximum(self.m_r, m_r_new)
            shift, shift_r = self.m - m_new, self.m_r - m_r_new  # both <= 0
            self.u.add_((shift_r - shift) * self.s_r).mul_(torch.exp(shift_r))
            if self.t is not None:
                self.t.add_(shift * self.s).mul_(torch.exp(shift))  # uses s before its own rescale
            self.s.mul_(torch.exp(shift))
            self.s_r.mul_(torch.exp(shift_r))
        # The difference of the two models' logits first, then of their maxima: see the stats docstring.
        diff = torch.sub(zr, z).sub_((m_r_new - m_new)[:, None])
        zc = z.sub_(m_new[:, None])
        if self.t is not None:
            weight = torch.exp(zc)
            self.t.add_(zc.clamp_min_(LOG_FLOOR).mul_(weight).sum(1))  # 0 log 0 = 0; zc is not needed after this
        else:
            weight = zc.exp_()
        self.s.add_(weight.sum(1))
        weight_r = zr.sub_(m_r_new[:, None]).exp_()
        self.s_r.add_(weight_r.sum(1))
        # 0 * (log 0 - log p) = 0 where the reference masks an entry (q = 0): diff is nan or -inf there
        self.u.add_(torch.where(weight_r > 0, diff.mul_(weight_r), 0.0).sum(1))
        self.m, self.m_r = m_new, m_r_new

    def finish(self, vocab: int) -> tuple[Optional[Tensor], ...]:
        """``(logprobs, ref_logprobs, kl, entropy, mean_logit, lse, lse_r)`` of the chunk (entropy and
        mean_logit ``None`` unless requested)."""
        log_s, log_s_r = torch.log(self.s), torch.log(self.s_r)
        lse, lse_r = self.m + log_s, self.m_r + log_s_r
        kl = self.u / self.s_r + log_s - log_s_r
        entropy = log_s - self.t / self.s if self.t is not None else None
        mean_logit = self.sz / vocab if self.sz is not None else None
        return self.zy - lse, self.zy_r - lse_r, kl, entropy, mean_logit, lse, lse_r


def _chunks(n: int, vocab: int, memory_budget: Optional[int]) -> Chunks:
    """Tile shape for two live tiles (policy and reference): each gets half of the budget."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    return choose_chunks(n, vocab, memory_budget=max(1, budget // 2))


class TorchPolicyRef(torch.autograd.Function):
    """``(M, D), (V, D), (V,)?, (M, D_ref), (V, D_ref), (V,)?, (M,) -> logprobs, ref_logprobs, kl, entropy,
    mean_logit`` (each ``(M,)``; the last two ``None`` unless requested, and never differentiable)."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, req: StatRequest,
                memory_budget):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None and costs nothing
        n, vocab = hidden.shape[0], weight.shape[0]
        chunks = _chunks(n, vocab, memory_budget)
        parts: list[tuple[Tensor, ...]] = []
        for r0 in range(0, n, chunks.rows):
            rows = slice(r0, r0 + chunks.rows)
            stats = _OnlineStats(hidden[rows].shape[0], hidden, req)
            for v0 in range(0, vocab, chunks.vocab):
                cols = slice(v0, v0 + chunks.vocab)
                z, _ = tile_logits(hidden[rows], weight, bias, cols, req)
                zr, _ = tile_logits(ref_hidden[rows], ref_weight, ref_bias, cols, req)
                stats.fold(z, zr, labels[rows], v0)
            parts.append(stats.finish(vocab))
        cat = [None if p[0] is None else torch.cat(p) for p in zip(*parts)]
        logprobs, ref_logprobs, kl, entropy, mean_logit, lse, lse_r = cat
        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, lse_r)
        ctx.req, ctx.chunks = req, chunks
        ctx.mark_non_differentiable(*(x for x in (ref_logprobs, entropy, mean_logit) if x is not None))
        return logprobs, ref_logprobs, kl, entropy, mean_logit

    @staticmethod
    @first_order_only
    @autocast_off
    def backward(ctx, g_lp, g_ref, g_kl, g_ent, g_mz):
        del g_ref, g_ent, g_mz  # ref_logprobs and the metrics are marked non-differentiable
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, lse, lse_r = ctx.saved_tensors
        req, chunks = ctx.req, ctx.chunks
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 9
        if g_lp is None and g_kl is None:
            return none
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = dict(device=hidden.device, dtype=acc_dtype(hidden))  # fp32, or fp64 for fp64 inputs
        d_params = grad_accumulators(hidden, weight, bias, need_h, need_w, need_b)
        g_lp = None if g_lp is None else g_lp.to(acc["dtype"])
        g_kl = None if g_kl is None else g_kl.to(acc["dtype"])
        # dz = p * (g_kl - g_lp) - g_kl * q + g_lp * onehot   (policy_ref_stats docstring)
        coef_p = torch.zeros(n, **acc)
        if g_kl is not None:
            coef_p += g_kl
        if g_lp is not None:
            coef_p -= g_lp

        for rows, v0, cols in chunks.tiles(n, vocab):
            h = hidden[rows]
            z, tanh = tile_logits(h, weight, bias, cols, req)
            dz = z.sub_(lse[rows, None]).exp_().mul_(coef_p[rows, None])  # p * (g_kl - g_lp), in place
            if g_kl is not None:
                zr, _ = tile_logits(ref_hidden[rows], ref_weight, ref_bias, cols, req)
                q = zr.sub_(lse_r[rows, None]).exp_()
                dz.sub_(q.mul_(g_kl[rows, None]))
            if g_lp is not None:
                add_label_grad(dz, labels[rows], v0, g_lp[rows])
            backprop_tile(dz, tanh, req, h, weight, rows, cols, d_params)
        return cast_grads(d_params, hidden, weight, bias) + none[3:]


def compute_policy_ref(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Optional[Tensor],
    labels: Tensor,
    req: StatRequest,
    *,
    memory_budget: Optional[int] = None,
    deterministic: bool = False,
) -> PolicyRefStats:
    """Backend entry point (contract in ``pygpo.ops.policy_ref_stats``); always deterministic.

    Args:
        hidden: ``(M, D)`` valid rows only; weight ``(V, D)``; bias ``(V,)`` or ``None``.
        ref_hidden: ``(M, D_ref)``; ref_weight ``(V, D_ref)``; ref_bias ``(V,)`` or ``None`` (never
            differentiated).
        labels: ``(M,)`` int64 in ``[0, V)``.
        req: ``temperature``, ``softcap``, and ``entropy`` / ``mean_logit`` (the policy's metrics to add;
            ``log_sum_p2`` is not read).
        memory_budget: bytes for the two live logit tiles together (bigger is faster).
    """
    del deterministic
    out = TorchPolicyRef.apply(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, req, memory_budget)
    return PolicyRefStats(*out)
