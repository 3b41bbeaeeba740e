"""What prefix sharing refuses rather than computing differently from separate ``prompt + response``
forwards of a transformers model (see :mod:`pygpo.integrations.transformers`): checks of the model when
sharing is enabled, of each attention call's extra terms, and of each layout's lengths.

Found by a sweep of the installed transformers' causal LMs (tiny random models, shared forwards against
separate eager ones); each check names what it refuses and why.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from torch import nn

from ..prefix.layout import PrefixLayout


#: Attention terms a layer may pass that neither path of prefix sharing implements: sinks under another
#: name than ``s_aux`` (which both paths apply) and an additive position bias. Ignoring one would change
#: the logits without a word.
UNSUPPORTED_TERMS = {"sinks": "learned attention sinks under a name other than s_aux",
                     "position_bias": "an additive attention position bias"}
#: Parameter names of attention sinks (GPT-OSS passes them to the attention as ``s_aux``).
SINK_PARAMETERS = ("sinks", "s_aux")
#: Models that lack SDPA only for their attention sinks, which both paths here apply (``s_aux``): checked
#: against their eager attention by the tests. Other sink models may lack SDPA for more reasons.
SINK_MODELS = frozenset({"gpt_oss", "granite_swa", "granitemoe_swa", "flint"})


def refuse_unsupported_terms(kwargs: dict) -> None:
    """Raise ``ValueError`` when an attention call's keyword arguments carry a term of :data:`UNSUPPORTED_TERMS`."""
    for name, what in UNSUPPORTED_TERMS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"this attention layer passes {name} ({what}), which prefix sharing does not "
                             "implement; call disable_prefix_sharing(model)")


def longest_sequence(layout: PrefixLayout) -> int:
    """The longest unshared ``prompt + response`` sequence of ``layout``, in tokens."""
    return int(layout.position_ids("cpu").max()) + 1


def attention_chunk(module: nn.Module) -> Optional[int]:
    """The chunk size of a chunked-attention layer (Llama 4's local layers: a query sees only keys of its own
    ``attention_chunk_size`` block), else ``None``."""
    config, idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    if types is None or idx is None or types[idx] != "chunked_attention":
        return None
    return int(config.attention_chunk_size)


def chunk_message(chunk: int, length: int, what: str) -> str:
    return (f"this layer uses chunked attention (attention_chunk_size={chunk}), but {what} {length} positions; "
            "prefix sharing implements full causal attention only")


def rope_parameters(config: Any) -> list[dict]:
    """The RoPE parameter dicts of ``config`` (one, or one per layer type)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return []
    if all(isinstance(v, dict) for v in rope.values()):
        return list(rope.values())
    return [rope]


def check_length_dependent_terms(config: Any, layout: PrefixLayout, row_len: int) -> None:
    """Refuse a layout that a length-dependent term would see differently from the unshared sequences.

    * Dynamic-NTK and LongRoPE rotary embeddings switch their frequencies on ``max(position_ids) + 1``,
      the longest sequence of the whole batch; as long as that stays within the original context every
      sequence gets the original frequencies, shared or not.
    * Llama 4's attention temperature tuning scales the queries of its NoPE layers by
      ``log1p(floor((i + 1) / floor_scale))`` of the *row offset* ``i`` (not the position id): equal to the
      unshared value (1) while the row is shorter than ``floor_scale``.
    """
    for rope in rope_parameters(config):
        kind = str(rope.get("rope_type", rope.get("type", "default")))
        if "dynamic" in kind or kind == "longrope":
            limit = rope.get("original_max_position_embeddings") if kind == "longrope" else None
            limit = int(limit or config.max_position_embeddings)
            longest = longest_sequence(layout)  # read only for such models: a host read of the layout
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


#: Layer types (``config.layer_types``) prefix sharing runs: attention (sliding and chunked layers are checked
#: against each layout's lengths) and token-wise feed-forward layers. Every other type mixes tokens by a
#: recurrence, a convolution or a sparse key selection that the prefix mask does not reach.
SUPPORTED_LAYER_TYPES = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "dense", "sparse", "moe"})


def refuse_unsupported_layers(model: nn.Module, body: nn.Module) -> None:
    """Raise ``ValueError`` for a model whose tokens meet outside causal attention or whose positions do not
    come from ``position_ids``: in a packed row such a model would carry one response into the next."""
    name = type(model).__name__
    config = model.config
    if getattr(model, "_is_stateful", False):
        raise ValueError(f"{name} has recurrent layers (state-space, linear attention, ...): their state flows from "
                         "one response into the next along a packed row, which no attention mask can stop; prefix "
                         "sharing supports attention-only models")
    unsupported = sorted({str(t) for t in getattr(config, "layer_types", None) or ()} - SUPPORTED_LAYER_TYPES)
    if unsupported:
        raise ValueError(f"{name} has layers of type {', '.join(unsupported)}, which mix tokens outside causal "
                         "attention (a recurrence, a convolution or a sparse key selection); prefix sharing supports "
                         f"layers of type {', '.join(sorted(SUPPORTED_LAYER_TYPES))}")
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


def refuse_unsupported_model(model: nn.Module) -> None:
    """Raise ``ValueError`` for a model whose attention neither path of prefix sharing reproduces: attention
    logit softcapping, attention outside transformers' ``AttentionInterface``, or no SDPA support for a
    reason not handled here."""
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        raise ValueError("this model softcaps attention logits (attn_logit_softcapping), which prefix sharing "
                         "does not implement")
    if not model._can_set_attn_implementation():
        raise ValueError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface")
    sinks = any(n.rsplit(".", 1)[-1] in SINK_PARAMETERS for n, _ in model.named_parameters())
    softcap_off = hasattr(model.config, "attn_logit_softcapping")  # and None: refused above otherwise
    known_reason = (model.config.model_type in SINK_MODELS) if sinks else softcap_off
    if getattr(model, "_supports_sdpa", True) is False and not known_reason:
        # without a layout the attention delegates to SDPA; a model that cannot run SDPA would get different
        # logits. Two known reasons are handled: Gemma-2 style models lack SDPA for their attention softcap only
        # and run it exactly once the softcap is off; GPT-OSS lacks it for its sinks, which both paths apply.
        raise ValueError(f"{type(model).__name__} does not support SDPA attention (_supports_sdpa is False, "
                         "e.g. learned attention sinks), which prefix sharing builds on")
