"""Functional forms with the positional arguments of Liger's ``LigerFusedLinear*Function.apply``.

pygpo's own options (``backend``, ``memory_budget``, ``deterministic``, see
:func:`pygpo.fused_linear_logprobs`) are keyword-only and come after Liger's arguments; ``compiled`` and
``chunk_size`` are accepted and change nothing.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ...losses import preference_loss
from ...losses.registry import get as get_loss
from ...losses.validation import resolve_hparams
from .checks import check_kto_inputs, check_model, check_nonempty_rows, check_reference
from .paired import PairedSpec, dpo_spec, paired_forward
from .scores import FusedOps, reference_scores, row_logit_sums, sequence_scores

PairedOutputs = tuple[Tensor, tuple[Tensor, ...]]


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
    spec = dpo_spec(loss_type, beta, label_smoothing, discopop_tau, average_log_prob)
    loss, outputs, _ = paired_forward(
        spec, FusedOps(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
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
    spec = PairedSpec("orpo", {"lam": beta}, average=True, lengths="counts", head_nll=True)
    loss, outputs, metrics = paired_forward(
        spec, FusedOps(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
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
    # The head's own NLL weight is 0 (its lengths then play no part): the NLL is added by paired_forward.
    spec = PairedSpec(
        "cpo", {"beta": beta, "eps": label_smoothing, "alpha": 0.0}, average=average_log_prob, lengths="ones",
        head_nll=False,
    )
    loss, outputs, _ = paired_forward(
        spec, FusedOps(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
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
    spec = PairedSpec(
        "simpo", {"beta": beta, "gamma": gamma, "eps": label_smoothing}, average=True, lengths="counts",
        head_nll=False,
    )
    loss, outputs, _ = paired_forward(
        spec, FusedOps(backend, memory_budget, deterministic), _input, weight, target, bias, ignore_index=ignore_index,
        beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
    )
    return loss, outputs


def liger_fused_linear_kto(
    _input: Tensor, weight: Tensor, target: Tensor, preference_labels: Optional[Tensor], bias: Optional[Tensor] = None,
    ref_input: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
    kl: Union[Tensor, float, None] = None, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
    use_ref_model: bool = True, average_log_prob: bool = False, chunk_size: int = 1,
    *, backend: str = "auto", memory_budget: Optional[int] = None, deterministic: Optional[bool] = None,
) -> PairedOutputs:
    """KTO on unpaired rows ``_input (N, T, D)``: Liger's ``LigerFusedLinearKTOFunction.apply``.

    ``loss = mean_i [1 - sigma(beta * (u_i - kl_i) * (+1 if desirable else -1))]``, ``u = s - s_ref``, with
    ``kl`` a number, a one-element tensor or an ``(N,)`` tensor (one reference point per row); no gradient
    flows into it.
    Returns ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
    chosen_rewards_sum, rejected_rewards_sum))``, each a scalar summed over the desirable (chosen) or
    undesirable (rejected) rows.
    """
    check_model(_input, weight, target, bias, ignore_index=ignore_index, rows="N")
    check_kto_inputs(preference_labels, kl, _input)
    check_reference(use_ref_model, ref_input, ref_weight, ref_bias, _input=_input, weight=weight)
    if average_log_prob:
        check_nonempty_rows(target != ignore_index, ignore_index)
    resolve_hparams(get_loss("kto"), {"beta": beta})

    ops = FusedOps(backend, memory_budget, deterministic)
    pol = sequence_scores(ops, _input, weight, target, bias, ignore_index, average_log_prob)
    ref = reference_scores(
        ops, use_ref_model, ref_input, ref_weight, ref_bias, target, ignore_index, average_log_prob, pol.scores
    )
    kl = torch.as_tensor(0.0 if kl is None else kl, dtype=pol.scores.dtype, device=pol.scores.device).detach()
    if kl.numel() == 1:
        out = preference_loss("kto", pol.scores, ref, labels=preference_labels, z0=kl.reshape(()), beta=beta,
                              check_finite=False)
    else:  # a reference point per row: u_i - kl_i is the log-ratio against a reference shifted by kl_i
        out = preference_loss("kto", pol.scores, ref + kl, labels=preference_labels, z0=kl.new_zeros(()), beta=beta,
                              check_finite=False)

    desirable = preference_labels.to(pol.scores.dtype)  # type: ignore[union-attr]
    per_row = torch.stack([
        pol.scores.detach(),
        row_logit_sums(_input, weight, bias).to(pol.scores.dtype),
        beta * (pol.scores.detach() - ref),
    ])  # (3, N)
    chosen, rejected = per_row @ desirable, per_row @ (1 - desirable)
    return out.loss, (chosen[0], rejected[0], chosen[1], rejected[1], chosen[2], rejected[2])
