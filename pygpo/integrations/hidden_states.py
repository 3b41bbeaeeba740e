"""Final hidden states and the lm_head of a ``transformers`` causal LM, for the fused log-prob ops.

The fused ops (:func:`pygpo.fused_linear_logprobs`) take the decoder's last hidden states and the
lm_head weight instead of logits, so a model must be run *without* its lm_head::

    hidden = final_hidden_states(model, input_ids, attention_mask=mask)      # (B, T, D), no B x T x V
    head = lm_head_of(model)                                                  # weight (V, D), bias, ...
    logps = head.logprobs(hidden[:, :-1], labels[:, 1:])                      # (B, T-1) float32

Wrappers. ``model`` may be a ``*ForCausalLM``, or that model wrapped by
``DistributedDataParallel``/``DataParallel`` (``.module``), by a PEFT ``PeftModel`` (``get_base_model()``;
adapters injected into the body's layers run, adapters *on the lm_head* are refused), by
``torch.compile`` (``_orig_mod``; the body then runs uncompiled), or sharded with FSDP2 ``fully_shard``.

How wrappers keep working. :func:`final_hidden_states` calls the outermost module as in a normal
forward, with the forward of the module directly under any DDP wrapper (or of the model itself)
replaced, for that one call only, by the decoder body's forward. So everything a wrapper does around
its forward still happens:

* DDP: gradient synchronisation is armed by ``DistributedDataParallel.forward`` (it prepares the
  reducer for the backward). Calling ``model.module.model(...)`` directly skips it, and the gradients of
  a step then silently stay rank-local. Passing the DDP wrapper itself to :func:`final_hidden_states`
  routes the body through DDP's forward (so ``with ddp.no_sync():`` gradient accumulation also behaves as
  usual). With ``find_unused_parameters=True`` DDP decides from the
  forward's outputs which parameters will get gradients; the body's output does not reach an untied
  lm_head weight, so the helper also hands DDP a view of that weight (no compute, no extra gradient):
  the weight must then be used in the loss, as in ``head.logprobs(...)``.
* FSDP2: the root's pre-forward hook all-gathers the root's parameters (embeddings, final norm,
  lm_head), and the root keeps them unsharded after its forward (torch's default for the root), so
  :func:`lm_head_of` called after :func:`final_hidden_states` returns the unsharded lm_head weight and
  FSDP2's backward reduce-scatters its gradient like any other. When the lm_head weight is still a
  sharded ``DTensor`` (a root sharded with ``reshard_after_forward=True``, or ``fully_shard(model.lm_head)``
  as its own unit, whose forward never runs),
  :func:`lm_head_of` all-gathers it with ``DTensor.full_tensor(grad_placements=[Partial("avg")])``: its
  backward reduce-scatters the rank-local gradients with the same averaging FSDP2 applies.
* Prefix sharing (:func:`pygpo.integrations.transformers.enable_prefix_sharing`): pass
  ``prefix_layout=batch.layout`` through ``**forward_kwargs``; its pre-hooks run on the model and body.

Forward hooks registered on that replaced module see the body's output (``BaseModelOutputWithPast``)
instead of a ``CausalLMOutput``; an instance-level ``forward`` already set on it (e.g. accelerate's
mixed-precision wrapper) is bypassed for the call and restored afterwards.

Logit transforms after the lm_head that :class:`LMHead` knows: final logit softcapping
(``config.final_logit_softcapping`` of Gemma-2/3, ``logits_soft_cap`` of RecurrentGemma,
``output_logit_soft_cap`` of xLSTM), the linear logit scales of :data:`_LOGIT_SCALES` (Cohere's
``logit_scale``, Granite's and MiniCPM3's ``logits_scaling`` divisor, Falcon-H1's ``lm_head_multiplier``,
Inkling's muP width divisor) and Inkling's cut of a padded
vocabulary (``unpadded_vocab_size``). A config with another ``logits_scaling``/``output_multiplier``/... is
refused rather than guessed, and so is a model whose logits need parameters outside its decoder body and
lm_head (BERT-style prediction heads: dense + norm before the output projection) or read another output
of the body than ``last_hidden_state`` (ProphetNet's n-gram predicting stream).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple, Optional

from torch import Tensor, nn

_LM_HEAD_ONLY_KWARGS = ("labels", "logits_to_keep", "num_logits_to_keep")
#: Linear logit scales, by ``config.model_type`` prefix: ``(prefix, config attribute, exponent)`` for
#: ``logits = (hidden @ W.T) * value ** exponent``, as each model's forward computes them.
_LOGIT_SCALES = (
    ("cohere", "logit_scale", 1),                     # logits * logit_scale
    ("granite", "logits_scaling", -1),                # logits / logits_scaling
    ("hyperclovax", "logits_scaling", 1),             # logits * logits_scaling (muP)
    # the two hidden-side divisions below equal logit scales because those lm_heads have no bias
    ("minicpm3", "logits_scaling", -1),               # lm_head(hidden / logits_scaling)
    ("falcon_h1", "lm_head_multiplier", 1),           # lm_head(hidden) * lm_head_multiplier
    ("inkling", "logits_mup_width_multiplier", -1),   # lm_head(hidden / logits_mup_width_multiplier)
)
#: Final logit softcapping ``c * tanh(logits / c)``, by the config attribute that holds ``c``.
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
#: Logit transforms whose meaning differs between architectures: refused outside :data:`_LOGIT_SCALES`.
_UNKNOWN_LOGIT_TRANSFORMS = ("logits_scaling", "output_multiplier", "lm_head_multiplier", "logits_mup_width_multiplier")
#: Causal LMs whose logits are not ``lm_head(last_hidden_state)``, by ``config.model_type``: what they read.
_LOGITS_FROM_ANOTHER_STREAM = {
    "prophetnet": "the first of its n-gram predicting streams (the body's second output)",
}


class LMHead(NamedTuple):
    """The lm_head of a causal LM as the fused ops consume it.

    ``logits = softcap(logit_scale * (hidden @ weight.T + bias))`` with ``softcap(r) = c * tanh(r / c)``
    when ``softcap = c`` is set (Gemma-2, "Gemma 2: Improving Open Language Models at a Practical Size",
    2024), as ``model(...).logits`` computes them.
    """

    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]
    logit_scale: float

    def projection(self) -> tuple[Tensor, Optional[Tensor]]:
        """Weight and bias with the logit scale folded in: ``scale * (h W^T + b) = h (scale W)^T + scale b``."""
        if self.logit_scale == 1.0:
            return self.weight, self.bias
        scale = float(self.logit_scale)
        return self.weight * scale, None if self.bias is None else self.bias * scale

    def logprobs(self, hidden: Tensor, labels: Tensor, *, temperature: float = 1.0, **kwargs: Any) -> Tensor:
        """:func:`pygpo.fused_linear_logprobs` of ``labels`` under this head's logits divided by ``temperature``.

        ``hidden (..., D)``, ``labels (...)`` (``ignore_index`` rows give 0.0); ``kwargs`` go to the op.
        Without a softcap the logit scale folds into the temperature; with both, the weight (and bias) are
        scaled first (a differentiable ``V x D`` product).
        """
        from ..ops import fused_linear_logprobs

        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        weight, bias, scale = self.weight, self.bias, float(self.logit_scale)
        if scale != 1.0 and self.softcap is not None:
            weight = weight * scale
            bias = None if bias is None else bias * scale
            scale = 1.0
        return fused_linear_logprobs(
            hidden, weight, labels, bias=bias, softcap=self.softcap, temperature=temperature / scale, **kwargs
        )


def _is_ddp(module: nn.Module) -> bool:
    return isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def _is_fsdp1(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside DDP/DataParallel, PEFT and ``torch.compile`` wrappers (any nesting)."""
    seen = 0
    while True:
        if _is_fsdp1(model):
            raise TypeError(
                "FullyShardedDataParallel (FSDP1) wrappers are not supported: shard with "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
        if _is_ddp(model):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:  # PEFT
            model = model.get_base_model()
        else:
            return model
        seen += 1
        if seen > 16:
            raise TypeError("model wrappers nest more than 16 deep")


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder body of a causal LM: the submodule named by ``base_model_prefix`` (``model.model`` for
    Llama), else ``get_decoder()``. Its forward returns the final (normed) hidden states."""
    lm = unwrap_model(model)
    stream = _LOGITS_FROM_ANOTHER_STREAM.get(str(getattr(getattr(lm, "config", None), "model_type", "")))
    if stream is not None:
        raise TypeError(
            f"{type(lm).__name__} computes its logits from {stream}, not from the body's last_hidden_state, so "
            "final_hidden_states / lm_head_of cannot feed the fused ops; compute its logits with the model itself"
        )
    prefix = getattr(lm, "base_model_prefix", "")
    body = getattr(lm, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is lm:
        get_decoder = getattr(lm, "get_decoder", None)
        body = get_decoder() if callable(get_decoder) else None
    if not isinstance(body, nn.Module) or body is lm:
        body = getattr(lm, "model", None)  # Llama 4's text model: prefix "language_model", body at .model
    if not isinstance(body, nn.Module) or body is lm:
        raise TypeError(
            f"cannot find the decoder body of {type(lm).__name__}: expected a transformers *ForCausalLM whose "
            "base_model_prefix (or get_decoder()) names a submodule"
        )
    return body


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward) -> Iterator[None]:
    """Shadow ``module.forward`` by an instance attribute, restoring whatever was there before."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


def final_hidden_states(
    model: nn.Module,
    input_ids: Optional[Tensor] = None,
    *,
    attention_mask: Optional[Tensor] = None,
    **forward_kwargs: Any,
) -> Tensor:
    """``(B, T, D)`` final hidden states of a causal LM (after its final norm), without the lm_head.

    Equals the input of the lm_head in ``model(input_ids, attention_mask=..., **forward_kwargs)``: the
    decoder body runs (Gemma's embedding scaling and final norm live there), the lm_head never does, so
    no ``B x T x V`` logits exist. The call goes through ``model``'s own ``__call__`` (and DDP's forward),
    so wrapper hooks run; see the module docstring.

    Args:
        model: a transformers ``*ForCausalLM``, possibly wrapped (DDP, DataParallel, PEFT, compile, FSDP2).
        input_ids: ``(B, T)`` token ids (or pass ``inputs_embeds=`` in ``forward_kwargs``).
        attention_mask: optional ``(B, T)`` padding mask, as for the model.
        forward_kwargs: passed to the body, e.g. ``position_ids``, ``inputs_embeds``,
            ``prefix_layout=batch.layout`` (prefix sharing). ``use_cache`` defaults to False.

    Returns:
        The body's ``last_hidden_state``.
    """
    for name in _LM_HEAD_ONLY_KWARGS:
        if name in forward_kwargs:
            raise TypeError(
                f"final_hidden_states does not run the lm_head, so {name!r} has no meaning here; compute the "
                "loss from the hidden states (e.g. lm_head_of(model).logprobs(hidden, labels))"
            )
    if input_ids is None and forward_kwargs.get("inputs_embeds") is None:
        raise ValueError("final_hidden_states needs input_ids or inputs_embeds")
    if forward_kwargs.get("prefix_layout") is not None and getattr(unwrap_model(model), "_pygpo_prefix_sharing", None) is None:
        # without the prefix-sharing attention the layout would be ignored: every response would see the others
        raise ValueError("prefix_layout was given but the model's attention is not prefix sharing: call "
                         "pygpo.integrations.transformers.enable_prefix_sharing(model) first")
    _refuse_prompt_learning(model)
    forward_kwargs.setdefault("use_cache", False)
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile: run the eager module
        model = model._orig_mod
    body = decoder_body(model)
    target = model.module if _is_ddp(model) else model
    # DDP with find_unused_parameters walks the autograd graph from the forward's outputs; an untied
    # lm_head weight is used only after the forward, so a view of it is returned alongside.
    mark_head = bool(getattr(model, "find_unused_parameters", False))

    def body_forward(*args: Any, **kwargs: Any) -> Any:
        out = body(*args, **kwargs)
        if mark_head:
            head = unwrap_model(target).get_output_embeddings()
            return out, head.weight.view_as(head.weight)
        return out

    with _forward_replaced(target, body_forward):
        out = model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs)
    if mark_head:
        out = out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _refuse_prompt_learning(model: nn.Module) -> None:
    """A PEFT prompt-learning adapter (prompt, prefix or P-tuning) prepends virtual tokens in the wrapper's
    own forward, which the body-only call here replaces: its hidden states would silently lack them."""
    seen = 0
    while seen <= 16:
        config = getattr(model, "active_peft_config", None)
        if getattr(config, "is_prompt_learning", False):
            raise TypeError(
                f"{type(model).__name__} carries a prompt-learning adapter ({type(config).__name__}), whose virtual "
                "tokens the wrapper's forward prepends; final_hidden_states runs the decoder body alone and would "
                "leave them out: use LoRA-style adapters (inside the layers), or compute logits with the model"
            )
        inner = model.module if _is_ddp(model) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            get_base = getattr(model, "get_base_model", None)
            inner = get_base() if callable(get_base) else None
        if not isinstance(inner, nn.Module) or inner is model:
            return
        model, seen = inner, seen + 1


def _full(param: Optional[Tensor]) -> Optional[Tensor]:
    """A plain tensor for ``param``: a sharded ``DTensor`` is all-gathered, differentiably, with gradients
    reduce-scattered and averaged over ranks in backward (FSDP2's gradient reduction)."""
    if param is None:
        return None
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # torch built without distributed
        return param
    if isinstance(param, DTensor):
        return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)
    return param


def _text_config(model: nn.Module) -> Any:
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _logit_scale(config: Any) -> float:
    model_type = str(getattr(config, "model_type", ""))
    for prefix, name, exponent in _LOGIT_SCALES:
        value = getattr(config, name, None)
        if model_type.startswith(prefix) and value is not None:
            return float(value) ** exponent
    for name in _UNKNOWN_LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(
                f"{type(config).__name__} sets {name}={value}, a logit transform whose meaning differs between "
                f"architectures; lm_head_of knows those of {', '.join(sorted({p for p, _, _ in _LOGIT_SCALES}))} only"
            )
    return 1.0


def _softcap(config: Any) -> Optional[float]:
    for name in _SOFTCAPS:
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return None


def _check_plain_head(lm: nn.Module, head: nn.Module) -> None:
    """Refuse a model whose logits use parameters beyond its decoder body and lm_head (a dense + norm
    transform before the output projection, as in BERT-style heads): ``head(body(x))`` would not be them."""
    known = {id(p) for p in decoder_body(lm).parameters()} | {id(p) for p in head.parameters()}
    extra = [name for name, p in lm.named_parameters() if id(p) not in known]
    if extra:
        raise TypeError(
            f"{type(lm).__name__} computes its logits with parameters outside its decoder body and lm_head "
            f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): a prediction-head transform before "
            "the output projection, which lm_head_of does not reproduce"
        )


def lm_head_of(model: nn.Module) -> LMHead:
    """The lm_head of a causal LM as an :class:`LMHead` (weight ``(V, D)``, bias, softcap, logit_scale).

    Tied embeddings give the input embedding matrix (the same parameter). A sharded ``DTensor`` weight
    (FSDP2) is all-gathered into a full tensor whose gradient flows back to the shards; call this after
    :func:`final_hidden_states` in the same step, so an FSDP2 root has already unsharded its parameters.

    Raises ``TypeError`` for a head that is not a plain ``nn.Linear`` (an adapter, an ``nn.Linear`` subclass
    with its own forward or parameters such as Dory's learned per-token scale) or whose logits use
    parameters outside the decoder body and the head (BERT/RoBERTa-style prediction heads), and
    ``ValueError`` for a logit transform whose meaning it does not know (module docstring).
    """
    lm = unwrap_model(model)
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise TypeError(f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None)")
    if not isinstance(head, nn.Linear) or hasattr(head, "base_layer"):
        raise TypeError(
            f"the lm_head of {type(lm).__name__} is a {type(head).__name__}, not a plain nn.Linear (an adapter "
            "on the lm_head?); merge the adapter into the weight or leave the lm_head out of it"
        )
    own = sorted(name for name, _ in head.named_parameters() if name not in ("weight", "bias"))
    if type(head).forward is not nn.Linear.forward or own:
        raise TypeError(
            f"the lm_head of {type(lm).__name__} is a {type(head).__name__}, an nn.Linear with its own forward"
            f"{' and parameters ' + ', '.join(own) if own else ''} (e.g. a learned per-token logit scale), "
            "which lm_head_of does not reproduce"
        )
    _check_plain_head(lm, head)
    config = _text_config(lm)
    weight, bias = _full(head.weight), _full(head.bias)
    vocab = getattr(config, "unpadded_vocab_size", None)
    if vocab is not None and int(vocab) < weight.shape[0]:  # Inkling: logits[..., :unpadded_vocab_size]
        weight = weight[: int(vocab)]
        bias = None if bias is None else bias[: int(vocab)]
    return LMHead(weight=weight, bias=bias, softcap=_softcap(config), logit_scale=_logit_scale(config))
