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
function; a 2-D padding ``attention_mask`` is turned into a 4-D boolean causal mask by a pre-hook, since
the mask builder is bypassed, and a layer with a ``sliding_window`` shorter than the keys gets the same
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
  :data:`_SINK_MODELS`, checked against their eager attention);
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

import contextvars
import inspect
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..prefix.attention import as_layout, prefix_attention
from ..prefix.batch import PrefixBatch
from ..prefix.layout import PrefixLayout
from ..prefix.torch_attention import sink_attention

ATTENTION_NAME = "pygpo_prefix"
LAYOUT_KWARG = "prefix_layout"
_BACKEND_KWARG = "pygpo_prefix_backend"
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
    _refuse_unsupported_terms(kwargs)
    _check_forward_state(module, layout, attention_mask)
    chunk = _attention_chunk(module)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        rest = {k: v for k, v in kwargs.items() if k != _BACKEND_KWARG}
        q_len, kv_len = query.shape[-2], key.shape[-2]
        if attention_mask is not None:
            # the pre-hook's mask spans every position; the queries are the last q_len of them, and a
            # sliding-window cache holds only the last kv_len keys
            attention_mask = attention_mask[..., -q_len:, -kv_len:]
        if chunk is not None and kv_len > chunk:
            raise ValueError(_chunk_message(chunk, kv_len, "the keys span"))
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
        longest = _longest(layout)
        if longest > chunk:
            raise ValueError(_chunk_message(chunk, longest, "a packed sequence spans"))
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
    out = prefix_attention(query, key, value, layout, scale=scaling, backend=backend,
                           sliding_window=None if window is None else int(window), sinks=kwargs.get("s_aux"))[..., :d_v]
    # (B, S, Hq, d) contiguous, as transformers' own attention functions return it (callers .view() it)
    return out.transpose(1, 2).contiguous(), None


def _longest(layout: PrefixLayout) -> int:
    """The longest unshared ``prompt + response`` sequence of ``layout``, in tokens."""
    return int(layout.position_ids("cpu").max()) + 1


def _attention_chunk(module: nn.Module) -> Optional[int]:
    """The chunk size of a chunked-attention layer (Llama 4's local layers: a query sees only keys of its own
    ``attention_chunk_size`` block), else ``None``."""
    config, idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    if types is None or idx is None or types[idx] != "chunked_attention":
        return None
    return int(config.attention_chunk_size)


def _chunk_message(chunk: int, length: int, what: str) -> str:
    return (f"this layer uses chunked attention (attention_chunk_size={chunk}), but {what} {length} positions; "
            "prefix sharing implements full causal attention only")


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


#: Attention terms a layer may pass that neither path here (the prefix kernels, SDPA) implements: learned
#: attention sinks (``s_aux``, GPT-OSS) and an additive position bias. Ignoring one would change the
#: logits without a word.
_UNSUPPORTED_TERMS = {"sinks": "learned attention sinks under a name other than s_aux",
                      "position_bias": "an additive attention position bias"}
#: Parameter names of attention sinks (GPT-OSS passes them to the attention as ``s_aux``).
_SINK_PARAMETERS = ("sinks", "s_aux")
#: Models that lack SDPA only for their attention sinks, which both paths here apply (``s_aux``): checked
#: against their eager attention by the tests. Other sink models may lack SDPA for more reasons.
_SINK_MODELS = frozenset({"gpt_oss", "granite_swa", "granitemoe_swa", "flint"})


def _refuse_unsupported_terms(kwargs: dict) -> None:
    for name, what in _UNSUPPORTED_TERMS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"this attention layer passes {name} ({what}), which prefix sharing does not "
                             "implement; call disable_prefix_sharing(model)")


class _ForwardState(NamedTuple):
    """What a pre-hook handed one forward: the attention function checks that its inputs come from it."""

    owner: int  # id() of the module whose pre-hook pushed this state
    layout: Optional[PrefixLayout]
    mask: Any  # the attention_mask given to the model: None, a tensor or a dict of tensors
    calls: list  # [number of prefix-sharing attention calls during this forward]


#: Stack of the prefix-shared forwards running in this thread/context (a model and its body both push).
#: Gradient-checkpoint recomputation runs outside it and goes by the layer's own keyword arguments.
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("pygpo_prefix_forwards", default=())


def _pop_state(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    stack = _ACTIVE.get()
    if not stack or stack[-1].owner != id(module):  # a pre-hook that raised pushed nothing
        return
    _ACTIVE.set(stack[:-1])
    state = stack[-1]
    if output is not None and state.layout is not None and not state.calls[0]:
        # e.g. set_attn_implementation("sdpa") after enable_prefix_sharing: the layout was ignored
        raise ValueError(
            f"{type(module).__name__} ran a forward with prefix_layout without calling the prefix-sharing attention "
            f"(its attention implementation is {getattr(module.config, '_attn_implementation', None)!r}), so every "
            "response saw the others; call enable_prefix_sharing(model) again"
        )


def _same_mask(mask: Any, given: Any) -> bool:
    """Whether ``mask`` is (a view of) the mask the model was given."""
    if isinstance(given, dict):
        return any(_same_mask(mask, m) for m in given.values())
    return (isinstance(mask, Tensor) and isinstance(given, Tensor)
            and mask.untyped_storage().data_ptr() == given.untyped_storage().data_ptr())


def _check_forward_state(module: nn.Module, layout: Any, attention_mask: Any) -> None:
    """Inside a prefix-shared forward, refuse an attention call that lost the layout on its way (a model whose
    layers do not pass their keyword arguments on would attend across responses) or that brings a mask the
    model built itself (a learned or dynamic attention bias: neither path here implements it)."""
    stack = _ACTIVE.get()
    if not stack:
        return
    for outer in stack:
        outer.calls[0] += 1
    state = stack[-1]
    name = type(module).__name__
    if state.layout is not None and layout is None:
        raise ValueError(
            f"{name} was called without the prefix_layout the model was given: this model does not pass its "
            "attention keyword arguments through its layers, so the layer would attend across responses; "
            "prefix sharing cannot run on it (call disable_prefix_sharing(model))"
        )
    if attention_mask is not None and not _same_mask(attention_mask, state.mask):
        raise ValueError(
            f"{name} attends under a mask or bias it builds itself (e.g. a dynamic attention mask), not the "
            "model's causal/padding mask; prefix sharing does not implement it (call disable_prefix_sharing(model))"
        )


def _rope_parameters(config: Any) -> list[dict]:
    """The RoPE parameter dicts of ``config`` (one, or one per layer type)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return []
    if all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def _check_length_dependent_terms(config: Any, layout: PrefixLayout, row_len: int) -> None:
    """Refuse a layout that a length-dependent term would see differently from the unshared sequences.

    * Dynamic-NTK and LongRoPE rotary embeddings switch their frequencies on ``max(position_ids) + 1``,
      the longest sequence of the whole batch; as long as that stays within the original context every
      sequence gets the original frequencies, shared or not.
    * Llama 4's attention temperature tuning scales the queries of its NoPE layers by
      ``log1p(floor((i + 1) / floor_scale))`` of the *row offset* ``i`` (not the position id): equal to the
      unshared value (1) while the row is shorter than ``floor_scale``.
    """
    for rope in _rope_parameters(config):
        kind = str(rope.get("rope_type", rope.get("type", "default")))
        if "dynamic" in kind or kind == "longrope":
            limit = rope.get("original_max_position_embeddings") if kind == "longrope" else None
            limit = int(limit or config.max_position_embeddings)
            longest = _longest(layout)  # read only for such models: a host read of the layout
            if longest > limit:
                raise ValueError(
                    f"this model's rotary embedding ({kind}) changes its frequencies for sequences longer than "
                    f"{limit} positions, and a packed sequence spans {longest}: the shared forward would use the "
                    "frequencies of the batch's longest sequence for every response; pack shorter sequences"
                )
    no_rope = getattr(config, "no_rope_layers", None)
    if getattr(config, "attn_temperature_tuning", False) and no_rope is not None and not all(no_rope):
        floor = int(config.floor_scale)
        if row_len >= floor:
            raise ValueError(
                f"this model scales the queries of its NoPE layers by the row offset (attn_temperature_tuning, "
                f"floor_scale={floor}), and a packed row holds {row_len} tokens: the responses packed after "
                f"offset {floor - 1} would be scaled differently from their unshared sequences; pack rows "
                f"shorter than {floor} tokens (max_tokens)"
            )


def _cache_of(kwargs: dict) -> Any:
    """The KV cache a forward was given: ``past_key_values``, or ``cache`` as transformers 5 names it."""
    cache = kwargs.get("past_key_values")
    return kwargs.get("cache") if cache is None else cache


def _pre_hook(backend: str):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args, kwargs = prepare(module, args, kwargs)
        state = _ForwardState(id(module), kwargs.get(LAYOUT_KWARG), kwargs.get("attention_mask"), [0])
        _ACTIVE.set(_ACTIVE.get() + (state,))
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
            if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
                if bool(attention_mask.all()):
                    kwargs["attention_mask"] = None
                else:
                    kwargs["attention_mask"] = _padding_mask_4d(attention_mask, attention_mask.shape[1])
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
        _check_length_dependent_terms(module.config, layout, ref.shape[1])
        kwargs["use_cache"] = False
        kwargs[_BACKEND_KWARG] = backend
        return args, kwargs

    return hook


#: Layer types (``config.layer_types``) prefix sharing runs: attention (sliding and chunked layers are checked
#: against each layout's lengths) and token-wise feed-forward layers. Every other type mixes tokens by a
#: recurrence, a convolution or a sparse key selection that the prefix mask does not reach.
_SUPPORTED_LAYER_TYPES = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "dense", "sparse", "moe"})


def _refuse_unsupported_layers(model: nn.Module, body: nn.Module) -> None:
    """Raise ``ValueError`` for a model whose tokens meet outside causal attention or whose positions do not
    come from ``position_ids``: in a packed row such a model would carry one response into the next."""
    name = type(model).__name__
    config = model.config
    if getattr(model, "_is_stateful", False):
        raise ValueError(f"{name} has recurrent layers (state-space, linear attention, ...): their state flows from "
                         "one response into the next along a packed row, which no attention mask can stop; prefix "
                         "sharing supports attention-only models")
    unsupported = sorted({str(t) for t in getattr(config, "layer_types", None) or ()} - _SUPPORTED_LAYER_TYPES)
    if unsupported:
        raise ValueError(f"{name} has layers of type {', '.join(unsupported)}, which mix tokens outside causal "
                         "attention (a recurrence, a convolution or a sparse key selection); prefix sharing supports "
                         f"layers of type {', '.join(sorted(_SUPPORTED_LAYER_TYPES))}")
    for stack_name, stack in body.named_children():
        # the decoder's layer stacks (an audio/vision encoder beside them sees no text tokens)
        if not isinstance(stack, nn.ModuleList):
            continue
        for sub_name, sub in stack.named_modules():
            if isinstance(sub, nn.Conv1d) and sub.kernel_size[0] > 1:
                raise ValueError(f"{name} convolves over the sequence ({stack_name}.{sub_name}: kernel size "
                                 f"{sub.kernel_size[0]}), which would carry one response into the next in a packed "
                                 "row; prefix sharing supports attention-only models")
    for sub_name, sub in model.named_modules():
        if isinstance(sub, nn.Embedding) and "position" in sub_name and sub.padding_idx is not None:
            raise ValueError(f"{name} numbers its learned positions from its padding index ({sub_name}: "
                             f"RoBERTa-style position ids start at {sub.padding_idx + 1}), not from 0 as the "
                             "layout's position ids do")
        if getattr(sub, "is_causal", True) is False:
            raise ValueError(f"{name} has non-causal attention ({sub_name}.is_causal is False: bidirectional or "
                             "cross-attention); prefix sharing implements causal self-attention only")
    # the body's pre-hook hands it the layout's position ids, whatever the outer forward passes on
    if "position_ids" not in inspect.signature(body.forward).parameters:
        raise ValueError(f"{type(body).__name__}.forward takes no position_ids, so its positions cannot restart at "
                         "every response; prefix sharing needs a model that takes position_ids")


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
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        raise ValueError("this model softcaps attention logits (attn_logit_softcapping), which prefix sharing "
                         "does not implement")
    if not model._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface")
    sinks = any(n.rsplit(".", 1)[-1] in _SINK_PARAMETERS for n, _ in model.named_parameters())
    softcap_off = hasattr(model.config, "attn_logit_softcapping")  # and None: refused above otherwise
    known_reason = (model.config.model_type in _SINK_MODELS) if sinks else softcap_off
    if getattr(model, "_supports_sdpa", True) is False and not known_reason:
        # without a layout the attention delegates to SDPA; a model that cannot run SDPA would get different
        # logits. Two known reasons are handled: Gemma-2 style models lack SDPA for their attention softcap only
        # and run it exactly once the softcap is off; GPT-OSS lacks it for its sinks, which both paths apply.
        raise ValueError(f"{type(model).__name__} does not support SDPA attention (_supports_sdpa is False, "
                         "e.g. learned attention sinks), which prefix sharing builds on")
    try:
        base = decoder_body(model)
    except TypeError:  # a model without a separate body: its own hooks suffice
        base = model
    _refuse_unsupported_layers(model, base)
    if getattr(model, _STATE_ATTR, None) is not None:
        disable_prefix_sharing(model)
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    hook = _pre_hook(backend)
    handles = []
    for module in (model, base) if base is not model else (model,):
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(module.register_forward_hook(_pop_state, with_kwargs=True, always_call=True))
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
