"""``nn.Module`` classes with the constructor and ``forward`` arguments of Liger's classes of the same names.

Each module stores its constructor arguments as attributes and calls its functional form; the
hyper-parameters are checked against the registry's ranges when the module is built.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from ...losses.registry import get as get_loss
from ...losses.validation import resolve_hparams
from .functional import (
    PairedOutputs,
    liger_fused_linear_cpo,
    liger_fused_linear_dpo,
    liger_fused_linear_kto,
    liger_fused_linear_orpo,
    liger_fused_linear_simpo,
)
from .paired import DPO_LOSS_TYPES, dpo_spec


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
        spec = dpo_spec(loss_type, beta, label_smoothing, discopop_tau, average_log_prob)
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
