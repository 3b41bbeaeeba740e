"""``fused_pairwise_loss_head``: per-token log-probs to per-response scores to a pairwise loss, in one op.

Token ``t`` belongs to response ``r(t) = 2 i + k`` of pair ``i`` (``k = 0`` chosen, ``k = 1`` rejected);
``response_index`` lists ``r(t)`` in non-decreasing order (how packed batches lay out their targets).
With optional reference log-probs ``rp_t``, token weights ``w_t`` (detached) and per-response reference
scores ``R_r`` (e.g. from a cache):

    U_r   = sum_{t: r(t) = r} w_t (lp_t - rp_t)   [/ n_r with length_normalize]   - R_r
    z_i   = beta * (U_w - b * U_l) - margin
    loss  = mean_i f(z_i)

(LOSSES.md section 1, ``sum`` / ``mean`` / ``weighted`` reducers, and the logistic family of section 2)
with ``ls(z) = -log sigmoid(z)`` and the heads

    ``logistic``  ls(z)                                 DPO (Rafailov et al., 2023); b = lam is DPO-Shift
    ``smoothed``  (1 - eps) ls(z) + eps ls(-z)           cDPO (Mitchell, 2023); SimPO (Meng et al., 2024)
                                                        with margin = gamma, length_normalize, no reference
    ``robust``    [(1 - eps) ls(z) - eps ls(-z)] / (1 - 2 eps)   rDPO (Chowdhury et al., 2024)
    ``hinge``     relu(1 - z)                           SLiC-HF (Zhao et al., 2023), RSO hinge (Liu et al., 2023)
    ``ipo``       (z - 1/2)^2 / beta^2 = (h - 1/(2 beta))^2 at b = 1, margin = 0   IPO (Azar et al., 2023)

Backends: ``torch`` (index_add + elementwise torch, any device) and ``cuda`` (``pygpo._C``: one kernel
launch forward, one backward, for small-batch latency; ``csrc/loss_head.cu``). ``auto`` takes ``cuda``
on CUDA tensors when ``pygpo._C`` is installed (:data:`pygpo.ops.dispatch.PREFER_CUDA` names
``loss_head``: measured 1.9x faster than torch on an H100), else torch; Triton has no loss-head kernel,
so ``backend="triton"`` runs the torch implementation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _cuda
from .dispatch import resolve_backend
from .first_order import first_order_only
from .validation import check_finite, check_flags, check_positive, check_same_device, check_tensor, host_ints

#: Head names, in the order of the kernel's head codes (``csrc/pairwise_head.cuh``, ``enum Head``).
HEADS = ("logistic", "smoothed", "robust", "hinge", "ipo")
#: The heads that read ``eps``.
EPS_HEADS = ("smoothed", "robust")
_DTYPES = (torch.float32, torch.float64)
#: Lanes the host twin of the forward emulates (a warp per response on the GPU).
HOST_LANES = 32


class PairwiseHeadOutput(NamedTuple):
    """``loss``: scalar, the mean of ``per_example`` ``(B,)``; ``scores``: ``(B, 2)`` ``[U_w, U_l]``, detached."""

    loss: Tensor
    per_example: Tensor
    scores: Tensor


class HeadConfig(NamedTuple):
    head: str
    beta: float
    b: float
    margin: float
    eps: float
    length_normalize: bool


def fused_pairwise_loss_head(
    logps: Tensor,
    response_index: Tensor,
    num_pairs: int,
    *,
    ref_logps: Optional[Tensor] = None,
    token_weights: Optional[Tensor] = None,
    ref_scores: Optional[Tensor] = None,
    head: str = "logistic",
    beta: float = 0.1,
    b: float = 1.0,
    margin: float = 0.0,
    eps: float = 0.0,
    length_normalize: bool = False,
    backend: str = "auto",
    check_index: bool = True,
) -> PairwiseHeadOutput:
    """Segment-reduce per-token log-probs to per-response scores and apply a pairwise logistic-family head.

    Args:
        logps: ``(T,)`` float32 or float64 policy log-probs of the completion tokens (differentiable).
        response_index: ``(T,)`` integer, ``2 * pair + k`` (``k = 0`` chosen, ``1`` rejected), non-decreasing,
            values in ``[0, 2 * num_pairs)``.
        num_pairs: ``B``, the number of (chosen, rejected) pairs.
        ref_logps: optional ``(T,)`` reference log-probs (same dtype; differentiable if they require grad).
        token_weights: optional ``(T,)`` finite per-token weights ``w_t`` (detached; the ``weighted`` reducer).
        ref_scores: optional ``(B, 2)`` per-response reference scores subtracted after the reduction.
        head: one of :data:`HEADS` (see the module docstring).
        beta: positive finite scale of the margin. b: finite weight of the rejected score (1 for DPO).
        margin: finite, subtracted from ``z`` (SimPO's gamma). eps: label-smoothing / flip rate (``smoothed``:
            ``[0, 0.5]``, ``robust``: ``[0, 0.5)``; the other heads do not read it, and refuse ``eps != 0``).
        length_normalize: ``U`` is the token mean (``w``-weighted sum over ``n_r``) instead of the sum.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` (runs torch) or ``"cuda"``.
        check_index: verify the data (one host sync): ``response_index``'s range and order, that its largest
            value lies in the last pair (``num_pairs`` pairs, no trailing pair without tokens), and that
            ``token_weights`` are finite. Pass ``False`` only for inputs known to be valid: the cuda kernel's
            binary search assumes the order.

    Returns:
        :class:`PairwiseHeadOutput` with ``loss`` (scalar) and ``per_example`` ``(B,)`` in ``logps``' dtype.
        Responses without tokens score 0 (before ``ref_scores``).
    """
    cfg = head_config(head, beta=beta, b=b, margin=margin, eps=eps, length_normalize=length_normalize)
    check_flags(check_index=check_index)
    _check(logps, response_index, num_pairs, ref_logps, token_weights, ref_scores, check_index)
    # Triton has no loss-head kernel: "triton" means the torch implementation (whatever the device)
    name = "torch" if backend == "triton" else resolve_backend(backend, logps.device, op="loss_head")
    if name == "cuda":
        return cuda_loss_head(logps, response_index, num_pairs, ref_logps, token_weights, ref_scores, cfg)
    return torch_loss_head(logps, response_index, num_pairs, ref_logps, token_weights, ref_scores, cfg)


def head_config(head: str, *, beta: float, b: float, margin: float, eps: float, length_normalize: bool) -> HeadConfig:
    """The head's options checked: a known ``head``, ``beta`` positive and finite, ``b`` and ``margin`` finite
    (a nan or infinite one makes every loss nan or 0), ``eps`` in the head's range and 0 for the heads that
    do not read it (a silently ignored flip rate is a wrong loss), ``length_normalize`` a bool."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    beta = check_positive("beta", beta)
    b, margin, eps = check_finite("b", b), check_finite("margin", margin), check_finite("eps", eps)
    check_flags(length_normalize=length_normalize)
    if head == "smoothed" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"eps must lie in [0, 0.5] for head='smoothed', got {eps}")
    if head == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must lie in [0, 0.5) for head='robust', got {eps}")
    if head not in EPS_HEADS and eps != 0.0:
        raise ValueError(f"eps={eps} has no effect with head={head!r}: only {EPS_HEADS} read it; leave eps at 0")
    return HeadConfig(head, beta, b, margin, eps, length_normalize)


def _check(logps, index, num_pairs, ref_logps, weights, ref_scores, check_index: bool) -> None:
    check_tensor("logps", logps)
    if logps.dim() != 1 or logps.dtype not in _DTYPES:
        raise ValueError(f"logps must be a (T,) float32 or float64 tensor, got {tuple(logps.shape)} {logps.dtype}")
    check_tensor("response_index", index)
    if tuple(index.shape) != tuple(logps.shape) or index.dtype.is_floating_point or index.dtype.is_complex \
            or index.dtype == torch.bool:
        raise ValueError(f"response_index must be a (T,) = {tuple(logps.shape)} integer tensor, "
                         f"got {tuple(index.shape)} {index.dtype}")
    if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
    for name, t in (("ref_logps", ref_logps), ("token_weights", weights)):
        if t is not None:
            check_tensor(name, t)
            if t.shape != logps.shape or t.dtype != logps.dtype:
                raise ValueError(f"{name} must match logps: {tuple(logps.shape)} {logps.dtype}, got {tuple(t.shape)} {t.dtype}")
    if ref_scores is not None:
        check_tensor("ref_scores", ref_scores)
        if tuple(ref_scores.shape) != (num_pairs, 2) or ref_scores.dtype != logps.dtype:
            raise ValueError(f"ref_scores must be ({num_pairs}, 2) {logps.dtype}, got {tuple(ref_scores.shape)} {ref_scores.dtype}")
    check_same_device(logps=logps, response_index=index, ref_logps=ref_logps, token_weights=weights, ref_scores=ref_scores)
    if check_index:
        _check_data(index, num_pairs, weights)


def _check_data(index: Tensor, num_pairs: int, weights: Optional[Tensor]) -> None:
    """``response_index`` in range, non-decreasing and naming ``num_pairs`` pairs (its largest value in the
    last pair), and ``token_weights`` finite: read together, one host sync."""
    if index.numel() == 0:
        raise ValueError(f"response_index is empty (no tokens), so it names no pair, but num_pairs={num_pairs}")
    decreasing = (index[1:] < index[:-1]).sum()
    bad_weights = index.new_zeros(()) if weights is None else (~torch.isfinite(weights)).sum()
    lo, hi, n_decreasing, n_bad_weights = host_ints(index.min(), index.max(), decreasing, bad_weights)
    if lo < 0 or hi >= 2 * num_pairs:
        raise ValueError(f"response_index values must lie in [0, 2 * num_pairs) = [0, {2 * num_pairs}), "
                         f"found {lo if lo < 0 else hi}")
    if n_decreasing:
        raise ValueError("response_index must be non-decreasing (each response's tokens contiguous, responses in order)")
    if hi // 2 + 1 != num_pairs:
        raise ValueError(f"num_pairs={num_pairs}, but response_index's largest value {hi} is in pair {hi // 2}: "
                         f"it names {hi // 2 + 1} pair(s), and pairs past the last one it names would have no tokens")
    if n_bad_weights:
        raise ValueError(f"token_weights must be finite, found {n_bad_weights} nan or infinite value(s)")


def _ls(x: Tensor) -> Tensor:
    """``-log sigmoid(x)``."""
    return F.softplus(-x)


def _head_fn(z: Tensor, cfg: HeadConfig) -> Tensor:
    ls = _ls
    if cfg.head == "logistic":
        return ls(z)
    if cfg.head == "smoothed":
        return (1 - cfg.eps) * ls(z) + cfg.eps * ls(-z)
    if cfg.head == "robust":
        return ((1 - cfg.eps) * ls(z) - cfg.eps * ls(-z)) / (1 - 2 * cfg.eps)
    if cfg.head == "hinge":
        return torch.relu(1 - z)
    return ((z - 0.5) / cfg.beta) ** 2  # ipo


def torch_loss_head(logps, index, num_pairs, ref_logps, weights, ref_scores, cfg: HeadConfig) -> PairwiseHeadOutput:
    """The torch implementation (any device, any order of ``index`` within the range)."""
    u = logps if ref_logps is None else logps - ref_logps
    if weights is not None:
        u = u * weights.detach()
    index = index.long()
    sums = u.new_zeros(2 * num_pairs).index_add(0, index, u)
    if cfg.length_normalize:
        counts = torch.bincount(index, minlength=2 * num_pairs).clamp(min=1).to(u.dtype)
        sums = sums / counts
    scores = sums.view(num_pairs, 2)
    if ref_scores is not None:
        scores = scores - ref_scores
    z = cfg.beta * (scores[:, 0] - cfg.b * scores[:, 1]) - cfg.margin
    per_example = _head_fn(z, cfg)
    return PairwiseHeadOutput(per_example.mean(), per_example, scores.detach())


class _CudaHead(torch.autograd.Function):
    """``(logps, ref_logps?, weights?, ref_scores?, index) -> (loss, per_example, scores)`` via ``pygpo._C``."""

    @staticmethod
    def forward(ctx, logps, ref_logps, weights, ref_scores, index, num_pairs, cfg):
        ctx.set_materialize_grads(False)
        args = _head_args(logps, ref_logps, weights, ref_scores, index, num_pairs, cfg)
        like = dict(device=logps.device, dtype=logps.dtype)
        scores, per_example = torch.empty(num_pairs, 2, **like), torch.empty(num_pairs, **like)
        loss, counts = torch.empty((), **like), torch.empty(2 * num_pairs, device=logps.device, dtype=torch.int64)
        outputs = _cuda.make("HeadOutputs", scores=scores.data_ptr(), counts=counts.data_ptr(),
                             per_example=per_example.data_ptr(), loss=loss.data_ptr())
        _launch("head_fwd", logps, args, outputs)
        ctx.save_for_backward(logps, ref_logps, weights, ref_scores, index, scores, counts)
        ctx.num_pairs, ctx.cfg = num_pairs, cfg
        ctx.mark_non_differentiable(scores)
        return loss, per_example, scores

    @staticmethod
    @first_order_only
    def backward(ctx, g_loss, g_per_example, _g_scores):
        logps, ref_logps, weights, ref_scores, index, scores, counts = ctx.saved_tensors
        need_lp, need_ref, _, need_rs = ctx.needs_input_grad[:4]
        if g_loss is None and g_per_example is None:
            return (None,) * 7
        args = _head_args(logps, ref_logps, weights, ref_scores, index, ctx.num_pairs, ctx.cfg)
        d_lp = torch.empty_like(logps) if need_lp else None
        d_ref = torch.empty_like(logps) if need_ref else None
        d_rs = torch.empty(ctx.num_pairs, 2, device=logps.device, dtype=logps.dtype) if need_rs else None
        saved = _cuda.make("HeadOutputs", scores=scores.data_ptr(), counts=counts.data_ptr())
        # held in locals until the launch: the kernel gets addresses only
        g_loss = None if g_loss is None else g_loss.to(logps.dtype).contiguous()
        g_per_example = None if g_per_example is None else g_per_example.to(logps.dtype).contiguous()
        grads = _cuda.make("HeadGrads", g_loss=_cuda.ptr(g_loss), g_per_example=_cuda.ptr(g_per_example),
                           d_logps=_cuda.ptr(d_lp), d_ref=_cuda.ptr(d_ref), d_ref_scores=_cuda.ptr(d_rs))
        _launch("head_bwd", logps, args, saved, grads)
        return d_lp, d_ref, None, d_rs, None, None, None


def _head_args(logps, ref_logps, weights, ref_scores, index, num_pairs, cfg: HeadConfig):
    return _cuda.make(
        "HeadArgs", dtype=_cuda.DTYPE_CODES[logps.dtype], logps=logps.data_ptr(), ref=_cuda.ptr(ref_logps),
        weights=_cuda.ptr(weights), index=index.data_ptr(), tokens=logps.numel(), pairs=num_pairs,
        ref_scores=_cuda.ptr(ref_scores), head=HEADS.index(cfg.head), beta=cfg.beta, b=cfg.b, margin=cfg.margin,
        eps=cfg.eps, normalize=int(cfg.length_normalize),
    )


def _launch(kind: str, like: Tensor, *structs) -> None:
    """Kernel ``kind`` on ``like``'s CUDA device and stream, or its host twin for CPU tensors (tests)."""
    if like.is_cuda:
        _cuda.launch(kind, like, *structs)
        return
    c = _cuda.require()
    if kind == "head_fwd":
        c.host_head_fwd(*structs, HOST_LANES)
    else:
        c.host_head_bwd(*structs)


def cuda_loss_head(logps, index, num_pairs, ref_logps, weights, ref_scores, cfg: HeadConfig) -> PairwiseHeadOutput:
    """The ``pygpo._C`` implementation; ``index`` must be non-decreasing. CPU tensors run the host twins."""
    contig = [None if t is None else t.contiguous() for t in (logps, ref_logps, weights, ref_scores)]
    logps, ref_logps, weights, ref_scores = contig
    weights = None if weights is None else weights.detach()
    loss, per_example, scores = _CudaHead.apply(logps, ref_logps, weights, ref_scores, index.long().contiguous(),
                                                num_pairs, cfg)
    return PairwiseHeadOutput(loss, per_example, scores)
