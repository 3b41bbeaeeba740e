"""Prefix sharing inside Hugging Face ``transformers`` models (Llama, Qwen2, Mistral, Gemma, ...).

``enable_prefix_sharing(model)`` registers :func:`prefix_sharing_attention` under the name
``"pygpo_prefix"`` in transformers' ``AttentionInterface`` and switches the model to it. Then

    batch = pygpo.prefix.pack(prompts, responses)
    out = model(input_ids=batch.input_ids, prefix_layout=batch.layout)     # position ids filled in

runs one shared forward: the layout travels through the model's ``**kwargs`` to every attention layer,
and the position ids come from the layout (every response restarts at its prompt length, as in the
paper "Accelerating Direct Preference Optimization with Prefix Sharing", Wang & Hegde, 2024).

How it avoids the model's own mask: transformers builds a mask only for attention names registered in
its ``AttentionMaskInterface``; ``"pygpo_prefix"`` is deliberately not registered, so
``create_causal_mask`` returns ``None`` and no dense ``S x S`` mask is formed per forward (the Triton
backend never forms one; the torch backend forms its own boolean mask once per layout).

Without ``prefix_layout`` the model behaves as before (the attention delegates to transformers' SDPA
function; since the mask builder is bypassed, a pre-hook turns a 2-D padding ``attention_mask`` into a
4-D boolean causal mask that reaches the attention through the layers' keyword arguments, the model
itself keeping its 2-D mask, e.g. for positions counted from it as OPT does; and a layer with a ``sliding_window`` shorter than the keys gets the same
sliding-window band transformers would build; attention sinks (``s_aux``), which SDPA cannot apply, run as
an explicit softmax; a static KV cache is refused, since transformers builds its mask only for the
attention names it knows). With a layout, a layer's sliding window and sinks go to
:func:`pygpo.prefix.prefix_attention`, the window counted in each response's own positions.
:func:`response_logprobs` computes per-response log-probs from the target rows only.

What is refused rather than silently computed differently from separate ``prompt + response`` forwards:

* at :func:`enable_prefix_sharing`: models whose tokens meet outside causal self-attention (recurrent,
  state-space, linear-attention or short-convolution layers, whose state would run from one response into
  the next along a packed row: Mamba, Jamba, Zamba, Falcon-H1, Qwen3-Next, MiniMax, LFM2 ...; sparse key
  selection such as DeepSeek's indexed attention; cross-attention or bidirectional layers), models whose
  forward takes no ``position_ids`` (so positions cannot restart per response: BART-family causal LMs) or
  that number learned positions from the padding index (RoBERTa family), attention logit softcapping, and
  models that cannot run SDPA for a reason not handled here (sinks are handled for the models of
  :data:`SINK_MODELS`, checked against their eager attention);
* at forward time: a layer that receives no layout although the model was given one (decoder layers that
  do not pass their keyword arguments on: StableLM, Nemotron), a layer that brings an attention mask or
  bias it built itself (Doge's dynamic mask), a layout forward that never reached this attention (the
  implementation was switched after enabling), and layouts longer than a layer's attention chunk
  (Llama 4), than a length-dependent RoPE's original context (dynamic NTK, LongRoPE:
  their frequencies follow the batch's longest sequence) or, for Llama 4's NoPE-layer temperature
  tuning, rows of ``floor_scale`` tokens or more (that scale follows the row offset, not the position).

Multi-head latent attention whose value heads differ in width from its query/key heads (DeepSeek-V2/V3,
MiniCPM3, ...) runs with zero-padded heads.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..prefix.attention import as_layout, prefix_attention
from ..prefix.batch import PrefixBatch
from ..prefix.layout import PrefixLayout
from ..prefix.torch_attention import sink_attention
from .prefix_forward_state import check_forward_state, forward_padding, pop_state, push_state
from .prefix_model_checks import (attention_chunk, check_length_dependent_terms, chunk_message, longest_sequence,
                                  refuse_unsupported_layers, refuse_unsupported_model, refuse_unsupported_terms)

ATTENTION_NAME = "pygpo_prefix"
LAYOUT_KWARG = "prefix_layout"
_BACKEND_KWARG = "pygpo_prefix_backend"
_PADDING_KWARG = "pygpo_padding_mask"
_STATE_ATTR = "_pygpo_prefix_sharing"


def prefix_sharing_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: ``query (B, Hq, S, d)``, ``key/value (B, Hkv, S, d)`` ->
    ``(B, S, Hq, d)`` and no attention weights.

    With ``prefix_layout`` in ``kwargs``: :func:`pygpo.prefix.prefix_attention`. Without: transformers'
    SDPA attention (plain causal, or the mask the pre-hook built).
    """
    layout = kwargs.get(LAYOUT_KWARG)
    backend = kwargs.get(_BACKEND_KWARG) or "auto"
    refuse_unsupported_terms(kwargs)
    check_forward_state(module, layout, attention_mask)
    chunk = attention_chunk(module)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        rest = {k: v for k, v in kwargs.items() if k not in (_BACKEND_KWARG, _PADDING_KWARG)}
        q_len, kv_len = query.shape[-2], key.shape[-2]
        if attention_mask is None or attention_mask.dim() == 2:  # no mask built, or the model's 2-D mask handed on
            attention_mask = kwargs[_PADDING_KWARG] if _PADDING_KWARG in kwargs else forward_padding(module)
        if attention_mask is not None:
            # the pre-hook's mask spans every position; the queries are the last q_len of them, and a
            # sliding-window cache holds only the last kv_len keys
            attention_mask = attention_mask[..., -q_len:, -kv_len:]
        if chunk is not None and kv_len > chunk:
            raise ValueError(chunk_message(chunk, kv_len, "the keys span"))
        window = kwargs.get("sliding_window")
        if window is not None and int(window) < kv_len:
            attention_mask = _with_sliding_window(attention_mask, q_len, kv_len, int(window), device=query.device)
        elif attention_mask is None and 1 < q_len < kv_len:
            # queries continuing a cache: SDPA's is_causal is aligned top-left (and transformers then keeps only
            # the first q_len keys), so give the bottom-right causal band explicitly
            attention_mask = _with_sliding_window(None, q_len, kv_len, kv_len, device=query.device)
        sinks = kwargs.get("s_aux")
        if sinks is not None:  # SDPA cannot apply sinks: the explicit softmax
            if dropout:
                raise ValueError(f"prefix sharing applies attention sinks without dropout (got dropout={dropout}); "
                                 "set the model's attention_dropout to 0")
            out = sink_attention(query, key, value, sinks, scale=query.shape[-1] ** -0.5 if scaling is None else scaling,
                                 mask=attention_mask, is_causal=attention_mask is None)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **rest)
    layout = as_layout(layout)
    if dropout:
        raise ValueError(
            f"prefix sharing does not implement attention dropout (got dropout={dropout}); "
            "set the model's attention_dropout to 0"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError("prefix sharing does not implement attention logit softcapping (softcap)")
    if attention_mask is not None:
        raise ValueError("prefix_layout carries its own mask: pass no attention_mask with it")
    if kwargs.get("output_attentions"):
        raise ValueError("prefix sharing computes no attention weights: pass output_attentions=False with "
                         "prefix_layout (for attention weights, disable_prefix_sharing(model) and use eager attention)")
    if chunk is not None:
        longest = longest_sequence(layout)
        if longest > chunk:
            raise ValueError(chunk_message(chunk, longest, "a packed sequence spans"))
    window = kwargs.get("sliding_window")
    d_k, d_v = key.shape[-1], value.shape[-1]
    if scaling is None:
        scaling = d_k ** -0.5
    if d_v != d_k:
        # multi-head latent attention (DeepSeek-V2/V3, ...): value heads narrower (or wider) than query/key
        # heads; zero columns change no score and add zero output columns, which are cut off again
        width = max(d_k, d_v)
        query, key = (nn.functional.pad(t, (0, width - d_k)) for t in (query, key))
        value = nn.functional.pad(value, (0, width - d_v))
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # under autocast q and k leave RoPE in the residual stream's dtype (float32 with float32 weights) while
        # v comes straight from a 16-bit projection: attend in autocast's dtype, as SDPA does under autocast
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    out = prefix_attention(query, key, value, layout, scale=scaling, backend=backend,
                           sliding_window=None if window is None else int(window), sinks=kwargs.get("s_aux"))[..., :d_v]
    # (B, S, Hq, d) contiguous, as transformers' own attention functions return it (callers .view() it)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_sharing_attention)


def _padding_mask_4d(attention_mask: Tensor, seq_len: int) -> Tensor:
    """``(B, 1, S, S)`` bool: causal AND key not padding, OR the diagonal (padding rows see themselves)."""
    keep = attention_mask.to(torch.bool)
    idx = torch.arange(seq_len, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]
    return ((causal[None] & keep[:, None, :]) | torch.eye(seq_len, dtype=torch.bool, device=keep.device))[:, None]


def _with_sliding_window(attention_mask: Optional[Tensor], q_len: int, kv_len: int, window: int, *,
                         device: torch.device) -> Tensor:
    """``attention_mask`` (``None``, or 4-D bool / additive float) restricted to a causal sliding window:
    query ``i`` (key index ``kv_len - q_len + i``) sees keys ``j`` with ``0 <= (kv_len - q_len + i) - j < window``,
    the band transformers' own sliding-window mask keeps. Built here because the model's mask builder is
    bypassed for this attention, so without it a sliding-window layer would attend to the full prefix."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    band = (k <= q) & (k > q - window)
    if attention_mask is None:
        return band[None, None]
    if attention_mask.shape[-2] != q_len:  # the pre-hook's mask spans all key positions as queries
        attention_mask = attention_mask[..., -q_len:, :]
    attention_mask = attention_mask[..., :kv_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask & band
    return attention_mask.masked_fill(~band, torch.finfo(attention_mask.dtype).min)


def _takes_var_kwargs(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")  # an instance override (e.g. a wrapper's): read it each time
    return _forward_takes_var_kwargs(type(module)) if forward is None else _has_var_kwargs(forward)


def _has_var_kwargs(fn: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


@functools.lru_cache(maxsize=None)
def _forward_takes_var_kwargs(cls: type) -> bool:
    return _has_var_kwargs(cls.forward)


def _cache_of(kwargs: dict) -> Any:
    """The KV cache a forward was given: ``past_key_values``, or ``cache`` as transformers 5 names it."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def _pre_hook(backend: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = prepare(module, args, kwargs)
        push_state(module, kwargs.get(LAYOUT_KWARG), kwargs.get("attention_mask"), kwargs.get(_PADDING_KWARG))
        return args, kwargs

    def prepare(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        layout = kwargs.get(LAYOUT_KWARG)
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        if layout is None:
            if getattr(_cache_of(kwargs), "is_compileable", False):
                # generate builds a static cache's mask only for attention names it knows (this one is
                # deliberately not among them), and its keys span the whole cache, filled or not
                raise ValueError(
                    "a model with prefix sharing enabled continues dynamic KV caches only, not a static one "
                    "(cache_implementation='static' or a StaticCache): its padding and unfilled slots would be "
                    "attended; generate with the default dynamic cache, or call disable_prefix_sharing(model) first"
                )
            if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 and _PADDING_KWARG not in kwargs:
                padding = None if bool(attention_mask.all()) else _padding_mask_4d(attention_mask, attention_mask.shape[1])
                if _takes_var_kwargs(module):
                    # the model keeps its 2-D mask (OPT numbers its positions from it); the 4-D mask travels
                    # to the attention function through the layers' keyword arguments, as the layout does
                    kwargs[_PADDING_KWARG] = padding
                else:
                    kwargs["attention_mask"] = padding
            return args, kwargs
        if len(args) > 1:
            raise TypeError("with prefix_layout, pass attention_mask, position_ids, ... as keyword arguments")
        if isinstance(layout, PrefixBatch):
            layout = layout.layout
        if not isinstance(layout, PrefixLayout):
            raise TypeError(f"{LAYOUT_KWARG} must be a PrefixLayout or PrefixBatch, got {type(layout).__name__}")
        kwargs[LAYOUT_KWARG] = layout
        ref = ids if ids is not None else embeds
        if ref is None:
            raise ValueError("prefix sharing needs input_ids or inputs_embeds")
        layout.check_shape("input_ids" if ids is not None else "inputs_embeds", ref.shape, 0, 1)
        if attention_mask is not None:
            if not (isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 and bool(attention_mask.all())):
                raise ValueError("prefix_layout carries its own mask: pass no attention_mask (or an all-ones one)")
            kwargs["attention_mask"] = None
        expected = layout.position_ids(ref.device)
        pos = kwargs.get("position_ids")
        if pos is None:
            kwargs["position_ids"] = expected
        elif pos is not expected and (tuple(pos.shape) != tuple(expected.shape)
                                      or not torch.equal(pos.to(expected.device), expected)):
            raise ValueError(
                "position_ids do not match prefix_layout: every response must continue from its prompt length; "
                "omit position_ids to take them from the layout"
            )
        if _cache_of(kwargs) is not None:
            raise ValueError("prefix sharing is for training/scoring forwards: pass no past_key_values (or cache)")
        check_length_dependent_terms(module.config, layout, ref.shape[1])
        kwargs["use_cache"] = False
        kwargs[_BACKEND_KWARG] = backend
        return args, kwargs

    return hook


def enable_prefix_sharing(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Switch ``model`` (a transformers ``PreTrainedModel``) to prefix-sharing attention, in place.

    Args:
        model: e.g. ``LlamaForCausalLM``; any model whose attention goes through ``AttentionInterface``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for :func:`pygpo.prefix.prefix_attention`.

    Returns:
        ``model``. Forward it with ``prefix_layout=batch.layout`` (position ids are filled in). Undo with
        :func:`disable_prefix_sharing`.

    Raises:
        ValueError: for a model prefix sharing cannot reproduce (see the module docstring), leaving it
            unchanged.
    """
    from transformers import PreTrainedModel

    from .hidden_states import decoder_body

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    refuse_unsupported_model(model)
    try:
        base = decoder_body(model)
    except TypeError:  # a model without a separate body: its own hooks suffice
        base = model
    refuse_unsupported_layers(model, base)
    if getattr(model, _STATE_ATTR, None) is not None:
        disable_prefix_sharing(model)
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    hook = _pre_hook(backend)
    handles = []
    for module in (model, base) if base is not model else (model,):
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(module.register_forward_hook(pop_state, with_kwargs=True, always_call=True))
    setattr(model, _STATE_ATTR, {"previous": previous, "handles": handles})
    return model


def disable_prefix_sharing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_prefix_sharing`: remove the hooks and restore the previous attention."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for h in state["handles"]:
        h.remove()
    model.set_attn_implementation(state["previous"])
    setattr(model, _STATE_ATTR, None)
    return model


def response_logprobs(model: nn.Module, batch: PrefixBatch, *, temperature: float = 1.0) -> Tensor:
    """``(n_resp,)`` float32 sequence log-probs ``sum_t log p(y_t | prompt, y_<t)`` of every response of
    ``batch``, from one shared forward of ``model`` (which must have prefix sharing enabled).

    ``model`` may be wrapped (``DistributedDataParallel`` / ``DataParallel``, PEFT, ``torch.compile``): the
    body runs through the wrapper's own forward (:func:`pygpo.integrations.hidden_states.final_hidden_states`,
    so DDP's gradient synchronisation stays armed), and the lm_head comes from
    :func:`pygpo.integrations.hidden_states.lm_head_of` (final logit softcapping, Cohere's ``logit_scale``,
    Granite's ``logits_scaling``), so the log-probs are those of ``model(...).logits / temperature``.

    Only the ``N`` target rows go through the fused lm_head + log-prob op (never ``B x S x V`` logits). Use
    ``batch.by_example(...)`` for an ``(E, K)`` view (column 0 chosen, 1 rejected for DPO pairs).
    """
    from .hidden_states import final_hidden_states, lm_head_of, unwrap_model

    if not isinstance(batch, PrefixBatch):
        raise TypeError(f"batch must be a PrefixBatch (pygpo.prefix.pack(...)), got {type(batch).__name__}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if getattr(unwrap_model(model), _STATE_ATTR, None) is None:
        raise ValueError("call enable_prefix_sharing(model) first (on the model inside any DDP/PEFT wrapper)")
    device = next(model.parameters()).device
    # every index tensor is queued to the device now, before the forward, without a host sync; the label
    # check then reads the batch's host copy of the labels (no sync after the forward either)
    batch = batch.to(device)
    hidden = final_hidden_states(model, batch.input_ids, prefix_layout=batch.layout)
    token = lm_head_of(model).logprobs(batch.gather(hidden), batch.target_labels, temperature=temperature)
    return batch.response_sums(token)
