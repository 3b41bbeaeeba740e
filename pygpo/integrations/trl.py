"""TRL drop-in: ``FusedDPOTrainer``, TRL's ``DPOTrainer`` with its loss computed by pygpo's fused pass.

    from pygpo.integrations.trl import FusedDPOTrainer
    trainer = FusedDPOTrainer(model=model, args=DPOConfig(...), train_dataset=ds, processing_class=tok)
    trainer.train()                                  # same arguments, same logs, same losses

What changes: the loss step runs the decoder body through the (possibly DDP-wrapped) model without its
lm_head (:func:`pygpo.integrations.hidden_states.final_hidden_states`, so DDP's gradient sync stays
armed), then :class:`pygpo.FusedPreferenceLoss` computes the per-token log-probs of policy and
reference in fused passes over the completion tokens only (no logits), the sequence scores, the loss
and the metrics. With ``prefix_sharing=True`` each prompt is run once for both responses
(:mod:`pygpo.prefix`); a batch whose chosen and rejected rows kept different prompt tokens (TRL's
``truncation_mode="keep_end"`` truncates the two rows separately) runs unshared, with a warning once.

TRL's options map to the registry (``pygpo.losses``):

==================================  =============================================================
TRL ``DPOConfig``                   pygpo
==================================  =============================================================
``loss_type`` (list) + weights      a combined loss, ``{key: weight}``: sigmoid -> ``dpo``, hinge,
                                    ipo, exo_pair -> ``exo``, nca_pair -> ``nca``, robust, bco_pair,
                                    sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft,
                                    sigmoid_norm
``beta``, ``label_smoothing``       ``beta``; ``eps`` of exo / robust / aot / aot_unpaired
``discopop_tau``                    ``tau`` of discopop
``f_divergence_type`` (sigmoid)     ``fdpo`` with ``divergence``, ``alpha = 1 - f_alpha_divergence_coef``
``use_weighting`` (sigmoid)         ``wpo`` with ``clamp=False``
``ld_alpha``                        the ``ld`` reducer with ``alpha = ld_alpha``: as in TRL it
                                    shapes the preference log-ratios only (IPO / sigmoid_norm divide
                                    them by the full completion length); the ``sft`` term and the WPO
                                    weights read the raw per-token log-probs
``precompute_ref_log_probs``        cached per-response reference sums (``ref_logps``), computed by
                                    pygpo's fused pass too
==================================  =============================================================

Combinations TRL supports and this mapping does not express (an f-divergence or WPO weighting with
another loss type than sigmoid, both together, ``sft`` alone, settings outside the registry's ranges such
as a negative loss weight or an alpha-divergence coefficient outside [0, 1], ``padding_free``, MoE router auxiliary losses, precomputed reference
scores with ``ld_alpha``) run TRL's own loss path, with a warning saying why; so does
``return_outputs=True``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from ..fused import FusedPreferenceLoss
from ..fused.eager import NotSeparableError
from ..losses import HyperParameterError
from ..prefix import pack
from .hidden_states import final_hidden_states, lm_head_of, unwrap_model

try:
    from trl import DPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError("pygpo.integrations.trl needs TRL: pip install 'pygpo[trl]'") from exc

#: TRL loss_type -> (registry key, {registry hparam: DPOConfig attribute}).
LOSS_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "sigmoid": ("dpo", {"beta": "beta"}),
    "hinge": ("hinge", {"beta": "beta"}),
    "ipo": ("ipo", {"beta": "beta"}),
    "exo_pair": ("exo", {"beta": "beta", "eps": "label_smoothing"}),
    "nca_pair": ("nca", {"beta": "beta"}),
    "robust": ("robust", {"beta": "beta", "eps": "label_smoothing"}),
    "bco_pair": ("bco_pair", {"beta": "beta"}),
    "sppo_hard": ("sppo_hard", {"beta": "beta"}),
    "aot": ("aot", {"beta": "beta", "eps": "label_smoothing"}),
    "aot_unpaired": ("aot_unpaired", {"beta": "beta", "eps": "label_smoothing"}),
    "apo_zero": ("apo_zero", {"beta": "beta"}),
    "apo_down": ("apo_down", {"beta": "beta"}),
    "discopop": ("discopop", {"beta": "beta", "tau": "discopop_tau"}),
    "sft": ("sft", {}),
    "sigmoid_norm": ("sigmoid_norm", {"beta": "beta"}),
}

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
#: The registry keys whose length normalisation TRL takes from the unshifted completion mask.
_COMPLETION_MASK_LENGTHS = frozenset({"ipo", "sigmoid_norm"})


def _f_divergence(args: Any) -> Optional[tuple[str, Optional[float]]]:
    """``(divergence, alpha)`` of ``fdpo`` for TRL's f-divergence (``alpha`` only for the alpha divergence),
    or ``None`` for reverse KL.

    TRL's alpha-divergence coefficient ``c`` scores ``(exp((c-1)u) - 1)/(c-1)``: reverse KL at ``c = 1``,
    forward KL at ``c = 0``, and pygpo's alpha divergence with ``alpha = 1 - c`` in between.
    """
    kind = getattr(args, "f_divergence_type", "reverse_kl")
    kind = getattr(kind, "value", kind)
    coef = float(getattr(args, "f_alpha_divergence_coef", 1.0))
    if kind == "alpha_divergence":
        if abs(coef - 1.0) < 1e-6:
            return None
        if abs(coef) < 1e-6:
            return "forward_kl", None
        return "alpha", 1.0 - coef
    if kind == "reverse_kl":
        return None
    return {"forward_kl": "forward_kl", "js_divergence": "js"}[kind], None


def fused_loss_for(args: Any) -> tuple[Optional[FusedPreferenceLoss], str]:
    """The :class:`FusedPreferenceLoss` equivalent to a ``DPOConfig``, or ``(None, reason)``."""
    types = list(args.loss_type) if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    weights = list(args.loss_weights) if getattr(args, "loss_weights", None) else [1.0] * len(types)
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        return None, f"loss_type {unknown} has no fused mapping"
    fdiv = _f_divergence(args)
    weighting = bool(getattr(args, "use_weighting", False))
    if (fdiv or weighting) and types != ["sigmoid"]:
        return None, "f_divergence_type / use_weighting are mapped for loss_type 'sigmoid' alone"
    if fdiv and weighting:  # TRL weights the f-divergence loss by WPO's weights: no registry key is both
        return None, "f_divergence_type together with use_weighting has no fused mapping"
    if getattr(args, "padding_free", False):
        return None, "padding_free batches are not supported by the fused path"
    if args.precompute_ref_log_probs and getattr(args, "ld_alpha", None) is not None:
        return None, "precomputed reference scores with ld_alpha are already LD-weighted sums"
    if set(types) == {"sft"}:  # TRL still scores the reference, for its reward metrics
        return None, "loss_type 'sft' alone is reference-free in pygpo, while TRL scores the reference for its metrics"
    components: dict[str, float] = {}
    hparams: dict[str, Any] = {}
    for t, w in zip(types, weights):
        key, params = LOSS_TYPES[t]
        if t == "sigmoid" and fdiv:
            key, params = "fdpo", {"beta": "beta"}
            hparams["fdpo.divergence"] = fdiv[0]
            if fdiv[1] is not None:
                hparams["fdpo.alpha"] = fdiv[1]
        if t == "sigmoid" and weighting:
            key, params = "wpo", {"beta": "beta"}
            hparams["wpo.clamp"] = False
        components[key] = components.get(key, 0.0) + float(w)
        for name, attr in params.items():
            hparams[f"{key}.{name}"] = getattr(args, attr)
    ld = getattr(args, "ld_alpha", None)
    reducer = ("ld", {"alpha": float(ld)}) if ld is not None else ("sum", {})
    try:
        loss = FusedPreferenceLoss(components, reducer=reducer[0], reducer_args=reducer[1], stateful=False, **hparams)
    except HyperParameterError as exc:  # TRL runs settings outside the papers' ranges (e.g. a negative weight)
        return None, f"a setting outside the range pygpo's loss registry accepts: {exc}"
    return loss, ""


def _prefix_batch(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, pad_token_id: int):
    """The prefix-shared batch of TRL's ``[chosen rows; rejected rows]`` (prompt = attended non-completion
    tokens), or ``None`` when some example's two rows hold different (or no) prompt tokens: TRL's collator truncates
    prompt+chosen and prompt+rejected separately, and ``truncation_mode="keep_end"`` cuts each prompt from
    the left by its own amount, so one shared prompt would score a response after the wrong context."""
    rows = input_ids.shape[0] // 2
    ids, keep, comp = input_ids.cpu(), attention_mask.cpu().bool(), completion_mask.cpu().bool()
    prompts, responses = [], []
    for b in range(rows):
        c, r = b, rows + b
        prompt = ids[c][keep[c] & ~comp[c]]
        if prompt.numel() == 0 or not torch.equal(prompt, ids[r][keep[r] & ~comp[r]]):
            return None
        prompts.append(prompt.tolist())
        responses.append([ids[c][comp[c]].tolist(), ids[r][comp[r]].tolist()])
    return pack(prompts, responses, pad_token_id=pad_token_id)


class FusedReferenceMixin:
    """How the fused TRL trainers score the reference: the ref model, the policy with its adapters off (PEFT
    without a ref model, as TRL does), or the model TRL hands ``compute_ref_log_probs`` (precomputed scores:
    with ``ref_model=None``, the policy before training). Mixed into a TRL trainer (``self.model``,
    ``self.ref_model``, ``self.accelerator``, ``self.args``)."""

    def _reference_context(self, model: Optional[torch.nn.Module] = None):
        """``(model, context)`` scoring the reference: the policy with adapters off (PEFT without a ref model),
        else ``model`` when given (what TRL hands :meth:`compute_ref_log_probs`: with ``ref_model=None`` and
        precomputed scores, the policy before training), else the ref model."""
        from accelerate.utils import is_peft_model
        from trl.trainer.utils import use_adapter

        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            name = "ref" if "ref" in unwrapped.peft_config else None
            return self.model, use_adapter(unwrapped, adapter_name=name)
        return (self.ref_model if model is None else model), contextlib.nullcontext()

    def _reference_hidden(self, model_kwargs: dict[str, Any], model: Optional[torch.nn.Module] = None):
        from trl.models.utils import disable_gradient_checkpointing

        ref_model, ctx = self._reference_context(model)
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), ctx,
              self.accelerator.autocast()):
            hidden = final_hidden_states(ref_model, **model_kwargs)
            head = lm_head_of(ref_model)
            weight, bias = head.projection()
            return hidden, weight.detach(), None if bias is None else bias.detach()


class FusedDPOTrainer(FusedReferenceMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` whose loss step runs pygpo's fused pass (see the module docstring).

    Args:
        *args, **kwargs: exactly those of ``trl.DPOTrainer``.
        prefix_sharing: run each prompt once for both responses (block-sparse prefix attention).
        backend: fused-op backend (``"auto"``, ``"torch"``, ``"triton"``).
        memory_budget: bytes one logit tile may use in the torch backend.
        eager_gradients: compute the lm_head gradients in the forward (``FusedPreferenceLoss``'s option):
            a loss it cannot run that way (``ld_alpha``; ``use_weighting``; ``sft`` among the loss types,
            whose NLL is a mean over the batch's tokens) warns once and runs the ordinary fused path.
    """

    def __init__(self, *args: Any, prefix_sharing: bool = False, backend: str = "auto",
                 memory_budget: Optional[int] = None, eager_gradients: bool = False, **kwargs: Any):
        # TRL may score the reference during its own __init__ (precompute_ref_log_probs): the fused
        # loss is set up on first use, so that call takes the fused path too.
        self._pygpo_options = dict(prefix_sharing=bool(prefix_sharing), backend=backend, memory_budget=memory_budget,
                                   eager_gradients=bool(eager_gradients))
        self._pygpo_ready = False
        super().__init__(*args, **kwargs)
        self._pygpo_setup()

    def _pygpo_setup(self) -> None:
        if self._pygpo_ready:
            return
        self._pygpo_ready = True
        self.pygpo_prefix_sharing = self._pygpo_options["prefix_sharing"]
        loss, reason = fused_loss_for(self.args)
        if loss is not None and self.aux_loss_enabled:
            loss, reason = None, "MoE router auxiliary losses are not supported by the fused path"
        if loss is None:
            warnings.warn(f"FusedDPOTrainer: {reason}; TRL's own loss path is used", stacklevel=3)
        else:
            head = lm_head_of(self.model)
            loss.options = loss.options._replace(softcap=head.softcap, backend=self._pygpo_options["backend"],
                                                 memory_budget=self._pygpo_options["memory_budget"])
            if self._pygpo_options["eager_gradients"]:
                self._pygpo_enable_eager(loss)
        self.pygpo_loss: Optional[FusedPreferenceLoss] = loss
        self.pygpo_fallback_reason = reason
        if self.pygpo_prefix_sharing and loss is not None:
            from .transformers import enable_prefix_sharing

            enable_prefix_sharing(unwrap_model(self.model))
            if getattr(self, "ref_model", None) is not None:
                enable_prefix_sharing(unwrap_model(self.ref_model))

    def _pygpo_enable_eager(self, loss: FusedPreferenceLoss) -> None:
        why = loss.eager_unsupported()
        loss.eager_gradients = why is None
        if why is not None:
            self._pygpo_disable_eager(loss, why)

    @staticmethod
    def _pygpo_disable_eager(loss: FusedPreferenceLoss, why: object) -> None:
        loss.eager_gradients = False
        warnings.warn(f"FusedDPOTrainer: eager_gradients is off for this loss ({why}); the ordinary fused path runs",
                      stacklevel=4)

    def _pygpo_call(self, *args: Any, **kwargs: Any):
        """The fused loss; a loss that turns out not to be separable per example reruns without eager gradients."""
        try:
            return self.pygpo_loss(*args, **kwargs)
        except NotSeparableError as err:
            self._pygpo_disable_eager(self.pygpo_loss, err)
            return self.pygpo_loss(*args, **kwargs)

    def _pygpo_warn_unshared(self) -> None:
        if getattr(self, "_pygpo_warned_unshared", False):
            return
        self._pygpo_warned_unshared = True
        warnings.warn(
            "FusedDPOTrainer: prefix_sharing is skipped for batches whose chosen and rejected rows hold different "
            f"(or no) prompt tokens (truncation_mode={getattr(self.args, 'truncation_mode', None)!r} with "
            f"max_length={getattr(self.args, 'max_length', None)} cut the two prompts differently: keep_end "
            "truncates prompt+chosen and prompt+rejected from the left separately); such batches run the "
            "unshared fused path", stacklevel=4)

    def _pygpo_warn_position_zero(self, completion_mask: Tensor) -> None:
        if getattr(self, "_pygpo_warned_position_zero", False) or not bool(completion_mask[:, 0].any()):
            return
        self._pygpo_warned_position_zero = True
        warnings.warn(
            "FusedDPOTrainer: a completion starts at position 0 (an empty or fully truncated prompt); TRL's ipo / "
            "sigmoid_norm then count that unscored token in their length normalisation, while the other "
            "length-reading losses of this combination (sft, WPO) do not, so pygpo normalises all of them by the "
            "scored tokens and the loss differs slightly from TRL's on such batches", stacklevel=4)

    # ------------------------------------------------------------------------------ reference

    def compute_ref_log_probs(self, model, inputs):
        """Reference sequence log-probs ``(chosen, rejected)`` for ``precompute_ref_log_probs``, fused."""
        self._pygpo_setup()
        if self.pygpo_loss is None:
            return super().compute_ref_log_probs(model, inputs)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)[:, 1:]
        from ..ops import fused_linear_logprobs

        opts = self.pygpo_loss.options
        with torch.no_grad(), self.accelerator.autocast():
            hidden, weight, bias = self._reference_hidden(model_kwargs, model)
            logps = fused_linear_logprobs(hidden[:, :-1], weight, labels, bias=bias, softcap=opts.softcap,
                                          backend=opts.backend, memory_budget=opts.memory_budget)
        return logps.sum(dim=1).chunk(2, dim=0)

    # ------------------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs, return_outputs):
        if self.pygpo_loss is None or return_outputs:
            return super()._compute_loss(model, inputs, return_outputs)
        # The model's own forward runs under accelerate's mixed-precision autocast; so does the fused path.
        with self.accelerator.autocast():
            return self._fused_loss(model, inputs)

    def _fused_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)[:, 1:]

        ref_kw: dict[str, Any] = {}
        if self.args.precompute_ref_log_probs:
            ref_kw["ref_logps"] = torch.stack([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]], dim=1)
        extra: dict[str, Any] = {}
        readers = {spec.key for spec in self.pygpo_loss.specs if "lengths" in spec.input_names}
        if readers and readers <= _COMPLETION_MASK_LENGTHS:
            # TRL's IPO and sigmoid_norm divide by the completion mask's count, which includes a completion
            # token at position 0 (an empty or fully cut prompt) that no row predicts; pygpo counts scored ones
            extra["lengths"] = torch.stack(completion_mask.sum(1).clamp(min=1).float().chunk(2), dim=1)
        elif readers & _COMPLETION_MASK_LENGTHS:
            self._pygpo_warn_position_zero(completion_mask)

        batch = None
        if self.pygpo_prefix_sharing:
            batch = _prefix_batch(inputs["input_ids"], inputs["attention_mask"], completion_mask,
                                  self.processing_class.pad_token_id or 0)
            if batch is None:
                self._pygpo_warn_unshared()
        if batch is not None:
            body_kw = {"input_ids": batch.input_ids.to(labels.device), "prefix_layout": batch.layout}
            hidden = final_hidden_states(model, **body_kw)
            if not ref_kw:
                ref_hidden, ref_w, ref_b = self._reference_hidden(body_kw)
                ref_kw = dict(ref_hidden=ref_hidden, ref_weight=ref_w, ref_bias=ref_b)
            weight, bias = lm_head_of(model).projection()
            out = self._pygpo_call(hidden, weight, bias=bias, batch=batch.to(labels.device), **ref_kw, **extra)
        else:
            hidden = final_hidden_states(model, **model_kwargs)[:, :-1]
            if not ref_kw:
                ref_hidden, ref_w, ref_b = self._reference_hidden(model_kwargs)
                ref_kw = dict(ref_hidden=ref_hidden[:, :-1], ref_weight=ref_w, ref_bias=ref_b)
            weight, bias = lm_head_of(model).projection()
            out = self._pygpo_call(hidden, weight, labels, bias=bias, **ref_kw, **extra)
        self._log_fused_metrics(mode, out, inputs)
        return out.loss

    def _log_fused_metrics(self, mode: str, out, inputs: dict[str, Tensor]) -> None:
        """TRL's metric names and aggregation (token means gathered across ranks)."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        lengths = out.lengths.to(torch.float32)
        tokens = lengths.sum()

        def token_mean(name: str, count: Tensor) -> None:
            if name in out.metrics:
                total = acc.gather_for_metrics((out.metrics[name].float() * count).reshape(1)).sum()
                n = acc.gather_for_metrics(count.reshape(1)).sum()
                metrics[name].append((total / n).item() if n > 0 else 0.0)

        token_mean("entropy", tokens)
        token_mean("logits/chosen", lengths[:, 0].sum())
        token_mean("logits/rejected", lengths[:, 1].sum())
        token_mean("mean_token_accuracy", lengths[:, 0].sum())
        if mode == "train":
            num = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        policy = out.policy_logps.detach()
        ref = out.ref_logps
        rewards = self.beta * (policy - ref)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        metrics["rewards/chosen"].append(acc.gather(chosen).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((chosen > rejected).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen - rejected).mean().item())
        metrics["logps/chosen"].append(acc.gather(policy[:, 0]).mean().item())
        metrics["logps/rejected"].append(acc.gather(policy[:, 1]).mean().item())
