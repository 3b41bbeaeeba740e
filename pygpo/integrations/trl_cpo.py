"""TRL drop-in: ``FusedCPOTrainer``, TRL's experimental ``CPOTrainer`` with its loss step run by pygpo's fused pass.

    from trl.experimental.cpo import CPOConfig
    from pygpo.integrations.trl_cpo import FusedCPOTrainer
    trainer = FusedCPOTrainer(model=model, args=CPOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()                                  # same arguments, same logs, same losses

What changes (:mod:`pygpo.integrations.trl_pairwise`): the decoder body runs on TRL's concatenated
``[chosen; rejected]`` batch without the lm_head, and :class:`pygpo.FusedPreferenceLoss` computes the completion
tokens' log-probs (no logits; prompt and padding positions cost nothing), the sequence scores and the loss.

TRL scores a completion by its summed log-prob ``lp`` (``sigmoid``, ``hinge``) or its mean ``m = lp / |y|``
(``ipo``, ``simpo``), and adds ``cpo_alpha`` times the behaviour-cloning NLL: ``nn.CrossEntropyLoss`` over the
chosen rows, the token mean over every chosen completion token of the batch, which is the registry's
``NLL_mean(y_w)`` (``sft``, ``cpo``). The loss is ``mean_B(pair loss) + cpo_alpha * NLL_mean``. ``CPOConfig`` maps
to the registry (``pygpo.losses``):

=====================================  ==========================================================================
TRL ``CPOConfig``                      pygpo
=====================================  ==========================================================================
``loss_type="sigmoid"``                ``cpo`` with ``beta``, ``eps = label_smoothing``, ``alpha = cpo_alpha``
                                       (Xu et al., 2024, "Contrastive Preference Optimization", Eq. 3 and 6)
``loss_type="hinge"``                  ``hinge`` with ``beta`` on reference scores fixed at 0
                                       (``relu(1 - beta (lp_w - lp_l))``, SLiC; Zhao et al., 2023), plus ``sft``
``loss_type="ipo"``                    ``ipo`` with ``beta`` on reference scores fixed at 0, length-normalised
                                       (``(m_w - m_l - 1/(2 beta))^2``; Azar et al., 2023), plus ``sft``
``loss_type="simpo"``                  ``simpo`` with ``beta``, ``gamma = simpo_gamma``, ``eps = label_smoothing``
                                       (TRL's ``beta (m_w - m_l - gamma/beta)`` is ``beta (m_w - m_l) - gamma``;
                                       Meng et al., 2024), plus ``sft``
``loss_type="alphapo"`` / ``alpha``    (TRL turns ``alphapo`` into ``simpo`` with ``cpo_alpha = 0``) ``simpo`` with
                                       ``alpha != 0``: ``alphapo`` with ``beta``, ``gamma = simpo_gamma``,
                                       ``a = alpha``: TRL's ``(1 - p^-alpha)/alpha`` at ``p = exp(m)`` is
                                       ``(1 - exp(-a m))/a`` (Gupta et al., 2025, "AlphaPO"), plus ``sft``
``cpo_alpha``                          ``alpha`` of ``cpo``; ``sft`` with ``alpha = cpo_alpha`` for the others
                                       (left out at 0, where TRL logs ``nll_loss = 0``)
=====================================  ==========================================================================

``label_smoothing`` is ignored by ``hinge`` and ``ipo``, as in TRL. Logged metrics are TRL's names and values:
``rewards/{chosen,rejected,accuracies,margins}`` (``beta`` times the score, or times AlphaPO's shaped reward),
``logps/{chosen,rejected}`` (the scores), ``logits/{chosen,rejected}`` and ``nll_loss``. Options acting outside
the loss keep the fused path: ``max_length`` / ``max_completion_length`` (tokenization), ``disable_dropout``,
gradient checkpointing, evaluation (``eval_*`` metrics), ``compute_loss(..., return_outputs=True)`` (TRL's outputs
are the metric dict, which the fused step computes alike).

What this mapping cannot express runs TRL's own loss path, with a warning saying why: ``alpha != 0`` with
``sigmoid``, ``hinge`` or ``ipo`` (no registry key shapes those rewards), ``alpha != 0`` with label smoothing,
settings outside the registry's ranges (``beta <= 0``, ``label_smoothing`` above 0.5, a negative ``cpo_alpha``),
encoder-decoder models, MoE router auxiliary losses, vision-language models, PEFT prompt-learning adapters, models
whose lm_head :func:`~pygpo.integrations.hidden_states.lm_head_of` cannot reproduce; so does a batch with a
completion of no scored token.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..fused import FusedPreferenceLoss
from ..losses.reference_free import alphapo_reward
from .trl_common import registry_loss
from .trl_pairwise import FusedPairwiseMixin

try:
    from trl.experimental.cpo import CPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("pygpo.integrations.trl_cpo needs TRL >= 1.16: pip install 'pygpo[trl]'") from exc

#: TRL ``loss_type`` -> (registry key, {registry hparam: CPOConfig attribute}); ``simpo`` with ``alpha != 0`` runs
#: ``alphapo`` (:func:`fused_cpo_loss_for`).
LOSS_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "sigmoid": ("cpo", {"beta": "beta", "eps": "label_smoothing", "alpha": "cpo_alpha"}),
    "hinge": ("hinge", {"beta": "beta"}),
    "ipo": ("ipo", {"beta": "beta"}),
    "simpo": ("simpo", {"beta": "beta", "gamma": "simpo_gamma", "eps": "label_smoothing"}),
}
#: The loss types TRL scores by the mean token log-prob (``average_log_prob``).
MEAN_SCORED = frozenset({"ipo", "simpo"})


def fused_cpo_loss_for(args: Any, *, softcap: Optional[float] = None, backend: str = "auto",
                       memory_budget: Optional[int] = None) -> tuple[Optional[FusedPreferenceLoss], str]:
    """The :class:`FusedPreferenceLoss` equivalent to a ``CPOConfig``, or ``(None, reason)`` (module docstring)."""
    loss_type, alpha = args.loss_type, float(args.alpha)
    if loss_type not in LOSS_TYPES:
        return None, f"loss_type {loss_type!r} has no fused mapping"
    key, params = LOSS_TYPES[loss_type]
    hparams = {name: getattr(args, attr) for name, attr in params.items()}
    if alpha != 0.0:
        if loss_type != "simpo":
            return None, f"alpha={alpha} (AlphaPO's reward shape) has a registry key for loss_type 'simpo' only"
        if float(args.label_smoothing) != 0.0:
            return None, "alpha != 0 together with label_smoothing has no fused mapping (alphapo has no smoothing)"
        key, hparams = "alphapo", {"beta": args.beta, "gamma": args.simpo_gamma, "a": alpha}
    components, named = {key: 1.0}, {f"{key}.{n}": v for n, v in hparams.items()}
    if key != "cpo" and float(args.cpo_alpha) != 0.0:
        components["sft"] = 1.0
        named["sft.alpha"] = args.cpo_alpha
    return registry_loss(components, softcap=softcap, backend=backend, memory_budget=memory_budget, **named)


class FusedCPOTrainer(FusedPairwiseMixin, CPOTrainer):
    """TRL's experimental ``CPOTrainer`` whose loss step runs pygpo's fused pass (see the module docstring).

    Takes exactly the arguments of ``trl.experimental.cpo.CPOTrainer``, plus the keyword-only ``backend`` and
    ``memory_budget`` of :class:`~pygpo.integrations.trl_pairwise.FusedPairwiseMixin`.
    """

    _pygpo_name = "FusedCPOTrainer"
    _pygpo_loss_factory = staticmethod(fused_cpo_loss_for)
    _pygpo_padding_attr = "pad_token_id"
    _pygpo_logit_width_cut = 0  # TRL's logits/* average every position

    def _pygpo_step(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    concat: dict[str, Tensor]):
        rows = hidden.shape[0] // 2
        ref_kw: dict[str, Any] = {}
        if any(spec.reference == "required" for spec in self.pygpo_loss.specs):  # hinge / ipo: reference-free
            ref_kw["ref_logps"] = torch.zeros(rows, 2, dtype=torch.float32, device=hidden.device)
        out = self.pygpo_loss(hidden[:, :-1], weight, labels, bias=bias, **ref_kw)
        sums, lengths = out.policy_logps, out.lengths.to(out.policy_logps.dtype)
        scores = sums / lengths if self.loss_type in MEAN_SCORED else sums
        shaped = alphapo_reward(scores.detach(), self.alpha) if self.alpha != 0.0 else scores.detach()
        if self.cpo_alpha == 0:
            nll = torch.zeros((), device=hidden.device)
        else:  # TRL's cross-entropy mean over the batch's chosen completion tokens
            nll = -sums[:, 0].detach().sum() / lengths[:, 0].sum()
        return out.loss, (self.beta * shaped, scores), {"nll_loss": nll}
