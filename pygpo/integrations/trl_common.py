"""Pieces the fused TRL trainers share (:mod:`.trl_kto`, :mod:`.trl_cpo`, :mod:`.trl_orpo`): the fused loss of a
trainer's config (or why not), and TRL's ``logits/*`` metric terms from hidden states."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..fused import FusedPreferenceLoss
from ..fused.scores import ProjectionOptions
from ..losses import HyperParameterError
from ..ops.token_rows import scatter_rows, valid_row_stats
from ..ops.token_stats import StatRequest
from .hidden_states import lm_head_of

def unsupported_model(model: torch.nn.Module, *, encoder_decoder: bool, aux_loss: bool, vision: bool) -> Optional[str]:
    """Why a TRL trainer's model cannot take the fused path, or ``None``: an encoder-decoder model, MoE router
    auxiliary losses, a vision-language model or data (each as the trainer detects it), or a PEFT
    prompt-learning adapter (whose virtual tokens the body-only forward would leave out)."""
    for flag, what in ((encoder_decoder, "encoder-decoder models"), (aux_loss, "MoE router auxiliary losses"),
                       (vision, "vision-language models and datasets")):
        if flag:
            return f"{what} are not supported by the fused path"
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return (f"a PEFT prompt-learning adapter ({type(peft_config).__name__}) prepends virtual tokens that the "
                "fused path omits")
    return None


#: ``(config, *, softcap, backend, memory_budget) -> (loss, "")`` or ``(None, reason)``.
LossFactory = Callable[..., "tuple[Optional[FusedPreferenceLoss], str]"]


def fused_loss_for_model(model: torch.nn.Module, unsupported: Optional[str], factory: LossFactory, args: Any,
                         **options: Any) -> tuple[Optional[FusedPreferenceLoss], str]:
    """The fused loss for a trainer's ``args`` on ``model`` (the lm_head's softcap passed on), or ``(None,
    reason)``: ``unsupported`` (why the model cannot take the fused path) when given, an lm_head
    :func:`~pygpo.integrations.hidden_states.lm_head_of` cannot reproduce, or the factory's reason."""
    if unsupported is not None:
        return None, unsupported
    try:
        softcap = lm_head_of(model).softcap
    except (TypeError, ValueError) as exc:
        return None, f"the lm_head cannot be reproduced by the fused path ({exc})"
    return factory(args, softcap=softcap, **options)


def registry_loss(loss: Any, **kwargs: Any) -> tuple[Optional[FusedPreferenceLoss], str]:
    """``(FusedPreferenceLoss(loss, **kwargs), "")``, or ``(None, reason)`` for hyper-parameters outside the
    registry's ranges (TRL runs such settings, e.g. ``beta <= 0``)."""
    try:
        return FusedPreferenceLoss(loss, compute_metrics=False, stateful=False, **kwargs), ""
    except HyperParameterError as exc:
        return None, f"a setting outside the range pygpo's loss registry accepts: {exc}"


def row_mean_logit_sums(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                        opts: ProjectionOptions) -> Tensor:
    """``(R,)`` per row of ``hidden (R, T, D)``: the sum over its scored tokens (``labels (R, T)`` not
    ignored) of the mean logit ``(1/V) sum_v z_v``, detached (TRL's ``logits/*`` terms).

    Without a softcap ``z`` is linear in ``h``: ``sum_t (h_t . mean_v W_v + mean_v b_v) / temperature``, no
    vocabulary pass. With one, a forward-only fused pass computes the per-token mean logits.
    """
    scored = labels != opts.ignore_index
    with torch.no_grad():
        if opts.softcap is not None:
            req = StatRequest(mean_logit=True, temperature=opts.temperature, softcap=opts.softcap)
            stats = valid_row_stats(hidden.detach(), weight.detach(), labels, None if bias is None else bias.detach(),
                                    ignore_index=opts.ignore_index, req=req, backend=opts.backend,
                                    memory_budget=opts.memory_budget, deterministic=opts.deterministic)
            return scatter_rows(stats.stats.mean_logit, stats).sum(dim=-1)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        with torch.autocast(hidden.device.type, enabled=False):  # the (R, D) x (D,) product stays in acc
            h = torch.bmm(scored.to(hidden.dtype)[:, None], hidden.detach())[:, 0].to(acc)   # (R, D) token sums
            sums = h @ weight.detach().mean(dim=0, dtype=acc)
        if bias is not None:
            sums = sums + scored.sum(dim=-1).to(acc) * bias.detach().mean(dtype=acc)
        return sums / opts.temperature
