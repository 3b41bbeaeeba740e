"""Liger-Kernel-compatible chunked preference losses, computed by pygpo's fused ops and loss registry.

Existing code switches by import::

    # from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from pygpo.integrations.liger import LigerFusedLinearDPOLoss

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = LigerFusedLinearDPOLoss(beta=0.1)(
        lm_head.weight, hidden, target, ref_input=ref_hidden, ref_weight=ref_lm_head.weight)

The modules :class:`LigerFusedLinearDPOLoss`, :class:`LigerFusedLinearORPOLoss`,
:class:`LigerFusedLinearCPOLoss`, :class:`LigerFusedLinearSimPOLoss` and :class:`LigerFusedLinearKTOLoss`
take the constructor and ``forward`` arguments of Liger-Kernel's (0.8.5) classes of the same names, in
the same order with the same defaults, and return the same structure. The functional forms
``liger_fused_linear_dpo``, ``..._orpo``, ``..._cpo``, ``..._simpo`` and ``..._kto`` take the
positional arguments of Liger's ``LigerFusedLinear*Function.apply`` (as ``liger_kernel.chunked_loss.
functional`` exposes them). pygpo's own options (``backend``, ``memory_budget``, ``deterministic``,
see :func:`pygpo.fused_linear_logprobs`) are keyword-only and come after Liger's arguments.

Layout and conventions (Liger's):

* Paired losses: ``_input (2B, T, D)`` stacks the ``B`` chosen rows over the ``B`` rejected rows,
  ``target (2B, T)`` holds the next-token labels already shifted (``ignore_index`` where no loss is
  taken), ``weight (V, D)``, ``bias (V,)``. KTO: ``_input (N, T, D)``, ``target (N, T)`` and
  ``preference_labels (N,)`` bool (True: desirable).
* Sequence score ``s`` of a row: the sum of its tokens' log-probs, or their mean when
  ``average_log_prob`` (always the mean for ORPO and SimPO).
* ``nll_loss``: ``-sum log p / count`` over every chosen token of the batch (a token mean over the
  batch, the registry's ``NLL_mean(y_w)``), on ``nll_target``'s chosen half when ORPO is given one;
  0 when ``compute_nll_loss=False``. The loss is ``alpha * nll_loss + preference term``.
* ``chosen_logits_mean``: the sum of the logits of every position of the chosen rows, ignored ones
  included, over ``B * T * V`` (KTO: the plain sums over the desirable / undesirable rows).
* Rewards: ``beta * (s - s_ref)`` per example (``s_ref = 0`` without a reference); KTO returns their
  sums over the desirable and the undesirable rows.
* Every auxiliary output is detached; gradients flow from the loss into ``_input``, ``weight`` and
  ``bias``, never into the reference tensors.

The preference term comes from :func:`pygpo.preference_loss` (LOSSES.md):

==========================  ==============================================================
Liger                       registry key (hyper-parameters)
==========================  ==============================================================
DPO ``sigmoid``             ``dpo`` (``label_smoothing`` unused, as in Liger)
DPO ``hinge``               ``hinge``
DPO ``exo_pair``            ``exo`` (``eps = label_smoothing``)
DPO ``nca_pair``            ``nca``
DPO ``robust``              ``robust`` (``eps = label_smoothing``)
DPO ``bco_pair``            ``bco_pair`` (``delta = 0``)
DPO ``sppo_hard``           ``sppo_hard``
DPO ``apo_zero``            ``apo_zero``
DPO ``apo_down``            ``apo_down``
DPO ``discopop``            ``discopop`` (``tau = discopop_tau``)
ORPO                        ``orpo`` (``lam = beta``)
CPO                         ``cpo`` (``eps = label_smoothing``; its NLL term is added here)
SimPO                       ``simpo`` (``eps = label_smoothing``)
KTO                         ``kto`` (``labels = preference_labels``, ``z0 = kl`` or 0)
==========================  ==============================================================

Papers: DPO (Rafailov et al., 2023), ORPO (Hong et al., 2024), CPO (Xu et al., 2024), SimPO (Meng
et al., 2024), KTO (Ethayarajh et al., 2024); the DPO variants' papers are cited in LOSSES.md.

Where the numbers or behaviour differ from Liger-Kernel 0.8.5:

* ``compiled`` and ``chunk_size`` are accepted and stored but change nothing: the fused ops never hold
  the ``(2B, T, V)`` logits, whatever the batch, and tile by ``memory_budget`` instead.
* The logits means and sums use linearity, ``sum_v (h . W_v + b_v) = h . sum_v W_v + sum_v b_v``
  (accumulated in float32), so no logits are formed for them; they equal Liger's up to summation order.
* Float64 inputs give float64 log-probs, loss and outputs (Liger rounds them to float32).
* A row without any valid token, where scores are averaged, is an error naming the row (Liger returns
  NaN); with ``compute_nll_loss=False`` the NLL output is exactly 0 even when every chosen token is
  ignored (Liger divides 0 by 0 and the loss becomes NaN).
* ORPO's ``log(1 - exp(m))`` is computed stably (agrees with Liger's ``log1p(-exp(m))`` to rounding).
* KTO's ``kl`` must be a scalar (a number, or a tensor with one element): Liger adds the whole tensor
  to every chunk's log-ratios, so a ``(N,)`` tensor does not act per example there.
* The reference may have its own ``D_ref`` and dtype, as in Liger; hyper-parameters are checked
  against the registry's ranges when the module is built (e.g. ``beta > 0``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ..losses import preference_loss
from ..losses.registry import get as get_loss
from ..losses.validation import resolve_hparams
from ..ops import fused_linear_logprobs
from ..ops.validation import check_label_range, check_projection, check_same_device, check_tensor

__all__ = [
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOLoss",
    "liger_fused_linear_cpo",
    "liger_fused_linear_dpo",
    "liger_fused_linear_kto",
    "liger_fused_linear_orpo",
    "liger_fused_linear_simpo",
]

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

PairedOutputs = tuple[Tensor, tuple[Tensor, ...]]


class _Ops(NamedTuple):
    """pygpo's options of the fused log-prob op."""

    backend: str = "auto"
    memory_budget: Optional[int] = None
    deterministic: Optional[bool] = None

    def logps(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int) -> Tensor:
        return fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, **self._asdict())


# ---------------------------------------------------------------------------------------------- checks


def _check_target(name: str, target: Any, leading: torch.Size, vocab: int, ignore_index: int) -> None:
    check_tensor(name, target)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {target.dtype}")
    if tuple(target.shape) != tuple(leading):
        raise ValueError(f"{name} must have _input's leading shape {tuple(leading)}, got {tuple(target.shape)}")
    try:
        check_label_range(target, vocab, ignore_index=ignore_index)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _check_model(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], *, ignore_index: int, rows: str
) -> None:
    """``_input (rows, T, D)``, ``weight (V, D)``, ``target (rows, T)``, ``bias (V,)`` on one device."""
    check_projection(_input, weight, bias, names=("_input", "weight", "bias"))
    if _input.dim() != 3 or _input.shape[0] == 0:
        raise ValueError(f"_input must have shape ({rows}, T, D) with at least one row, got {tuple(_input.shape)}")
    _check_target("target", target, _input.shape[:2], weight.shape[0], ignore_index)
    check_same_device(_input=_input, weight=weight, target=target, bias=bias)


def _check_reference(
    use_ref_model: bool, ref_input: Optional[Tensor], ref_weight: Optional[Tensor], ref_bias: Optional[Tensor],
    *, _input: Tensor, weight: Tensor,
) -> None:
    """The reference head next to the policy's: ``ref_input (rows, T, D_ref)``, ``ref_weight (V, D_ref)``."""
    if not use_ref_model:
        return
    if ref_input is None or ref_weight is None:
        missing = " and ".join(n for n, t in (("ref_input", ref_input), ("ref_weight", ref_weight)) if t is None)
        raise ValueError(
            f"use_ref_model=True needs the reference's hidden states ref_input {tuple(_input.shape[:2]) + ('D_ref',)} "
            f"and lm_head ref_weight (V, D_ref); {missing} not given (or pass use_ref_model=False)"
        )
    check_projection(ref_input, ref_weight, ref_bias, names=("ref_input", "ref_weight", "ref_bias"))
    if tuple(ref_input.shape[:-1]) != tuple(_input.shape[:-1]) or ref_input.dim() != 3:
        raise ValueError(
            f"ref_input must have _input's leading shape {tuple(_input.shape[:-1])}, got {tuple(ref_input.shape)}"
        )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the policy's vocabulary size V={weight.shape[0]}, got {tuple(ref_weight.shape)}")
    check_same_device(_input=_input, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)


def _check_even_rows(_input: Tensor) -> None:
    if _input.shape[0] % 2:
        raise ValueError(
            f"_input must stack B chosen rows over B rejected rows (an even number of rows), got {_input.shape[0]}"
        )


def _check_nonempty_rows(mask: Tensor, ignore_index: int) -> None:
    """Averaged scores need at least one valid token per row (the mean of none is 0/0)."""
    empty = (~mask.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(
            f"target row {int(empty[0])} has no token other than ignore_index={ignore_index}; the log-probs are "
            "averaged per row (average_log_prob), which needs at least one token in every row"
        )


# ------------------------------------------------------------------------------------------ computation


def _row_logit_sums(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``sum_{t, v}`` of the logits ``hidden @ weight.T + bias`` per row ``(N,)``, by linearity, detached."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        sums = hidden.sum(dim=1, dtype=acc) @ weight.sum(dim=0, dtype=acc)
        if bias is not None:
            sums = sums + hidden.shape[1] * bias.sum(dtype=acc)
    return sums


class _Scores(NamedTuple):
    """Per-row sequence scores of one model ``(N,)`` and what they were made from."""

    sums: Tensor  # token-summed log-probs
    counts: Tensor  # valid tokens per row
    scores: Tensor  # sums, or sums / counts when averaging


def _scores(
    ops: _Ops, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int, average: bool
) -> _Scores:
    sums = ops.logps(hidden, weight, target, bias, ignore_index).sum(dim=-1)
    counts = (target != ignore_index).sum(dim=-1).to(sums.dtype)
    return _Scores(sums, counts, sums / counts if average else sums)


def _ref_scores(
    ops: _Ops, use_ref_model: bool, ref_input: Optional[Tensor], ref_weight: Optional[Tensor],
    ref_bias: Optional[Tensor], target: Tensor, ignore_index: int, average: bool, policy: Tensor,
) -> Tensor:
    """The reference's scores (constants), or zeros without a reference model."""
    if not use_ref_model:
        return torch.zeros_like(policy).detach()
    with torch.no_grad():
        ref = _scores(ops, ref_input, ref_weight, target, ref_bias, ignore_index, average).scores  # type: ignore[arg-type]
    return ref.to(policy.dtype)


def _pairs(x: Tensor) -> Tensor:
    """``(2B,)`` rows [chosen..., rejected...] -> ``(B, 2)`` [chosen, rejected]."""
    return torch.stack(x.chunk(2), dim=1)


class _PairedSpec(NamedTuple):
    """How one Liger paired loss maps onto a registry head."""

    key: str
    hparams: dict[str, Any]
    average: bool
    lengths: str  # "counts": the head takes token sums + counts; "ones": the head takes the scores as they are
    head_nll: bool  # the head's loss already contains NLL_mean(y_w) of its scores (ORPO)


def _paired_forward(
    spec: _PairedSpec, ops: _Ops, _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], *,
    ignore_index: int, beta: float, alpha: float, compute_nll_loss: bool, nll_target: Optional[Tensor] = None,
    use_ref_model: bool = False, ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
) -> tuple[Tensor, tuple[Tensor, ...], dict[str, Any]]:
    """Loss, Liger's five common outputs plus the two rewards, and the registry's metrics."""
    _check_model(_input, weight, target, bias, ignore_index=ignore_index, rows="2B")
    _check_even_rows(_input)
    if nll_target is not None:
        _check_target("nll_target", nll_target, _input.shape[:2], weight.shape[0], ignore_index)
        check_same_device(_input=_input, nll_target=nll_target)
    _check_reference(use_ref_model, ref_input, ref_weight, ref_bias, _input=_input, weight=weight)
    if spec.average:
        _check_nonempty_rows(target != ignore_index, ignore_index)
    resolve_hparams(get_loss(spec.key), spec.hparams)

    n_pairs = _input.shape[0] // 2
    pol = _scores(ops, _input, weight, target, bias, ignore_index, spec.average)
    ref = _ref_scores(ops, use_ref_model, ref_input, ref_weight, ref_bias, target, ignore_index, spec.average, pol.scores)

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

    logit_sums = _row_logit_sums(_input, weight, bias)
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


# ------------------------------------------------------------------------------------ functional forms


def liger_fused_linear_dpo(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
    ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
    ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = False, compiled: bool = True,
    use_ref_model: bool = True, average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, discopop_tau: float = 0.05, alpha: float = 1.0,
    *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
) -> PairedOutputs:
    """DPO and its ``loss_type`` variants on ``_input (2B, T, D)``: Liger's ``LigerFusedLinearDPOFunction.apply``.

    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards))``; per-pair outputs are ``(B,)``, the others scalars.
    """
    spec = _dpo_spec(loss_type, beta, label_smoothing, discopop_tau, average_log_prob)
    loss, outputs, _ = _paired_forward(
        spec, _Ops(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
        beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss, use_ref_model=use_ref_model,
        ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias,
    )
    return loss, outputs


def liger_fused_linear_orpo(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    beta: float = 0.1, compute_nll_loss: bool = True, nll_target: Optional[Tensor] = None, compiled: bool = True,
    chunk_size: int = 1,
    *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
) -> PairedOutputs:
    """ORPO on ``_input (2B, T, D)`` (mean log-probs): Liger's ``LigerFusedLinearORPOFunction.apply``.

    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen))``; the last two are batch means.
    """
    spec = _PairedSpec("orpo", {"lam": beta}, average=True, lengths="counts", head_nll=True)
    loss, outputs, metrics = _paired_forward(
        spec, _Ops(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
        beta=beta, alpha=1.0, compute_nll_loss=compute_nll_loss, nll_target=nll_target,
    )
    dtype = outputs[0].dtype
    return loss, outputs + (metrics["log_odds_ratio"].to(dtype), metrics["log_odds_chosen"].to(dtype))


def liger_fused_linear_cpo(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0, compute_nll_loss: bool = True,
    compiled: bool = True, average_log_prob: bool = False, chunk_size: int = 1,
    *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
) -> PairedOutputs:
    """CPO on ``_input (2B, T, D)``: Liger's ``LigerFusedLinearCPOFunction.apply``.

    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards))``.
    """
    # The head's own NLL weight is 0 (its lengths then play no part): the NLL is added by _paired_forward.
    spec = _PairedSpec(
        "cpo", {"beta": beta, "eps": label_smoothing, "alpha": 0.0}, average=average_log_prob, lengths="ones",
        head_nll=False,
    )
    loss, outputs, _ = _paired_forward(
        spec, _Ops(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
        beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
    )
    return loss, outputs


def liger_fused_linear_simpo(
    _input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0, compute_nll_loss: bool = False,
    compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1,
    *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
) -> PairedOutputs:
    """SimPO on ``_input (2B, T, D)`` (mean log-probs): Liger's ``LigerFusedLinearSimPOFunction.apply``.

    Returns ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards))``.
    """
    spec = _PairedSpec(
        "simpo", {"beta": beta, "gamma": gamma, "eps": label_smoothing}, average=True, lengths="counts",
        head_nll=False,
    )
    loss, outputs, _ = _paired_forward(
        spec, _Ops(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
        beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
    )
    return loss, outputs


def _check_kto_inputs(preference_labels: Any, kl: Any, _input: Tensor) -> None:
    if preference_labels is None:
        raise ValueError("preference_labels is required: a (N,) bool tensor, True for a desirable response")
    check_tensor("preference_labels", preference_labels)
    if preference_labels.dtype != torch.bool:
        raise TypeError(f"preference_labels must be a bool tensor (True: desirable), got {preference_labels.dtype}")
    if tuple(preference_labels.shape) != (_input.shape[0],):
        raise ValueError(
            f"preference_labels must have shape (N,) = ({_input.shape[0]},), one per row of _input; "
            f"got {tuple(preference_labels.shape)}"
        )
    check_same_device(_input=_input, preference_labels=preference_labels)
    if isinstance(kl, Tensor) and kl.numel() != 1:
        raise ValueError(
            f"kl must be a scalar (the KTO reference point, one number for the batch), got shape {tuple(kl.shape)}"
        )
    if kl is not None and not isinstance(kl, (Tensor, int, float)):
        raise TypeError(f"kl must be a number or a one-element tensor, got {type(kl).__name__}")


def liger_fused_linear_kto(
    _input: Tensor, weight: Tensor, target: Tensor, preference_labels: Optional[Tensor], bias: Optional[Tensor] = None,
    ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
    kl: Union[Tensor, float, None] = None, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
    use_ref_model: bool = True, average_log_prob: bool = False, chunk_size: int = 1,
    *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
) -> PairedOutputs:
    """KTO on unpaired rows ``_input (N, T, D)``: Liger's ``LigerFusedLinearKTOFunction.apply``.

    ``loss = mean_i [1 - sigma(beta * (u_i - kl) * (+1 if desirable else -1))]``, ``u = s - s_ref``.
    Returns ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
    chosen_rewards_sum, rejected_rewards_sum))``, each a scalar summed over the desirable (chosen) or
    undesirable (rejected) rows.
    """
    _check_model(_input, weight, target, bias, ignore_index=ignore_index, rows="N")
    _check_kto_inputs(preference_labels, kl, _input)
    _check_reference(use_ref_model, ref_input, ref_weight, ref_bias, _input=_input, weight=weight)
    if average_log_prob:
        _check_nonempty_rows(target != ignore_index, ignore_index)
    resolve_hparams(get_loss("kto"), {"beta": beta})

    ops = _Ops(backend, memory_budget, deterministic)
    pol = _scores(ops, _input, weight, target, bias, ignore_index, average_log_prob)
    ref = _ref_scores(ops, use_ref_model, ref_input, ref_weight, ref_bias, target, ignore_index, average_log_prob, pol.scores)
    z0 = torch.as_tensor(0.0 if kl is None else kl, dtype=pol.scores.dtype, device=pol.scores.device).reshape(())
    out = preference_loss("kto", pol.scores, ref, labels=preference_labels, z0=z0, beta=beta, check_finite=False)

    desirable = preference_labels.to(pol.scores.dtype)  # type: ignore[union-attr]
    per_row = torch.stack([
        pol.scores.detach(),
        _row_logit_sums(_input, weight, bias).to(pol.scores.dtype),
        beta * (pol.scores.detach() - ref),
    ])  # (3, N)
    chosen, rejected = per_row @ desirable, per_row @ (1 - desirable)
    return out.loss, (chosen[0], rejected[0], chosen[1], rejected[1], chosen[2], rejected[2])


def _dpo_spec(loss_type: str, beta: float, label_smoothing: float, discopop_tau: float, average: bool) -> _PairedSpec:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type!r}; supported: {', '.join(DPO_LOSS_TYPES)}")
    key, renames = DPO_LOSS_TYPES[loss_type]
    given = {"label_smoothing": label_smoothing, "discopop_tau": discopop_tau}
    hparams = {"beta": beta, **{renames[k]: v for k, v in given.items() if k in renames}}
    return _PairedSpec(key, hparams, average=average, lengths="ones", head_nll=False)


# --------------------------------------------------------------------------------------------- modules


class _LigerCompatLoss(nn.Module):
    """Every constructor argument becomes an attribute of the same name, as in Liger, and ``forward``
    reads them at call time (so ``loss.beta = ...`` after construction takes effect)."""

    def __init__(self, arguments: dict[str, Any]):
        super().__init__()
        self._argument_names = tuple(k for k in arguments if k != "self" and not k.startswith("__"))
        for name in self._argument_names:
            setattr(self, name, arguments[name])

    def _arguments(self) -> dict[str, Any]:
        """The functional form's keyword arguments: Liger's options and pygpo's."""
        return {name: getattr(self, name) for name in self._argument_names}


class LigerFusedLinearDPOLoss(_LigerCompatLoss):
    """lm_head + DPO (or a ``loss_type`` variant) on stacked chosen/rejected rows, as Liger's class of this name.

    ``forward(lin_weight, _input (2B, T, D), target (2B, T), bias, ref_input, ref_weight, ref_bias)`` returns
    ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards))``. ``use_ref_model=True`` (the default) needs ``ref_input`` and
    ``ref_weight``; without a reference the log-ratios are the policy's scores.
    """

    _SUPPORTED_LOSS_TYPES = set(DPO_LOSS_TYPES)

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
        compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False, chunk_size: int = 1,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0, discopop_tau: float = 0.05,
        *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
    ):
        super().__init__(locals())
        spec = _dpo_spec(loss_type, beta, label_smoothing, discopop_tau, average_log_prob)
        if loss_type == "exo_pair" and not label_smoothing > 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair' (the EXO paper uses 1e-3)")
        resolve_hparams(get_loss(spec.key), spec.hparams)

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None,
        ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
    ) -> PairedOutputs:
        return liger_fused_linear_dpo(
            _input, lin_weight, target, bias, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias,
            **self._arguments(),
        )


class LigerFusedLinearORPOLoss(_LigerCompatLoss):
    """lm_head + ORPO on stacked chosen/rejected rows, as Liger's class of this name.

    ``forward(lin_weight, _input (2B, T, D), target (2B, T), bias, nll_target (2B, T))`` returns
    ``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
    chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen))``.
    """

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True, compiled: bool = True,
        chunk_size: int = 1,
        *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
    ):
        super().__init__(locals())
        resolve_hparams(get_loss("orpo"), {"lam": beta})

    def forward(
        self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None,
        nll_target: Optional[Tensor] = None,
    ) -> PairedOutputs:
        return liger_fused_linear_orpo(_input, lin_weight, target, bias, nll_target=nll_target, **self._arguments())


class LigerFusedLinearCPOLoss(_LigerCompatLoss):
    """lm_head + CPO on stacked chosen/rejected rows, as Liger's class of this name.

    ``forward(lin_weight, _input (2B, T, D), target (2B, T), bias)`` returns ``(loss, (chosen_logps,
    rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``.
    """

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
        compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False, chunk_size: int = 1,
        *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
    ):
        super().__init__(locals())
        resolve_hparams(get_loss("cpo"), {"beta": beta, "eps": label_smoothing})

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> PairedOutputs:
        return liger_fused_linear_cpo(_input, lin_weight, target, bias, **self._arguments())


class LigerFusedLinearSimPOLoss(_LigerCompatLoss):
    """lm_head + SimPO on stacked chosen/rejected rows, as Liger's class of this name.

    ``forward(lin_weight, _input (2B, T, D), target (2B, T), bias)`` returns ``(loss, (chosen_logps,
    rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards))``.
    Note Liger's defaults: ``compute_nll_loss=True`` here, ``False`` in the functional form.
    """

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
        compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1,
        *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
    ):
        super().__init__(locals())
        resolve_hparams(get_loss("simpo"), {"beta": beta, "gamma": gamma, "eps": label_smoothing})

    def forward(self, lin_weight: Tensor, _input: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> PairedOutputs:
        return liger_fused_linear_simpo(_input, lin_weight, target, bias, **self._arguments())


class LigerFusedLinearKTOLoss(_LigerCompatLoss):
    """lm_head + KTO on unpaired rows, as Liger's class of this name (note: ``_input`` comes first here).

    ``forward(_input (N, T, D), lin_weight, target (N, T), bias, preference_labels (N,) bool, ref_input,
    ref_weight, ref_bias, kl)`` returns ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum,
    rejected_logits_sum, chosen_rewards_sum, rejected_rewards_sum))``. Note Liger's defaults:
    ``use_ref_model=False`` here, ``True`` in the functional form.
    """

    def __init__(
        self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True, use_ref_model: bool = False,
        average_log_prob: bool = False, chunk_size: int = 1,
        *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
    ):
        super().__init__(locals())
        resolve_hparams(get_loss("kto"), {"beta": beta})

    def forward(
        self, _input: Tensor, lin_weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
        preference_labels: Optional[Tensor] = None, ref_input: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None, kl: Union[Tensor, float, None] = None,
    ) -> PairedOutputs:
        return liger_fused_linear_kto(
            _input, lin_weight, target, preference_labels, bias, ref_input=ref_input, ref_weight=ref_weight,
            ref_bias=ref_bias, kl=kl, **self._arguments(),
        )
