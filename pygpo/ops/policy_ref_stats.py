"""Per-token statistics of a policy and a reference model read in one pass, and the math they share.

A backend receives the *valid* rows only (ignored rows were compacted away by the caller). For row
``i`` the policy has hidden state ``h_i`` (``D`` wide) and the reference ``hr_i`` (``D_ref`` wide, which
may differ from ``D``); both project onto the same vocabulary of ``V`` entries, and ``y_i`` is the label:

    z_v  = T(h_i . W_v + b_v)        zr_v = T(hr_i . Wr_v + br_v)        (v = 0 .. V-1)
    T(r) = softcap * tanh(r / softcap) / temperature   (or r / temperature without a softcap)
    lse  = log sum_v exp(z_v)         lse_r = log sum_v exp(zr_v)
    p    = softmax(z) (policy)        q     = softmax(zr) (reference, ``p_ref``)

    logprobs     = z_y - lse
    ref_logprobs = zr_y - lse_r
    kl           = KL(q || p) = sum_v q_v (log q_v - log p_v) = sum_v q_v (zr_v - z_v) - lse_r + lse

Gradients. The reference is a constant: ``ref_logprobs`` is not differentiable and nothing flows to
the reference's hidden states, weight or bias, even when they require grad. With upstream gradients
``g_lp`` (logprobs) and ``g_kl`` (kl), one scalar per row (either may be absent),

    d logprobs / dz_v = 1[v = y] - p_v,        d kl / dz_v = p_v - q_v
    dz_v = g_lp (1[v = y] - p_v) + g_kl (p_v - q_v) = p_v (g_kl - g_lp) - g_kl q_v + g_lp 1[v = y]

and, as for one model, ``dRaw_v = dz_v / temperature * (1 - tanh^2(raw_v / softcap))`` (the last factor
only with a softcap), ``dH = dRaw @ W``, ``dW = dRaw^T @ H``, ``db = sum_rows dRaw``.

Online form used by every backend. Over vocabulary tiles a row keeps the running maxima ``m`` (of
``z``) and ``m_r`` (of ``zr``), the labels' logits ``zy``, ``zy_r`` and

    s   = sum_v exp(z_v - m)
    s_r = sum_v exp(zr_v - m_r)
    u   = sum_v exp(zr_v - m_r) [(zr_v - z_v) - (m_r - m)]

Then ``lse = m + log s``, ``lse_r = m_r + log s_r``, and since ``sum_v q_v (zr_v - z_v) = u / s_r + m_r - m``,

    kl = u / s_r + (m_r - m) - lse_r + lse = u / s_r + log s - log s_r.

Why this form: every weight ``exp(zr - m_r)`` lies in ``(0, 1]`` (no overflow for any logits), and each
term of ``u`` is the difference of the two models' logits at one entry minus the difference of their
maxima, formed before anything is summed. Nothing of the size of the logits cancels, which matters in
the common case of a policy close to its reference (a small KL); for identical models ``u`` is 0 and
``s = s_r`` exactly, so the KL is exactly 0. (Keeping ``t_r = sum exp(zr - m_r)(zr - m_r)`` and
``c = sum exp(zr - m_r)(z - m)`` apart would subtract two O(log V) numbers instead.)

Masked vocabulary. Entries whose logit is ``-inf`` (a ``-inf`` bias) have ``p_v = 0`` or ``q_v = 0``
exactly. With the convention ``0 log 0 = 0``, an entry the reference masks adds ``q_v (...) = 0`` to the
KL (both models masking the same entries give a finite KL), while one only the policy masks makes it
``+inf``, as the definition says. Backends drop the terms of ``u`` whose weight ``exp(zr - m_r)`` is 0
and keep the running maxima and the entropy's ``z - m`` finite as described in
:mod:`pygpo.ops.token_stats`.

Rescaling. When a tile raises the maxima to ``m'``, ``m_r'``, with ``d = m - m' <= 0`` and
``d_r = m_r - m_r' <= 0``, every old weight is multiplied by ``exp(d)`` (policy) or ``exp(d_r)`` (reference)
and every old bracket gains ``d_r - d``:

    u <- exp(d_r) (u + (d_r - d) s_r)        (with s_r before its own update)
    s <- exp(d) s,     s_r <- exp(d_r) s_r

The same rule merges partial statistics computed over disjoint vocabulary ranges (splits), with the
global maxima in place of ``m'`` and ``m_r'``.

Optional policy metrics. On request the same pass also yields two statistics of the policy alone
(definitions as in :mod:`pygpo.ops.token_stats`):

    entropy    = -sum_v p_v log p_v = lse - sum_v p_v z_v
    mean_logit = (1 / V) sum_v z_v

from two more running sums, ``t = sum_v exp(z_v - m) (z_v - m)`` (kept relative to the max, so the
entropy ``log s - t / s`` never subtracts two numbers of the logits' size) and ``sz = sum_v z_v``. When
the policy's max moves by ``d <= 0``: ``t <- exp(d) (t + d s)`` (with ``s`` before its own update);
``sz`` needs no rescaling. Both are metrics: they are not differentiable, and a backend that was not
asked for them does no work for them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class PolicyRefStats(NamedTuple):
    """Per-valid-row results of a backend, each ``(M,)`` float32 (float64 from the torch
    backend for float64 inputs; the optional ones ``None`` unless requested).

    ``logprobs`` and ``kl`` are differentiable w.r.t. the policy's hidden states, weight and bias;
    ``ref_logprobs``, ``entropy`` and ``mean_logit`` are not differentiable.
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    kl: Tensor
    entropy: Optional[Tensor] = None  # policy entropy, when StatRequest.entropy
    mean_logit: Optional[Tensor] = None  # policy mean logit, when StatRequest.mean_logit
