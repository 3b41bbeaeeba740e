"""Fused forward of two models: policy and reference log-probs of the label and ``KL(p_ref || p_theta)``.

For each row ``i`` the policy has hidden state ``h_i`` (``D`` wide) and the reference ``hr_i``
(``D_REF`` wide); both project onto the same ``V`` vocabulary entries:

    z_v  = T(h_i . W_v + b_v),      zr_v = T(hr_i . Wr_v + br_v),      T(r) = softcap * tanh(r / softcap) / temperature
    logprob = z_y - lse,  ref_logprob = zr_y - lse_r,  kl = sum_v q_v (zr_v - z_v) - lse_r + lse   (q = softmax(zr))

Each program owns ``BLOCK_N`` rows and a contiguous vocabulary range (a *split*), walks it in
``BLOCK_V`` tiles and, per tile, computes both logit tiles in registers (two ``tl.dot`` loops over
``D`` and ``D_REF``) and folds them into running per-row statistics; neither ``N x V`` matrix reaches
global memory. The statistics (derivation in ``pygpo.ops.policy_ref_stats``, which this layer does
not import) are

    m, s = sum exp(z - m), zy          (policy)
    m_r, s_r = sum exp(zr - m_r), zy_r (reference)
    u = sum exp(zr - m_r) ((zr - z) - (m_r - m))

with ``kl = u / s_r + log s - log s_r``. When a tile raises the maxima, with ``d = m - m'`` and
``d_r = m_r - m_r'``: ``u <- exp(d_r) (u + (d_r - d) s_r)``, ``s <- exp(d) s``, ``s_r <- exp(d_r) s_r``.

Optionally (``WANT_ENTROPY``, ``WANT_MEAN``: compiled out when not requested) the policy's
``t = sum exp(z - m) (z - m)``, rescaled as ``t <- exp(d) (t + d s)``, and ``sz = sum z`` give its
entropy ``log s - t / s`` and mean logit ``sz / V``, metrics read from the same logit tiles.

Each split writes its partial ``(m, s, zy, m_r, s_r, zy_r, u[, t[, sz]])`` to a ``(K, splits, N)``
buffer (``K`` = 7, 8 or 9 rows, as requested); a few torch ops merge the splits with the same rule (the
split-vocabulary scheme of ``linear_logprob_fwd``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .linear_logprob_fwd import vocab_splits
from .logit_tile import transformed_logit_tile
from .online_softmax import empty_stats, fold_logit_tile, label_logit, online_step, split_program, store_stats
from .utils import autotune, logit_dot_options, transform_args

# Rows of the partial-statistics buffer ``PART[k, split, row]`` (spelled as literals in the kernel).
_M, _S, _ZY, _MR, _SR, _ZYR, _U, _T, _SZ = range(9)


@autotune(key=["V", "D", "D_REF", "WANT_ENTROPY", "WANT_MEAN"])
@triton.jit
def policy_ref_fwd_kernel(
    H, W, B, HR, WR, BR, Y, PART,
    N, V, D, D_REF, V_PER_SPLIT, stride_stat,
    stride_hn, stride_hd, stride_wv, stride_wd,
    stride_rhn, stride_rhd, stride_rwv, stride_rwd,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, WANT_MEAN: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(pid_n, pid_s)``: rows ``[pid_n*BLOCK_N, +BLOCK_N)``, vocabulary ``[pid_s*V_PER_SPLIT, +V_PER_SPLIT)``.

    Writes ``PART[k, pid_s, row]`` for the seven statistics ``k`` of the module docstring, and ``t``
    (``k = 7``) and ``sz`` (``k = 8``) when ``WANT_ENTROPY`` / ``WANT_MEAN``.
    """
    rows, row_mask, labels, v_start, v_end, out = split_program(Y, PART, N, V, V_PER_SPLIT, BLOCK_N)

    m, s, zy, t, sz = empty_stats(BLOCK_N)
    m_r, s_r, zy_r, _t_r, _sz_r = empty_stats(BLOCK_N)  # the reference keeps no t, sz
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z, _th = transformed_logit_tile(
            H, W, B, rows, cols, row_mask, col_mask, D,
            stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_temp,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        zr, _thr = transformed_logit_tile(
            HR, WR, BR, rows, cols, row_mask, col_mask, D_REF,
            stride_rhn, stride_rhd, stride_rwv, stride_rwd, softcap, inv_temp,
            HAS_REF_BIAS, HAS_SOFTCAP, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )

        # The policy's statistics (and its metrics), then the reference's and u.
        m, s, zy, t, sz, shift, _e = fold_logit_tile(z, cols, col_mask, labels, m, s, zy, t, sz,
                                                     WANT_ENTROPY, WANT_MEAN)
        zy_r += label_logit(zr, cols, labels, col_mask)
        m_r_new, shift_r, _zc_r, e_r = online_step(m_r, zr, col_mask)  # e_r is 0 on padded columns
        r_r = tl.exp(shift_r)
        # Logit difference first, then the maxima's difference: nothing of the logits' size cancels.
        diff = tl.where(col_mask[None, :], (zr - z) - (m_r_new - m)[:, None], 0.0)
        # 0 * (log 0 - log p) = 0 where the reference masks an entry (e_r = 0, diff nan or -inf)
        u_tile = tl.sum(tl.where(e_r > 0.0, e_r * diff, 0.0), axis=1)
        u = r_r * (u + (shift_r - shift) * s_r) + u_tile  # uses s_r before this tile
        s_r = s_r * r_r + tl.sum(e_r, axis=1)
        m_r = m_r_new

    # Partial statistics of this split: row k of PART (K, splits, N) at out + k * stride_stat; the policy's m, s,
    # zy in rows 0-2, t in row 7 and sz in row 8 (_T, _SZ), the reference's m_r, s_r, zy_r and u in rows 3-6.
    store_stats(out, stride_stat, row_mask, m, s, zy, t, sz, 7, 8, WANT_ENTROPY, WANT_MEAN)
    tl.store(out + 3 * stride_stat, m_r, mask=row_mask)  # m_r
    tl.store(out + 4 * stride_stat, s_r, mask=row_mask)  # s_r
    tl.store(out + 5 * stride_stat, zy_r, mask=row_mask)  # zy_r
    tl.store(out + 6 * stride_stat, u, mask=row_mask)  # u


class PolicyRefForward(NamedTuple):
    """Per-row results of :func:`policy_ref_fwd`, each ``(N,)`` float32 (``None`` if not asked for)."""

    logprobs: Tensor
    ref_logprobs: Tensor
    kl: Tensor
    lse: Tensor  # the backward needs both log-sum-exps
    ref_lse: Tensor
    entropy: Optional[Tensor] = None  # the policy's, with entropy=True
    mean_logit: Optional[Tensor] = None  # the policy's, with mean_logit=True


def policy_ref_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    ref_hidden: Tensor,
    ref_weight: Tensor,
    ref_bias: Optional[Tensor],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    entropy: bool = False,
    mean_logit: bool = False,
    vocab_per_split: Optional[int] = None,
) -> PolicyRefForward:
    """Launch the fused two-model forward.

    Args:
        hidden: ``(N, D)`` fp32/fp16/bf16, any strides; weight ``(V, D)`` and bias ``(V,)``/``None`` alike.
        ref_hidden: ``(N, D_ref)``, ref_weight ``(V, D_ref)``, ref_bias ``(V,)``/``None``, hidden's dtype.
        labels: ``(N,)`` integer, every value in ``[0, V)`` (not checked here).
        temperature, softcap: logit transform, the same for both models.
        entropy, mean_logit: also compute the policy's entropy / mean logit; each one not asked for is
            compiled out of the kernel.
        vocab_per_split: override of ``choose_vocab_split`` (a multiple of ``VOCAB_ALIGN``).

    Returns:
        :class:`PolicyRefForward` of ``(N,)`` float32 tensors.
    """
    n, d = hidden.shape
    d_ref = ref_hidden.shape[1]
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    if n == 0:
        return PolicyRefForward(*(torch.zeros(0, **f32) for _ in range(5)),
                                entropy=torch.zeros(0, **f32) if entropy else None,
                                mean_logit=torch.zeros(0, **f32) if mean_logit else None)

    per_split, splits = vocab_splits(n, vocab, dev, vocab_per_split)
    # only the rows asked for: t at _T, sz at _SZ (the kernel leaves unrequested rows alone)
    part = torch.empty((_SZ + 1 if mean_logit else _T + 1 if entropy else _U + 1, splits, n), **f32)
    labels = labels.contiguous()
    # the kernel reads biases with stride 1; an absent one is replaced by any valid pointer
    bias = bias.contiguous() if bias is not None else None
    ref_bias = ref_bias.contiguous() if ref_bias is not None else None

    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    policy_ref_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden,
        ref_hidden, ref_weight, ref_bias if ref_bias is not None else ref_hidden,
        labels, part,
        n, vocab, d, d_ref, per_split, splits * n,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        ref_hidden.stride(0), ref_hidden.stride(1), ref_weight.stride(0), ref_weight.stride(1),
        *transform_args(softcap, temperature),
        HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, HAS_SOFTCAP=softcap is not None,
        WANT_ENTROPY=entropy, WANT_MEAN=mean_logit,
        **logit_dot_options(hidden.dtype),
    )
    return _merge_splits(part, vocab, entropy, mean_logit)


def _merge_splits(part: Tensor, vocab: int, entropy: bool, mean_logit: bool) -> PolicyRefForward:
    """Combine the ``(K, splits, N)`` partial statistics into final per-row values.

    With global maxima ``M = max_k m_k``, ``M_r = max_k m_r_k`` and shifts ``d_k = m_k - M``,
    ``d_r_k = m_r_k - M_r``: ``s = sum_k exp(d_k) s_k``, ``s_r = sum_k exp(d_r_k) s_r_k``,
    ``u = sum_k exp(d_r_k) (u_k + (d_r_k - d_k) s_r_k)`` and ``t = sum_k exp(d_k) (t_k + d_k s_k)``;
    the labels' logits and ``sz`` simply add up.
    """
    shift = part[_M] - part[_M].amax(0)  # (splits, N), <= 0 and finite
    shift_r = part[_MR] - part[_MR].amax(0)
    r, r_r = torch.exp(shift), torch.exp(shift_r)
    s = (part[_S] * r).sum(0)
    s_r = (part[_SR] * r_r).sum(0)
    u = ((part[_U] + (shift_r - shift) * part[_SR]) * r_r).sum(0)
    log_s, log_s_r = torch.log(s), torch.log(s_r)
    lse = part[_M].amax(0) + log_s
    ref_lse = part[_MR].amax(0) + log_s_r
    ent = None
    if entropy:
        ent = log_s - ((part[_T] + shift * part[_S]) * r).sum(0) / s
    return PolicyRefForward(
        logprobs=part[_ZY].sum(0) - lse,
        ref_logprobs=part[_ZYR].sum(0) - ref_lse,
        kl=u / s_r + log_s - log_s_r,
        lse=lse,
        ref_lse=ref_lse,
        entropy=ent,
        mean_logit=part[_SZ].sum(0) / vocab if mean_logit else None,
    )
