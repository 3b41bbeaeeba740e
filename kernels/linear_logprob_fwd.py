"""Fused forward: ``hidden @ weight.T`` -> per-row log-prob of the label and softmax statistics.

For each row ``i`` (a hidden state ``h_i`` with label ``y_i``) and each vocabulary entry ``v``:

    raw_v = h_i . W_v + b_v,    z_v = softcap * tanh(raw_v / softcap) / temperature   (softcap optional)
    lse = log sum_v exp(z_v),   logprob = z_y - lse

and optionally the entropy ``lse - sum_v p_v z_v``, ``log sum_v p_v^2`` and the mean logit.

The ``N x V`` logits never reach global memory. Each program owns a block of ``BLOCK_N`` rows and a
contiguous range of the vocabulary (a *split*); it walks that range in ``BLOCK_V`` tiles, computes
each tile of logits in registers (``tl.dot`` over ``D`` in ``BLOCK_D`` steps, fp32 accumulator) and
folds it into running per-row statistics, the online softmax of Milakov & Gimelshein (2018, "Online
normalizer calculation for softmax") extended with the entropy and sum-of-squares terms:

    m  = running max of z
    s  = sum exp(z - m)            t  = sum exp(z - m) (z - m)
    s2 = sum exp(2 (z - m))        sz = sum z,        zy = z at the label (0 if not in range)

When the max grows from ``m`` to ``m'``, with ``r = exp(m - m')``: ``s <- r s``, ``s2 <- r^2 s2`` and
``t <- r (t + (m - m') s)`` (each term's ``z - m`` becomes ``z - m'``). Keeping ``t`` relative to the
max means the entropy ``log s - t / s`` never subtracts two numbers of the size of the logits.

Splitting the vocabulary across programs (as in Flash-Decoding's split-K) fills the GPU when there
are few row blocks. Each program writes its partial ``(m, s, zy, t, s2, sz)`` to a small
``(6, splits, N)`` buffer; a few torch ops merge the splits with the same rescaling rule. The design
follows Cut Cross-Entropy (Wijmans et al., 2024, "Cut Your Losses in Large-Vocabulary Language
Models"): compute logits blockwise in on-chip memory and reduce them there.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .logit_tile import transformed_logit_tile
from .online_softmax import empty_stats, fold_logit_tile, split_program, store_stats
from .utils import VOCAB_ALIGN, autotune, logit_dot_options, num_sms, transform_args

# Rows of the partial-statistics buffer ``PART[k, split, row]`` (the kernel spells them as literals:
# a jitted function cannot read plain Python globals).
_M, _S, _ZY, _T, _S2, _SZ = range(6)


@autotune(key=["V", "D", "WANT_ENTROPY", "WANT_SUM_P2", "WANT_MEAN"])
@triton.jit
def linear_logprob_fwd_kernel(
    H, W, B, Y, PART,
    N, V, D, V_PER_SPLIT, stride_stat,
    stride_hn, stride_hd, stride_wv, stride_wd,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, WANT_SUM_P2: tl.constexpr, WANT_MEAN: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(pid_n, pid_s)``: rows ``[pid_n*BLOCK_N, +BLOCK_N)``, vocabulary ``[pid_s*V_PER_SPLIT, +V_PER_SPLIT)``.

    Writes ``PART[k, pid_s, row]`` for the statistics ``k`` it was asked for (see module docstring).
    """
    rows, row_mask, labels, v_start, v_end, out = split_program(Y, PART, N, V, V_PER_SPLIT, BLOCK_N)

    m, s, zy, t, sz = empty_stats(BLOCK_N)
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z, _th = transformed_logit_tile(
            H, W, B, rows, cols, row_mask, col_mask, D,
            stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_temp,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, INPUT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        m, s, zy, t, sz, shift, e = fold_logit_tile(z, cols, col_mask, labels, m, s, zy, t, sz,
                                                    WANT_ENTROPY, WANT_MEAN)
        if WANT_SUM_P2:  # rescaled by r^2, plus e^2 (e is 0 on padded columns)
            r = tl.exp(shift)
            s2 = s2 * (r * r) + tl.sum(e * e, axis=1)

    # Partial statistics of this split: row k of PART (6, splits, N) at out + k * stride_stat; m, s, zy in
    # rows 0-2, t in row 3 and sz in row 5 (_T, _SZ), s2 in row 4 (_S2).
    store_stats(out, stride_stat, row_mask, m, s, zy, t, sz, 3, 5, WANT_ENTROPY, WANT_MEAN)
    if WANT_SUM_P2:
        tl.store(out + 4 * stride_stat, s2, mask=row_mask)  # s2


class ForwardStats(NamedTuple):
    """Per-row results of :func:`linear_logprob_fwd`, each ``(N,)`` float32, ``None`` if not asked for."""

    logprobs: Tensor
    lse: Tensor
    entropy: Optional[Tensor]
    log_sum_p2: Optional[Tensor]
    mean_logit: Optional[Tensor]
    is_top1: Optional[Tensor] = None


def choose_vocab_split(n_rows: int, vocab: int, device: torch.device) -> int:
    """Vocabulary entries per program: a multiple of ``VOCAB_ALIGN`` giving about two programs per SM.

    With many rows the row blocks alone fill the GPU and each program walks the whole vocabulary
    (one split, no merge); with few rows the vocabulary is cut into more splits.
    """
    row_blocks = triton.cdiv(max(n_rows, 1), 128)
    splits = max(1, min(triton.cdiv(2 * num_sms(device), row_blocks), triton.cdiv(vocab, VOCAB_ALIGN)))
    return triton.cdiv(triton.cdiv(vocab, splits), VOCAB_ALIGN) * VOCAB_ALIGN


def vocab_splits(n_rows: int, vocab: int, device: torch.device, vocab_per_split: Optional[int]) -> tuple[int, int]:
    """``(vocabulary entries per split, number of splits)``, from :func:`choose_vocab_split` unless the
    caller's ``vocab_per_split`` (a multiple of ``VOCAB_ALIGN``) overrides it."""
    per_split = vocab_per_split or choose_vocab_split(n_rows, vocab, device)
    if per_split % VOCAB_ALIGN:
        raise ValueError(f"vocab_per_split must be a multiple of {VOCAB_ALIGN}, got {per_split}")
    return per_split, triton.cdiv(vocab, per_split)  # every split holds at least one vocabulary entry


def linear_logprob_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    entropy: bool = False,
    log_sum_p2: bool = False,
    mean_logit: bool = False,
    vocab_per_split: Optional[int] = None,
    top1: bool = False,
) -> ForwardStats:
    """Launch the fused forward.

    Args:
        hidden: ``(N, D)`` fp32/fp16/bf16, any strides.
        weight: ``(V, D)``, same dtype as ``hidden``, any strides.
        bias: ``(V,)`` or ``None``.
        labels: ``(N,)`` integer, every value in ``[0, V)`` (not checked here).
        temperature, softcap: logit transform ``z = softcap * tanh(raw / softcap) / temperature``.
        entropy, log_sum_p2, mean_logit: which optional statistics to compute; each one not asked for
            is compiled out of the kernel.
        vocab_per_split: override of :func:`choose_vocab_split` (a multiple of ``VOCAB_ALIGN``).
        top1: also return ``is_top1`` (1.0 where the label's logit is the row's largest), from the
            merged maximum and label logit; no kernel work.

    Returns:
        :class:`ForwardStats` of ``(N,)`` float32 tensors.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    if n == 0:
        empty = torch.zeros(0, **f32)
        return ForwardStats(empty, empty.clone(), empty.clone() if entropy else None,
                            empty.clone() if log_sum_p2 else None, empty.clone() if mean_logit else None,
                            empty.clone() if top1 else None)

    per_split, splits = vocab_splits(n, vocab, dev, vocab_per_split)
    part = torch.empty((6, splits, n), **f32)
    labels = labels.contiguous()
    bias = bias.contiguous() if bias is not None else None  # the kernel reads it with stride 1

    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
    linear_logprob_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, labels, part,
        n, vocab, d, per_split, splits * n,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        *transform_args(softcap, temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        WANT_ENTROPY=entropy, WANT_SUM_P2=log_sum_p2, WANT_MEAN=mean_logit,
        **logit_dot_options(hidden.dtype),
    )
    return _merge_splits(part, vocab, entropy, log_sum_p2, mean_logit, top1)


def _merge_splits(part: Tensor, vocab: int, entropy: bool, log_sum_p2: bool, mean_logit: bool,
                  top1: bool = False) -> ForwardStats:
    """Combine the ``(6, splits, N)`` partial statistics into final per-row values.

    Same rescaling as inside the kernel, with ``M`` the global max: ``s = sum_k r_k s_k``,
    ``t = sum_k r_k (t_k + (m_k - M) s_k)``, ``s2 = sum_k r_k^2 s2_k`` with ``r_k = exp(m_k - M)``.
    """
    m = part[_M]
    m_max = m.amax(0)
    shift = m - m_max  # (splits, N), <= 0 and finite
    r = torch.exp(shift)
    s = (part[_S] * r).sum(0)
    log_s = torch.log(s)
    lse = m_max + log_s
    zy = part[_ZY].sum(0)  # only the split holding the label contributes
    logprobs = zy - lse
    ent = None
    if entropy:
        t = ((part[_T] + shift * part[_S]) * r).sum(0)
        ent = log_s - t / s
    lsp2 = None
    if log_sum_p2:
        lsp2 = torch.log((part[_S2] * (r * r)).sum(0)) - 2.0 * log_s
    mz = part[_SZ].sum(0) / vocab if mean_logit else None
    is_top1 = (zy >= m_max).float() if top1 else None  # the label's logit is the row's largest
    return ForwardStats(logprobs, lse, ent, lsp2, mz, is_top1)
