"""Section 1 of LOSSES.md: reducers from per-token log-probs to sequence scores.

A reducer maps per-token values ``(B, K, T)`` (or any ``(..., T)`` for the pair-independent ones)
and a boolean completion mask of the same shape to scores ``(B, K)``. Policy and reference must go
through the same reducer with the same token subset: :func:`reduce_pair` guarantees that, including
for the random subset of ``sampled``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from .constraints import UNIT, Interval
from .errors import InputShapeError, InputValueError, MissingInputError
from .registry import LossInput, register

_MASK = LossInput("mask", (("B", "K", "T"),), "completion-token mask (bool), same shape as the per-token values", dtype="bool")
_REDUCER_SCORES = (("B", "K", "T"),)


def _check_mask(token_logps: Tensor, mask: Tensor) -> Tensor:
    if mask.shape != token_logps.shape:
        raise InputShapeError(f"mask has shape {tuple(mask.shape)}, per-token values have {tuple(token_logps.shape)}")
    return mask.bool()


def _masked(token_logps: Tensor, mask: Tensor) -> Tensor:
    # where() rather than a product so that padded NaN/inf never leak into the sum
    return torch.where(mask, token_logps, torch.zeros((), dtype=token_logps.dtype, device=token_logps.device))


@register(
    "sum",
    section=1,
    kind="reducer",
    paper="Direct Preference Optimization (Rafailov et al., 2023)",
    formula="sum_t lp_t",
    inputs=(_MASK,),
    scores=_REDUCER_SCORES,
)
def reduce_sum(token_logps: Tensor, mask: Tensor) -> Tensor:
    """``sum_t lp_t`` over completion tokens."""
    mask = _check_mask(token_logps, mask)
    return _masked(token_logps, mask).sum(dim=-1)


@register(
    "mean",
    section=1,
    kind="reducer",
    paper="SimPO (Meng et al., 2024); IPO as in TRL; ORPO (Hong et al., 2024)",
    formula="sum_t lp_t / |y|",
    inputs=(_MASK,),
    scores=_REDUCER_SCORES,
)
def reduce_mean(token_logps: Tensor, mask: Tensor) -> Tensor:
    """``sum_t lp_t / |y|``; every response needs at least one completion token."""
    mask = _check_mask(token_logps, mask)
    count = mask.sum(dim=-1)
    if bool((count == 0).any()):
        raise InputValueError("mean reducer: a response has no completion token (|y| = 0)")
    return _masked(token_logps, mask).sum(dim=-1) / count.to(token_logps.dtype)


def completion_positions(mask: Tensor) -> Tensor:
    """1-based position ``k`` of each completion token among its response's completion tokens (0 elsewhere)."""
    return torch.where(mask, mask.long().cumsum(dim=-1), torch.zeros_like(mask, dtype=torch.long))


@register(
    "ld",
    section=1,
    kind="reducer",
    paper="LD-DPO: Length Desensitization in Direct Preference Optimization (Liu et al., 2024)",
    formula="sum_{k<=l_p} lp_k + alpha * sum_{k>l_p} lp_k, l_p = min(|y_w|,|y_l|), k = completion position",
    inputs=(_MASK,),
    defaults={"alpha": 1.0},
    ranges={"alpha": UNIT},
    scores=_REDUCER_SCORES,
    notes="l_p is the minimum over the K responses of a prompt (K=2: the pair). alpha=1 is the sum.",
)
def reduce_ld(token_logps: Tensor, mask: Tensor, *, alpha: float = 1.0) -> Tensor:
    """LD-DPO: tokens beyond the shorter response's length count with weight ``alpha``."""
    mask = _check_mask(token_logps, mask)
    if token_logps.dim() != 3:
        raise InputShapeError(f"ld reducer: token_logps must have shape (B, K, T), got {tuple(token_logps.shape)}")
    pos = completion_positions(mask)
    l_p = mask.sum(dim=-1).min(dim=1, keepdim=True).values.unsqueeze(-1)  # (B, 1, 1)
    one = torch.ones((), dtype=token_logps.dtype, device=token_logps.device)
    weights = torch.where(pos <= l_p, one, one * alpha)
    return (_masked(token_logps, mask) * weights).sum(dim=-1)


def sampled_mask(mask: Tensor, *, generator: Optional[torch.Generator] = None, seed: Optional[int] = None) -> Tensor:
    """SamPO's token subset: per prompt, ``S = min_k |y_k|`` completion tokens of every response,
    drawn uniformly without replacement (a response of length ``S`` keeps all its tokens).

    ``seed`` (or ``generator``) makes the draw reproducible; draw once and apply the result to both
    policy and reference (:func:`reduce_pair` does).
    """
    mask = mask.bool()
    if mask.dim() != 3:
        raise InputShapeError(f"sampled reducer: mask must have shape (B, K, T), got {tuple(mask.shape)}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=mask.device)
        generator.manual_seed(int(seed))
    keys = torch.rand(mask.shape, generator=generator, device=mask.device)
    keys = torch.where(mask, keys, torch.full_like(keys, 2.0))
    rank = keys.argsort(dim=-1).argsort(dim=-1)
    s = mask.sum(dim=-1).min(dim=1, keepdim=True).values.unsqueeze(-1)  # (B, 1, 1)
    return mask & (rank < s)


@register(
    "sampled",
    section=1,
    kind="reducer",
    paper="Eliminating Biased Length Reliance of Direct Preference Optimization via Down-Sampled KL Divergence (SamPO; Lu et al., 2024)",
    formula="sum_{t in S} lp_t, S = min(|y_w|,|y_l|) positions drawn uniformly without replacement from the longer response "
    "(the shorter keeps all); drawn once per pair, shared by policy and reference; seeded",
    inputs=(_MASK, LossInput("generator", (), "torch.Generator or seed for the draw", required=False, dtype="object")),
    defaults={"seed": None},
    ranges={"seed": Interval(integral=True, allow_none=True)},
    scores=_REDUCER_SCORES,
    notes="Use pygpo.losses.reduce_pair (or the same seed) so policy and reference share the subset; "
    "a generator must live on the mask's device.",
)
def reduce_sampled(
    token_logps: Tensor, mask: Tensor, *, seed: Optional[int] = None, generator: Optional[torch.Generator] = None
) -> Tensor:
    """SamPO: sum over an equal-size random token subset of every response."""
    mask = _check_mask(token_logps, mask)
    return _masked(token_logps, sampled_mask(mask, generator=generator, seed=seed)).sum(dim=-1)


@register(
    "weighted",
    section=1,
    kind="reducer",
    paper="generic; used by BMC, DMPO, SDPO, MCTS-DPO, RRPO, TGDPO, 2D-style segment weights",
    formula="sum_t w_t * lp_t, w_t given per token (detached)",
    inputs=(_MASK, LossInput("weights", (("B", "K", "T"),), "per-token weights w_t (detached)")),
    scores=_REDUCER_SCORES,
)
def reduce_weighted(token_logps: Tensor, mask: Tensor, *, weights: Tensor) -> Tensor:
    """``sum_t w_t lp_t`` with detached weights (see :mod:`pygpo.losses.token_weights`)."""
    mask = _check_mask(token_logps, mask)
    if weights.shape != token_logps.shape:
        raise InputShapeError(f"weights must have the per-token values' shape {tuple(token_logps.shape)}, got {tuple(weights.shape)}")
    return (_masked(token_logps, mask) * weights.detach().to(token_logps.dtype)).sum(dim=-1)


@register(
    "segments",
    section=1,
    kind="reducer",
    paper="RRPO phrases; step-level losses",
    formula="per-segment sums sum_{t in seg k} lp_t returned as a (B, n_seg) tensor",
    inputs=(LossInput("segment_ids", (("B", "K", "T"),), "segment index per token (int, -1 = in no segment)", dtype="int"),),
    defaults={"num_segments": None},
    ranges={"num_segments": Interval(1, math.inf, integral=True, allow_none=True)},
    scores=_REDUCER_SCORES,
    notes="Returns (..., n_seg): (B, K, n_seg) for (B, K, T) inputs. Tokens with id -1 are dropped.",
)
def reduce_segments(token_logps: Tensor, segment_ids: Tensor, *, num_segments: Optional[int] = None) -> Tensor:
    """Per-segment sums over the last dimension (a scatter-add, no loop over the batch)."""
    if segment_ids.shape != token_logps.shape:
        raise InputShapeError(f"segment_ids must have the per-token values' shape {tuple(token_logps.shape)}, got {tuple(segment_ids.shape)}")
    if segment_ids.is_floating_point():
        raise InputShapeError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    ids = segment_ids.long()
    n = int(ids.max().item()) + 1 if num_segments is None else int(num_segments)
    n = max(n, 1)
    if bool((ids >= n).any()):
        raise InputValueError(f"segment_ids contain an id >= num_segments={n}")
    keep = ids >= 0
    safe_ids = torch.where(keep, ids, torch.full_like(ids, n))  # dump slot n, dropped below
    out = torch.zeros(*token_logps.shape[:-1], n + 1, dtype=token_logps.dtype, device=token_logps.device)
    out = out.scatter_add(-1, safe_ids, _masked(token_logps, keep))
    return out[..., :n]


_REDUCERS = {
    "sum": reduce_sum,
    "mean": reduce_mean,
    "ld": reduce_ld,
    "sampled": reduce_sampled,
    "weighted": reduce_weighted,
    "segments": reduce_segments,
}


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def reduce(name: str, token_logps: Tensor, mask: Optional[Tensor] = None, **options: Any) -> Tensor:
    """Apply reducer ``name`` (a section-1 key) to per-token values; bf16/fp16 are upcast to fp32.

    ``mask`` is required except for ``segments`` (which takes ``segment_ids=``).
    """
    from .registry import get
    from .validation import resolve_hparams

    spec = get(name)
    if spec.kind != "reducer":
        raise InputValueError(f"{name!r} is a loss head, not a reducer; reducers: {', '.join(_REDUCERS)}")
    hp = resolve_hparams(spec, {k: v for k, v in options.items() if k in spec.defaults})
    token_logps = _upcast(token_logps)
    if spec.key == "segments":
        if options.get("segment_ids") is None:
            raise MissingInputError(f"reducer {name!r} needs segment_ids= (integer, the per-token values' shape "
                                    f"{tuple(token_logps.shape)}, -1 = in no segment)")
        return reduce_segments(token_logps, options["segment_ids"], **hp)
    if mask is None:
        raise MissingInputError(f"reducer {name!r} needs mask= (bool, the per-token values' shape {tuple(token_logps.shape)})")
    extra = {k: v for k, v in options.items() if k not in spec.defaults}
    return _REDUCERS[spec.key](token_logps, mask, **hp, **extra)


def reduce_pair(
    name: str, policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor, **options: Any
) -> tuple[Tensor, Tensor]:
    """Reduce policy and reference per-token values with the same reducer and the same tokens.

    For ``sampled`` the subset is drawn once and shared.
    """
    if ref_token_logps.shape != policy_token_logps.shape:
        raise InputShapeError(f"ref_token_logps must have policy_token_logps' shape {tuple(policy_token_logps.shape)}, "
                              f"got {tuple(ref_token_logps.shape)}")
    if name == "sampled":
        sub = sampled_mask(mask, generator=options.get("generator"), seed=options.get("seed"))
        return reduce("sum", policy_token_logps, sub), reduce("sum", ref_token_logps, sub)
    return reduce(name, policy_token_logps, mask, **options), reduce(name, ref_token_logps, mask, **options)
