"""TRL drop-in: ``FusedORPOTrainer``, TRL's experimental ``ORPOTrainer`` with its loss step run by pygpo's fused pass.

    from trl.experimental.orpo import ORPOConfig
    from pygpo.integrations.trl_orpo import FusedORPOTrainer
    trainer = FusedORPOTrainer(model=model, args=ORPOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()                                  # same arguments, same logs, same losses

What changes (:mod:`pygpo.integrations.trl_pairwise`): the decoder body runs on TRL's concatenated
``[chosen; rejected]`` batch without the lm_head, and :class:`pygpo.FusedPreferenceLoss` computes the completion
tokens' log-probs (no logits), the mean scores ``m = lp / |y|`` and the loss.

ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq. 4-7) as TRL
computes it: ``loss = NLL - beta * mean_B(logsig(L))``, ``L = (m_w - m_l) - (log(1 - e^m_w) - log(1 - e^m_l))``.
TRL's NLL is ``nn.CrossEntropyLoss`` over the chosen rows' *whole* sequences (every attended token after the
first, prompt included): the token mean over ``N`` = all those tokens of the batch. The registry's ``orpo`` head
has ``NLL_mean(y_w)`` over the chosen completions; given ``nll_mean_length = N / B`` its NLL term is
``-sum_B lp(y_w) / N``, the completion tokens' share of TRL's mean, and the prompt tokens' share,
``-sum lp(prompt tokens of the chosen rows) / N``, comes from :func:`pygpo.fused_linear_cross_entropy` over those
positions alone (the rejected rows' prompts and all padding still cost nothing). ``ORPOConfig`` maps to the registry
(``pygpo.losses``):

=====================================  ==========================================================================
TRL ``ORPOConfig``                     pygpo
=====================================  ==========================================================================
``beta``                               ``lam`` of ``orpo``
the NLL over prompt + completion       ``orpo``'s ``nll_mean_length = N / B`` plus the chosen prompt tokens'
                                       cross-entropy sum over ``N``
``padding_value``                      TRL's own ``concatenated_inputs`` pads the input ids with it
=====================================  ==========================================================================

Logged metrics are TRL's names and values: ``rewards/{chosen,rejected,accuracies,margins}`` (``beta * m``),
``logps/{chosen,rejected}`` (``m``), ``logits/{chosen,rejected}``, ``nll_loss``, ``log_odds_ratio``
(``mean_B logsig(L)``) and ``log_odds_chosen`` (``mean_B L``). Options acting outside the loss keep the fused path:
``max_length`` / ``max_completion_length`` (tokenization), ``disable_dropout``, gradient checkpointing, evaluation
(``eval_*`` metrics), ``compute_loss(..., return_outputs=True)`` (TRL's outputs are the metric dict, which the
fused step computes alike).

What this mapping cannot express runs TRL's own loss path, with a warning saying why: a negative ``beta``
(outside the registry's range), encoder-decoder models, MoE router auxiliary losses, vision-language models, PEFT
prompt-learning adapters, models whose lm_head :func:`~pygpo.integrations.hidden_states.lm_head_of` cannot
reproduce; so does a batch with a completion of no scored token.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..fused import FusedPreferenceLoss
from ..ops import fused_linear_cross_entropy
from .trl_common import registry_loss
from .trl_pairwise import IGNORE_INDEX, FusedPairwiseMixin

try:
    from trl.experimental.orpo import ORPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("pygpo.integrations.trl_orpo needs TRL >= 1.16: pip install 'pygpo[trl]'") from exc


def fused_orpo_loss_for(args: Any, *, softcap: Optional[float] = None, backend: str = "auto",
                        memory_budget: Optional[int] = None) -> tuple[Optional[FusedPreferenceLoss], str]:
    """The :class:`FusedPreferenceLoss` equivalent to an ``ORPOConfig`` (``orpo``, ``lam = beta``), or
    ``(None, reason)``."""
    return registry_loss("orpo", softcap=softcap, backend=backend, memory_budget=memory_budget, lam=args.beta)


class FusedORPOTrainer(FusedPairwiseMixin, ORPOTrainer):
    """TRL's experimental ``ORPOTrainer`` whose loss step runs pygpo's fused pass (see the module docstring).

    Takes exactly the arguments of ``trl.experimental.orpo.ORPOTrainer``, plus the keyword-only ``backend`` and
    ``memory_budget`` of :class:`~pygpo.integrations.trl_pairwise.FusedPairwiseMixin`.
    """

    _pygpo_name = "FusedORPOTrainer"
    _pygpo_loss_factory = staticmethod(fused_orpo_loss_for)
    _pygpo_padding_attr = "padding_value"
    _pygpo_logit_width_cut = 1  # TRL's logits/* leave out the last position

    def _pygpo_step(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    concat: dict[str, Tensor]):
        rows = hidden.shape[0] // 2
        ids, attended = concat["concatenated_input_ids"][:rows, 1:], concat["concatenated_attention_mask"][:rows, 1:]
        # TRL's NLL targets: every attended token of the chosen rows after the first; the completion ones are
        # scored by the registry head, the prompt ones here
        n_tokens = attended.sum().to(torch.float32)
        prompt = ids.masked_fill((attended == 0) | (labels[:rows] != IGNORE_INDEX), IGNORE_INDEX)
        out = self.pygpo_loss(hidden[:, :-1], weight, labels, bias=bias, nll_mean_length=n_tokens / rows)
        opts = self.pygpo_loss.options
        prompt_nll = fused_linear_cross_entropy(hidden[:rows, :-1], weight, prompt, bias=bias, reduction="sum",
                                                softcap=opts.softcap, backend=opts.backend,
                                                memory_budget=opts.memory_budget) / n_tokens
        scores = out.policy_logps / out.lengths.to(out.policy_logps.dtype)
        nll = (prompt_nll - out.policy_logps[:, 0].sum() / n_tokens).detach()
        values = {"nll_loss": nll, "log_odds_ratio": out.metrics["log_odds_ratio"],
                  "log_odds_chosen": out.metrics["log_odds_chosen"]}
        return out.loss + prompt_nll, (self.beta * scores.detach(), scores), values
