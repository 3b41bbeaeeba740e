"""TRL drop-in: ``FusedKTOTrainer``, TRL's ``KTOTrainer`` with its loss computed by pygpo's fused pass.

    from pygpo.integrations.trl_kto import FusedKTOTrainer
    trainer = FusedKTOTrainer(model=model, args=KTOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()                                  # same arguments, same logs, same losses

What changes: the loss step runs the decoder body through the (possibly DDP-wrapped) model without its
lm_head (:func:`pygpo.integrations.hidden_states.final_hidden_states`, so DDP's gradient sync stays
armed), then :class:`pygpo.FusedPreferenceLoss` (one response per example, the desirable flags as
``preference_labels``) computes the per-token log-probs of policy and reference in fused passes over the
completion tokens only (no logits), the sequence scores, the loss and the entropy. The lm_head's logit
transforms (softcap, logit scale, bias) come from :func:`~pygpo.integrations.hidden_states.lm_head_of`.
KTO's reference point (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization", Eq. 7) is computed as TRL computes it: the policy's and the reference's summed log-probs
of TRL's mismatched completions (each prompt with its batch neighbour's completion, scored under
``no_grad`` by the same fused op), ``z0 = clamp(mean_ranks(mean_batch(lp(y') - rp(y'))), min=0)``,
detached, the mean over ranks gathered as TRL gathers it; it reaches the registry head as ``z0``.

TRL's ``KTOConfig`` maps to the registry (``pygpo.losses``):

==================================  =============================================================
TRL ``KTOConfig``                   pygpo
==================================  =============================================================
``loss_type="kto"``                 ``kto`` with ``beta``, ``desirable_weight``,
                                    ``undesirable_weight`` and ``z0`` from the mismatched pairs
``loss_type="apo_zero_unpaired"``   ``apo_zero_unpaired`` with ``beta`` (D'Oosterlinck et al., 2024,
                                    "Anchored Preference Optimization and Contrastive Revisions");
                                    with desirable / undesirable weights other than 1: ``kto`` with
                                    those weights and ``z0 = 0``, the same math
                                    (``1 - sigma(-beta u) = sigma(beta u)``)
``precompute_ref_log_probs``        cached per-response reference sums (``ref_logps``; TRL's
                                    ``ref_KL_logps`` for ``z0``), computed by pygpo's fused pass too
no ``ref_model`` (PEFT)             the reference is the policy with its adapters off, as in TRL
==================================  =============================================================

Logged metrics are TRL's names and values: ``kl``, ``entropy``, ``num_tokens``, ``logits/chosen``,
``logits/rejected`` (mean logit over the desirable / undesirable completion tokens), ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (per-side means over all
ranks). The mean logit is ``h . mean_v(W_v) + mean_v(b_v)`` by linearity; under a softcap it is not linear,
and a forward-only pass over the vocabulary computes it. TRL's KTO has no reference-free mode. Options
that act outside the loss keep the fused path: ``max_length`` and ``pad_to_multiple_of`` (the collator),
``sync_ref_model`` (the ref model is read at every step), ``use_liger_kernel`` (layer kernels only, as TRL
applies them), gradient checkpointing, activation offloading, evaluation (``eval_*`` metrics).

What this mapping cannot express runs TRL's own loss path, with a warning saying why: settings outside
the registry's ranges (``beta <= 0``, a negative desirable or undesirable weight), a loss type without a
mapping, MoE router auxiliary losses, vision-language models and datasets, encoder-decoder models, PEFT
prompt-learning adapters, models whose lm_head :func:`~pygpo.integrations.hidden_states.lm_head_of` cannot
reproduce (an adapter on the lm_head, a prediction-head transform, an unknown logit transform); so does
``return_outputs=True``, and a batch with a completion of no scored token (an empty prompt before a
one-token completion).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from ..fused import FusedPreferenceLoss
from ..fused.scores import ProjectionOptions
from ..losses import HyperParameterError
from ..ops import fused_linear_logprobs
from .hidden_states import final_hidden_states, lm_head_of, unwrap_model
from .trl import FusedReferenceMixin
from .trl_common import fused_loss_for_model, row_mean_logit_sums, unsupported_model

try:
    from trl import KTOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("pygpo.integrations.trl_kto needs TRL: pip install 'pygpo[trl]'") from exc

#: TRL ``loss_type`` -> registry key (with unit weights; see :func:`fused_kto_loss_for`).
LOSS_TYPES: dict[str, str] = {"kto": "kto", "apo_zero_unpaired": "apo_zero_unpaired"}

#: Batch keys that are not model inputs (TRL's own list, both sequences).
_NON_MODEL_KEYS = frozenset({"input_ids", "attention_mask", "completion_mask", "label", "ref_logps", "ref_KL_logps",
                             "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
                             "KL_mm_token_type_ids"})
_IGNORE = -100


def fused_kto_loss_for(args: Any, *, softcap: Optional[float] = None, backend: str = "auto",
                       memory_budget: Optional[int] = None) -> tuple[Optional[FusedPreferenceLoss], str]:
    """The :class:`FusedPreferenceLoss` equivalent to a ``KTOConfig``, or ``(None, reason)``.

    ``apo_zero_unpaired`` with weights other than 1 becomes ``kto`` with those weights; the trainer then gives
    ``z0 = 0``, which turns KTO's ``1 - sigma(beta (u - z0))`` / ``1 - sigma(beta (z0 - u))`` into APO-zero's
    ``1 - sigma(beta u)`` / ``sigma(beta u)``, weighted per side as TRL weights them.
    """
    loss_type = args.loss_type
    if loss_type not in LOSS_TYPES:
        return None, f"loss_type {loss_type!r} has no fused mapping"
    weights = {"desirable_weight": args.desirable_weight, "undesirable_weight": args.undesirable_weight}
    if loss_type == "apo_zero_unpaired" and all(float(w) == 1.0 for w in weights.values()):
        key, hparams = "apo_zero_unpaired", {"beta": args.beta}
    else:
        key, hparams = "kto", {"beta": args.beta, **weights}
    try:
        loss = FusedPreferenceLoss(key, stateful=False, softcap=softcap, backend=backend, memory_budget=memory_budget,
                                   **hparams)
    except HyperParameterError as exc:  # TRL runs settings outside the paper's ranges (e.g. a negative weight)
        return None, f"a setting outside the range pygpo's loss registry accepts: {exc}"
    return loss, ""


def _model_kwargs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The model inputs of the completions (``prefix=""``) or of TRL's mismatched KL completions (``"KL_"``)."""
    kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
    kwargs.update(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"],
                  use_cache=False)
    return kwargs


def _shifted_labels(batch: dict[str, Tensor], prefix: str = "") -> Tensor:
    """Next-token labels ``(B, T-1)`` of the completion tokens, ``-100`` elsewhere (as TRL masks them)."""
    return batch[f"{prefix}input_ids"].masked_fill(batch[f"{prefix}completion_mask"] == 0, _IGNORE)[:, 1:]


class FusedKTOTrainer(FusedReferenceMixin, KTOTrainer):
    """TRL's ``KTOTrainer`` whose loss step runs pygpo's fused pass (see the module docstring).

    Args:
        *args, **kwargs: exactly those of ``trl.KTOTrainer``.
        backend: fused-op backend (``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``).
        memory_budget: bytes one logit tile may use in the torch backend (``FusedPreferenceLoss``'s option).
    """

    def __init__(self, *args: Any, backend: str = "auto", memory_budget: Optional[int] = None, **kwargs: Any):
        ProjectionOptions.checked(_IGNORE, 1.0, None, backend, memory_budget, None)  # bad options fail before any work
        # TRL may score the reference during its own __init__ (precompute_ref_log_probs): the fused loss is set
        # up on first use, so that call takes the fused path too.
        self._pygpo_options = dict(backend=backend, memory_budget=memory_budget)
        self._pygpo_ready = False
        super().__init__(*args, **kwargs)
        self._pygpo_setup()

    def _pygpo_unsupported(self) -> Optional[str]:
        """Why this trainer's model or data cannot take the fused path, or ``None``."""
        return unsupported_model(
            self.model, encoder_decoder=getattr(unwrap_model(self.model).config, "is_encoder_decoder", False),
            aux_loss=self.aux_loss_enabled, vision=self._is_vlm or self._is_vision_dataset)

    def _pygpo_setup(self) -> None:
        if self._pygpo_ready:
            return
        self._pygpo_ready = True
        loss, reason = fused_loss_for_model(self.model, self._pygpo_unsupported(), fused_kto_loss_for, self.args,
                                            **self._pygpo_options)
        if loss is None:
            warnings.warn(f"FusedKTOTrainer: {reason}; TRL's own loss path is used", stacklevel=3)
        self.pygpo_loss: Optional[FusedPreferenceLoss] = loss
        self.pygpo_fallback_reason = reason

    # ------------------------------------------------------------------------------ scores

    def _sequence_logps(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
        """``(B,)`` summed completion log-probs of ``hidden (B, T, D)`` (last position dropped), no gradient."""
        opts = self.pygpo_loss.options
        with torch.no_grad():
            return fused_linear_logprobs(hidden[:, :-1].detach(), weight.detach(), labels,
                                         bias=None if bias is None else bias.detach(), softcap=opts.softcap,
                                         backend=opts.backend, memory_budget=opts.memory_budget).sum(dim=1)

    def _policy_kl_logps(self, model, batch: dict[str, Any]) -> Tensor:
        """The policy's summed log-probs of the mismatched KL completions, under ``no_grad`` (as TRL)."""
        with torch.no_grad():
            hidden = final_hidden_states(model, **_model_kwargs(batch, "KL_"))
            weight, bias = lm_head_of(model).projection()
            return self._sequence_logps(hidden, weight, bias, _shifted_labels(batch, "KL_"))

    def _reference_logps(self, batch: dict[str, Any], model=None, prefix: str = "") -> Tensor:
        hidden, weight, bias = self._reference_hidden(_model_kwargs(batch, prefix), model)
        return self._sequence_logps(hidden, weight, bias, _shifted_labels(batch, prefix))

    def compute_ref_log_probs(self, model, inputs):
        """Reference sums ``(completion, KL completion or None)`` for ``precompute_ref_log_probs``, fused."""
        self._pygpo_setup()
        if self.pygpo_loss is None:
            return super().compute_ref_log_probs(model, inputs)
        with self.accelerator.autocast():
            logps = self._reference_logps(inputs, model)
            kl = self._reference_logps(inputs, model, "KL_") if self.calculate_KL else None
        return logps, kl

    # ------------------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs, return_outputs):
        if self.pygpo_loss is None or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, Tensor) else v) for k, v in inputs.items()}
        labels = _shifted_labels(batch)
        if not bool((labels != _IGNORE).any(dim=1).all()):
            self._pygpo_warn_unscored()
            return super()._compute_loss(model, inputs, return_outputs)
        # The model's own forward runs under accelerate's mixed-precision autocast; so does the fused path.
        with self.accelerator.autocast():
            return self._fused_loss(model, batch, labels)

    def _pygpo_warn_unscored(self) -> None:
        if getattr(self, "_pygpo_warned_unscored", False):
            return
        self._pygpo_warned_unscored = True
        warnings.warn("FusedKTOTrainer: a completion has no scored token (its first token is at position 0 and it "
                      "has no other); TRL's own loss path runs such batches", stacklevel=4)

    def _reference_point(self, model, batch: dict[str, Any]) -> Tensor:
        """TRL's ``kl``: ``clamp(mean over ranks of mean(lp(y') - rp(y')), min=0)``, detached; 0 without KL."""
        if not self.calculate_KL:
            return torch.zeros((), device=self.accelerator.device)
        policy = self._policy_kl_logps(model, batch)
        ref = batch["ref_KL_logps"] if self.precompute_ref_logps else self._reference_logps(batch, prefix="KL_")
        kl = (policy - ref.to(policy.device)).mean().detach()
        return self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)

    def _fused_loss(self, model, batch: dict[str, Any], labels: Tensor) -> Tensor:
        mode = "train" if self.model.training else "eval"
        desirable = batch["label"].to(torch.bool)
        z0 = self._reference_point(model, batch)
        model_kwargs = _model_kwargs(batch)
        hidden = final_hidden_states(model, **model_kwargs)[:, :-1]
        if self.precompute_ref_logps:
            ref_kw: dict[str, Any] = {"ref_logps": batch["ref_logps"].reshape(-1, 1)}
        else:
            ref_hidden, ref_w, ref_b = self._reference_hidden(model_kwargs)
            ref_kw = dict(ref_hidden=ref_hidden[:, :-1], ref_weight=ref_w, ref_bias=ref_b)
        if self.pygpo_loss.specs[0].key == "kto":
            ref_kw["z0"] = z0
        weight, bias = lm_head_of(model).projection()
        out = self.pygpo_loss(hidden, weight, labels, bias=bias, responses_per_example=1, preference_labels=desirable,
                              **ref_kw)
        logit_sums = row_mean_logit_sums(hidden, weight, bias, labels, opts=self.pygpo_loss.options)
        self._log_fused_metrics(mode, out, batch, desirable, z0, logit_sums)
        return out.loss

    def _log_fused_metrics(self, mode: str, out, batch: dict[str, Tensor], desirable: Tensor, kl: Tensor,
                           logit_sums: Tensor) -> None:
        """TRL's metric names and aggregation: sums and counts gathered across ranks, then divided."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        total = lambda x: acc.gather_for_metrics(x.detach().reshape(())).sum().item()  # noqa: E731
        metrics["kl"].append(kl.item())
        lengths = out.lengths[:, 0].to(torch.float32)
        tokens = total(lengths.sum())
        entropy_sum = out.metrics["entropy"].float() * lengths.sum()  # every row has a scored token (checked)
        metrics["entropy"].append(total(entropy_sum) / tokens if tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += total(batch["attention_mask"].sum()) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        policy = out.policy_logps[:, 0].detach()
        rewards = self.beta * (policy - out.ref_logps[:, 0].to(policy.device))
        sides = {"chosen": desirable, "rejected": ~desirable}
        for side, sel in sides.items():
            n_tokens = total(lengths[sel].sum())
            if n_tokens > 0:
                metrics[f"logits/{side}"].append(total(logit_sums[sel].sum()) / n_tokens)
        counts = {side: total(sel.sum()) for side, sel in sides.items()}
        for side, sel in sides.items():
            if counts[side] > 0:
                metrics[f"rewards/{side}"].append(total(rewards[sel].nansum()) / counts[side])
                metrics[f"logps/{side}"].append(total(policy[sel].nansum()) / counts[side])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
