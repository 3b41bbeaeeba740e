"""The forward shared by Liger's paired losses (DPO and its variants, ORPO, CPO, SimPO).

A :class:`PairedSpec` says which registry head a Liger loss maps onto; :func:`paired_forward` checks the
inputs, scores the ``2B`` stacked rows, adds the NLL term and returns Liger's common outputs. The
mapping of DPO's ``loss_type`` onto registry keys is :data:`DPO_LOSS_TYPES` (table in the package
docstring).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from ...losses import preference_loss
from ...losses.registry import get as get_loss
from ...losses.validation import resolve_hparams
from ...ops.validation import check_same_device
from .checks import check_even_rows, check_model, check_nonempty_rows, check_reference, check_target
from .scores import FusedOps, reference_scores, row_logit_sums, sequence_scores

#: Liger's DPO ``loss_type`` -> (registry key, Liger argument -> registry hyper-parameter).
DPO_LOSS_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "sigmoid": ("dpo", {}),
    "hinge": ("hinge", {}),
    "exo_pair": ("exo", {"label_smoothing": "eps"}),
    "nca_pair": ("nca", {}),
    "robust": ("robust", {"label_smoothing": "eps"}),
    "bco_pair": ("bco_pair", {}),
    "sppo_hard": ("sppo_hard", {}),
    "apo_zero": ("apo_zero", {}),
    "apo_down": ("apo_down", {}),
    "discopop": ("discopop", {"discopop_tau": "tau"}),
}


def _pairs(x: Tensor) -> Tensor:
    """``(2B,)`` rows [chosen..., rejected...] -> ``(B, 2)`` [chosen, rejected]."""
    return torch.stack(x.chunk(2), dim=1)


class PairedSpec(NamedTuple):
    """How one Liger paired loss maps onto a registry head."""

    key: str
    hparams: dict[str, Any]
    average: bool
    lengths: str  # "counts": the head takes token sums + counts; "ones": the head takes the scores as they are
    head_nll: bool  # the head's loss already contains NLL_mean(y_w) of its scores (ORPO)


def paired_forward(
    spec: PairedSpec, ops: FusedOps, _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], *,
    ignore_index: int, beta: float, alpha: float, compute_nll_loss: bool, nll_target: Optional[Tensor] = None,
    use_ref_model: bool = False, ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Any]]:
    """Loss, Liger's five common outputs plus the two rewards, and the registry's metrics."""
    check_model(_input, weight, target, bias, ignore_index=ignore_index, rows="2B")
    check_even_rows(_input)
    if nll_target is not None:
        check_target("nll_target", nll_target, _input.shape[:2], weight.shape[0], ignore_index)
        check_same_device(_input=_input, nll_target=nll_target)
    check_reference(use_ref_model, ref_input, ref_weight, ref_bias, _input=_input, weight=weight)
    if spec.average:
        check_nonempty_rows(target != ignore_index, ignore_index)
    resolve_hparams(get_loss(spec.key), spec.hparams)

    n_pairs = _input.shape[0] // 2
    pol = sequence_scores(ops, _input, weight, target, bias, ignore_index, spec.average)
    ref = reference_scores(
        ops, use_ref_model, ref_input, ref_weight, ref_bias, target, ignore_index, spec.average, pol.scores
    )

    # The NLL: a token mean over the batch's chosen tokens (of nll_target when given).
    if not compute_nll_loss:
        nll = pol.sums.new_zeros(())
    elif nll_target is None:
        nll = -pol.sums[:n_pairs].sum() / pol.counts[:n_pairs].sum()
    else:
        chosen_target = nll_target[:n_pairs]
        nll_logps = ops.logps(_input[:n_pairs], weight, chosen_target, bias, ignore_index)
        nll = -nll_logps.sum() / (chosen_target != ignore_index).sum()

    reference_free = get_loss(spec.key).reference == "none"
    if spec.lengths == "counts":
        policy, lengths = _pairs(pol.sums), _pairs(pol.counts)
    else:
        policy, lengths = _pairs(pol.scores), torch.ones_like(_pairs(pol.scores))
    out = preference_loss(
        spec.key, policy, None if reference_free else _pairs(ref),
        lengths=lengths if "lengths" in get_loss(spec.key).input_names else None,
        check_finite=False, **spec.hparams,
    )
    if not spec.head_nll:
        loss = out.loss + alpha * nll
    elif compute_nll_loss and nll_target is None and alpha == 1.0:
        loss = out.loss  # the head's NLL_mean(y_w) is this very NLL
    else:  # swap the head's NLL term for the one asked for
        loss = out.loss + policy[:, 0].sum() / lengths[:, 0].sum() + alpha * nll

    logit_sums = row_logit_sums(_input, weight, bias)
    per_block = n_pairs * _input.shape[1] * weight.shape[0]
    rewards = (beta * (pol.scores - ref)).detach()
    outputs = (
        pol.scores[:n_pairs].detach(),
        pol.scores[n_pairs:].detach(),
        (logit_sums[:n_pairs].sum() / per_block).to(pol.sums.dtype),
        (logit_sums[n_pairs:].sum() / per_block).to(pol.sums.dtype),
        nll.detach(),
        rewards[:n_pairs],
        rewards[n_pairs:],
    )
    return loss, outputs, out.metrics


def dpo_spec(loss_type: str, beta: float, label_smoothing: float, discopop_tau: float, average: bool) -> PairedSpec:
    """The spec of Liger's DPO ``loss_type`` (:data:`DPO_LOSS_TYPES`); an unknown type is an error."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type!r}; supported: {', '.join(DPO_LOSS_TYPES)}")
    key, renames = DPO_LOSS_TYPES[loss_type]
    given = {"label_smoothing": label_smoothing, "discopop_tau": discopop_tau}
    hparams = {"beta": beta, **{renames[k]: v for k, v in given.items() if k in renames}}
    return PairedSpec(key, hparams, average=average, lengths="ones", head_nll=False)
