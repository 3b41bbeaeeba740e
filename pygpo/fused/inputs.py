"""Per-example inputs a loss head needs that the fused pass itself knows, filled in for the caller.

* ``lengths``: completion-token counts ``|y|`` per response;
* ``mask``: the ``(B, K, T)`` completion-token mask, for heads that take per-token scores;
* ``kl``: ``KL(p_ref || p_theta)`` per token ``(B, K, T)``, or summed per response;
* ``log_sum_p2``: ``sum_t log sum_v p_theta(v)^2`` per response (WPO);
* ``valid``: which responses exist (multi-response heads, prefix batches with varying ``K``);
* ``sum_logps``: the raw token sums ``lp(y) = sum_t lp_t`` when the reducer is not ``sum``.

The reducer contract: a head's scores are the reducer's output, and every preference term of its
formula reads them; ``lengths`` are always the true completion-token counts (a length-normalising head
divides the reducer's score by them, as TRL does with ``ld_alpha``); terms LOSSES.md defines on raw
token log-probs (``NLL_mean(y_w)`` of ``sft``/``cpo``, ``rpo_sum``'s summed SFT term, WPO's weight)
read ``sum_logps``. :func:`reducer_conflict` refuses the combinations without a meaning.

Inputs the caller gives always win. Caller inputs of the labels' shape (one value per scored label
position: ``segment_ids``, SparsePO's ``mu``/``md``, ...) are moved into ``(B, K, T)`` for heads that
declare a per-token shape.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from ..losses.registry import LossSpec
from .layout import ResponseIndexError, ResponseLayout

AUTO_INPUTS = ("lengths", "mask", "kl", "log_sum_p2", "valid", "sum_logps")

#: Heads that divide their scores by the response lengths themselves (``lp(y)/|y|``): the ``mean``
#: reducer would divide a second time (``ipo`` only with ``length_normalize=True``).
LENGTH_NORMALISING = frozenset({"ipo", "sigmoid_norm", "simpo", "alphapo", "repo", "simpo_gamma_dynamic", "tpo_tree",
                                "orpo", "asft", "omni_dpo"})
#: Heads built on the mean token log-prob as a likelihood (ORPO's odds, ASFT's absolute likelihoods,
#: Omni-DPO's calibrated NLL): another reducer's score is no likelihood, so they take ``sum`` only.
SUM_REDUCER_ONLY = frozenset({"orpo", "asft", "omni_dpo"})


def reducer_conflict(spec: LossSpec, reducer: str, hparams: Mapping[str, Any]) -> Optional[str]:
    """Why ``spec``'s head has no meaning on ``reducer``'s scores, or ``None``.

    ``hparams`` are the head's own hyper-parameters (for ``ipo``'s ``length_normalize``).
    """
    if reducer == "sum":
        return None
    if spec.key in SUM_REDUCER_ONLY:
        return (f"{spec.key!r} defines its terms on the mean token log-prob lp(y)/|y| as a likelihood; "
                f"reducer={reducer!r} gives no likelihood: use reducer='sum'")
    normalises = spec.key in LENGTH_NORMALISING and (spec.key != "ipo" or bool(hparams.get("length_normalize", True)))
    if reducer == "mean" and normalises:
        return (f"{spec.key!r} divides its scores by the response lengths itself; reducer='mean' would divide "
                "twice: use reducer='sum' (the same loss)")
    if reducer == "segments" and takes_token_scores(spec):
        return f"{spec.key!r} takes per-token scores, not per-segment sums: use reducer='sum'"
    return None


def is_token_shape(shape: tuple) -> bool:
    """A declared shape with a token axis: ``(B, 2, T)`` or ``(B, K, T)``."""
    return len(shape) == 3 and shape[-1] == "T"


def takes_token_scores(spec: LossSpec) -> bool:
    """Whether the head's only accepted score shape is per token (SparsePO, RRPO)."""
    return all(is_token_shape(s) for s in spec.scores)


def declared_shapes(spec: LossSpec, name: str) -> tuple:
    return spec.input(name).shapes if name in spec.input_names else ()


def per_response(x: Tensor, k: int) -> Tensor:
    """``(B, K, ...)`` values as the head expects them: ``(B,)``-first for unpaired heads (``K = 1``)."""
    return x[:, 0] if k == 1 else x


def token_input(layout: ResponseLayout, name: str, value: Tensor, labels_shape: torch.Size) -> Tensor:
    """A caller's per-token input of the labels' shape moved into ``(B, K, T)`` (ids: -1 off the mask)."""
    if tuple(value.shape) != tuple(labels_shape):
        return value
    dense = layout.dense(layout.valid(value))
    if not value.dtype.is_floating_point:
        dense = torch.where(layout.mask, dense, torch.full_like(dense, -1))
    return dense


def fill_inputs(
    spec: LossSpec,
    given: Mapping[str, Any],
    layout: ResponseLayout,
    *,
    token_scores: bool,
    kl: Optional[Tensor],
    log_sum_p2: Optional[Tensor],
    labels_shape: torch.Size,
    sum_logps: Optional[Tensor] = None,
) -> dict[str, Any]:
    """The inputs of ``spec`` this batch can supply, plus ``given`` (which wins), for one head.

    ``kl`` and ``log_sum_p2`` are ``(B, K, T)`` per-token values (or ``None``); ``token_scores`` says
    whether the head receives ``(B, K, T)`` scores (then ``kl`` stays per token) or ``(B, K)``.
    ``sum_logps``: ``(B, K)`` raw token sums (given when the reducer is not ``sum``).
    """
    k = layout.responses_per_example
    mask = layout.mask
    out: dict[str, Any] = {}
    names = spec.input_names
    if "lengths" in names:
        lengths = layout.lengths.to(torch.float32)
        out["lengths"] = per_response(lengths, k)
    if "mask" in names:
        out["mask"] = mask
    if "kl" in names and kl is not None:
        summed = torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(-1)
        per_token = token_scores and any(is_token_shape(s) for s in declared_shapes(spec, "kl"))
        out["kl"] = kl if per_token else per_response(summed, k)
    if "log_sum_p2" in names and log_sum_p2 is not None:
        out["log_sum_p2"] = per_response(log_sum_p2.sum(-1), k)
    if "sum_logps" in names and sum_logps is not None:
        out["sum_logps"] = per_response(sum_logps, k)
    if "valid" in names and not layout.all_present:
        out["valid"] = layout.present
    for name, value in given.items():
        if isinstance(value, Tensor) and name in names and any(is_token_shape(s) for s in declared_shapes(spec, name)):
            value = token_input(layout, name, value, labels_shape)
        out[name] = value
    return {k_: v for k_, v in out.items() if k_ in names or k_ in spec.defaults}


class SegmentRows(NamedTuple):
    """The ``segments`` reducer's head rows: one per (example, segment) that every present response of
    the example has tokens in (segment ``i`` of each response is aligned with segment ``i`` of the others).

    ``example``, ``segment``: ``(P,)`` int64; ``lengths``: ``(P, K)`` token counts of those segments.
    """

    example: Tensor
    segment: Tensor
    lengths: Tensor

    def gather(self, per_segment: Tensor) -> Tensor:
        """``(P, K)`` rows of per-segment values ``(B, K, n_seg)``."""
        return per_segment.permute(0, 2, 1)[self.example, self.segment]

    def expand(self, inputs: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
        """Per-example inputs (leading dimension ``B``) repeated for each of their segment rows."""
        return {n: (v.index_select(0, self.example.to(v.device))
                    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch_size else v)
                for n, v in inputs.items()}


def segment_rows(counts: Tensor, present: Tensor) -> SegmentRows:
    """Rows from per-segment token counts ``(B, K, n_seg)`` and the present responses ``(B, K)``.

    Raises :class:`ResponseIndexError` naming an example none of whose segments every response has.
    """
    aligned = ((counts > 0) | ~present[..., None]).all(dim=1)  # (B, n_seg)
    missing = ~aligned.any(dim=1)
    if bool(missing.any()):
        b = int(missing.nonzero()[0])
        raise ResponseIndexError(
            f"segment_ids: example {b} has no segment that all its responses have tokens in; reducer='segments' "
            "pairs segment i of each response with segment i of the others"
        )
    example, segment = aligned.nonzero(as_tuple=True)
    return SegmentRows(example, segment, counts.permute(0, 2, 1)[example, segment])
