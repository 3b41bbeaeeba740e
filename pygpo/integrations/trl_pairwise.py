"""What :class:`~pygpo.integrations.trl_cpo.FusedCPOTrainer` and :class:`~pygpo.integrations.trl_orpo.FusedORPOTrainer`
share: TRL's experimental paired, reference-free trainers (``trl.experimental.cpo``, ``trl.experimental.orpo``) with
their loss step run by pygpo's fused pass.

Both TRL trainers run one forward over ``concatenated_inputs(batch)``: the ``B`` chosen rows, then the ``B``
rejected rows, right-padded to one width ``T`` (input ids with the trainer's padding value, labels with ``-100``
outside the completions), and score the completion tokens ``labels[:, 1:] != -100`` with
``log_softmax(logits[:, :-1])``. The fused step (:class:`FusedPairwiseMixin`) builds the same concatenated batch
with TRL's own ``concatenated_inputs``, runs the decoder body through the (possibly DDP-wrapped) model without
its lm_head (:func:`~pygpo.integrations.hidden_states.final_hidden_states`), and gives the hidden states of the
scored positions to a :class:`pygpo.FusedPreferenceLoss` (rows ``[chosen; rejected]``, the registry's default
rank-major order): no logits are held, and the loss does vocabulary work only at the positions it scores (the
completions; for ORPO's NLL also the chosen rows' prompts), never at padding. Logit transforms (softcap, logit
scale, bias) come from :func:`~pygpo.integrations.hidden_states.lm_head_of`.

TRL's metrics keep their names and values: ``rewards/{chosen,rejected,accuracies,margins}`` and
``logps/{chosen,rejected}`` from the per-example scores, gathered across ranks; ``logits/{chosen,rejected}``,
TRL's mean of the whole ``(B, T', V)`` logit tensor of each side (every position, prompt and padding included:
``T' = T`` for CPO, ``T - 1`` for ORPO), is ``sum_t mean_v z_t,v / (B T')``, linear in the hidden states without a
softcap (:func:`~pygpo.integrations.trl_common.row_mean_logit_sums`: no vocabulary pass) and a forward-only fused
pass over those positions with one; each rank's value is gathered and averaged, as TRL does.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..fused import FusedPreferenceLoss
from ..fused.scores import ProjectionOptions
from .hidden_states import final_hidden_states, lm_head_of, unwrap_model
from .trl_common import LossFactory, fused_loss_for_model, row_mean_logit_sums, unsupported_model

IGNORE_INDEX = -100  # TRL's CPO / ORPO label padding, hard-coded there



class FusedPairwiseMixin:
    """The fused loss step of a TRL experimental paired trainer (CPO, ORPO), mixed in before the TRL class.

    A subclass sets ``_pygpo_name`` (for messages), ``_pygpo_loss_factory`` (``(config, *, softcap, backend,
    memory_budget) -> (loss or None, reason)``), ``_pygpo_padding_attr`` (the trainer attribute TRL pads input ids
    with: ``pad_token_id`` for CPO, ``padding_value`` for ORPO) and ``_pygpo_logit_width_cut`` (positions TRL's
    ``logits/*`` leave out at the end: 0 for CPO, 1 for ORPO), and implements :meth:`_pygpo_step` (the loss and
    TRL's metric values from the hidden states).

    Args:
        *args, **kwargs: exactly those of the TRL trainer.
        backend: fused-op backend (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``).
        memory_budget: bytes one logit tile may use in the torch backend (``FusedPreferenceLoss``'s option).
    """

    _pygpo_name = "FusedPairwiseMixin"
    _pygpo_loss_factory: LossFactory
    _pygpo_padding_attr = "pad_token_id"
    _pygpo_logit_width_cut = 0

    def __init__(self, *args: Any, backend: str = "auto", memory_budget: Optional[int] = None, **kwargs: Any):
        # bad options fail before the TRL trainer does any work
        ProjectionOptions.checked(IGNORE_INDEX, 1.0, None, backend, memory_budget, None)
        super().__init__(*args, **kwargs)
        loss, reason = fused_loss_for_model(self.model, self._pygpo_unsupported(), self._pygpo_loss_factory, self.args,
                                            backend=backend, memory_budget=memory_budget)
        if loss is None:
            warnings.warn(f"{self._pygpo_name}: {reason}; TRL's own loss path is used", stacklevel=2)
        self.pygpo_loss: Optional[FusedPreferenceLoss] = loss
        self.pygpo_fallback_reason = reason

    def _pygpo_unsupported(self) -> Optional[str]:
        """Why this trainer's model cannot take the fused path, or ``None``."""
        vision = getattr(unwrap_model(self.model).config, "vision_config", None) is not None
        return unsupported_model(self.model, encoder_decoder=self.is_encoder_decoder, aux_loss=self.aux_loss_enabled,
                                 vision=vision)

    # ------------------------------------------------------------------------------ loss step

    def get_batch_loss_metrics(self, model, batch: dict[str, Any], train_eval: str = "train"):
        """TRL's ``(loss, metrics)`` of one batch, from the fused pass (TRL's own where the fused path cannot run)."""
        if self.pygpo_loss is None:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        concat = self.concatenated_inputs(batch, is_encoder_decoder=False,
                                          padding_value=getattr(self, self._pygpo_padding_attr),
                                          device=self.accelerator.device)
        labels = concat["concatenated_labels"][:, 1:]
        if not bool((labels != IGNORE_INDEX).any(dim=1).all()):
            self._pygpo_warn_unscored()
            return super().get_batch_loss_metrics(model, batch, train_eval)
        # the model's forward runs under accelerate's mixed-precision autocast; so does the fused path
        with self.accelerator.autocast():
            hidden = final_hidden_states(model, concat["concatenated_input_ids"],
                                         attention_mask=concat["concatenated_attention_mask"], use_cache=False)
            weight, bias = lm_head_of(model).projection()
            loss, scores, values = self._pygpo_step(hidden, weight, bias, labels, concat)
            values = {**values, **self._pygpo_mean_logits(hidden, weight, bias)}
        return loss, self._pygpo_metrics("eval_" if train_eval == "eval" else "", scores, values)

    def _pygpo_step(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    concat: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, Tensor]]:
        """``(loss, (rewards (B, 2), logps (B, 2)), per-rank scalars by metric name)`` from ``hidden (2B, T, D)``."""
        raise NotImplementedError

    def _pygpo_warn_unscored(self) -> None:
        if getattr(self, "_pygpo_warned_unscored", False):
            return
        self._pygpo_warned_unscored = True
        warnings.warn(f"{self._pygpo_name}: a completion has no scored token (truncated to nothing by max_length, or "
                      "a one-token sequence); TRL's own loss path runs such batches", stacklevel=4)

    def _pygpo_mean_logits(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> dict[str, Tensor]:
        """TRL's ``logits/chosen`` and ``logits/rejected``: the mean over every position (of the first
        ``T - _pygpo_logit_width_cut``) and every vocabulary entry of each side's logits, as 0-d tensors."""
        rows = hidden[:, : hidden.shape[1] - self._pygpo_logit_width_cut]
        every = torch.zeros(rows.shape[:2], dtype=torch.long, device=rows.device)  # any in-vocabulary label
        sums = row_mean_logit_sums(rows, weight, bias, every, opts=self.pygpo_loss.options)
        n, width = rows.shape[0] // 2, rows.shape[1]
        return {"logits/rejected": sums[n:].sum() / (n * width), "logits/chosen": sums[:n].sum() / (n * width)}

    def _pygpo_metrics(self, prefix: str, scores: tuple[Tensor, Tensor], values: Mapping[str, Tensor]) -> dict:
        """TRL's metric dict: per-example values and per-rank scalars gathered across ranks, then averaged."""
        acc = self.accelerator
        rewards, logps = (s.detach() for s in scores)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        mean = lambda x: acc.gather_for_metrics(x).mean().item()  # noqa: E731
        metrics = {
            "rewards/chosen": mean(chosen),
            "rewards/rejected": mean(rejected),
            "rewards/accuracies": mean((chosen > rejected).float()),
            "rewards/margins": mean(chosen - rejected),
            "logps/rejected": mean(logps[:, 1]),
            "logps/chosen": mean(logps[:, 0]),
        }
        for name in ("logits/rejected", "logits/chosen", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
            if name in values:
                metrics[name] = mean(values[name].detach())
        return {f"{prefix}{name}": value for name, value in metrics.items()}
