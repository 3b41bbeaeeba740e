"""The prefix-shared forwards running in this context, so the attention function can check that its inputs
come from them: a layer that lost the layout on its way (decoder layers that do not pass their keyword
arguments on) or that brings a mask it built itself, and a layout forward that never reached the
prefix-sharing attention (its implementation switched after enabling), are refused.
"""

from __future__ import annotations

import contextvars
from typing import Any, NamedTuple, Optional

from torch import Tensor, nn

from ..prefix.layout import PrefixLayout


class _ForwardState(NamedTuple):
    """What a pre-hook handed one forward: the attention function checks that its inputs come from it."""

    owner: int  # id() of the module whose pre-hook pushed this state
    layout: Optional[PrefixLayout]
    mask: Any  # the attention_mask given to the model: None, a tensor or a dict of tensors
    padding: Any  # without a layout: the 4-D padding mask built from a 2-D mask (None: no padding)
    checkpointing: bool  # gradient checkpointing in training mode: layers recompute outside this forward
    calls: list  # [number of prefix-sharing attention calls during this forward]


#: Stack of the prefix-shared forwards running in this thread/context (a model and its body both push).
#: Gradient-checkpoint recomputation runs outside it and goes by the layer's own keyword arguments.
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("pygpo_prefix_forwards", default=())


def pop_state(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
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


def check_forward_state(module: nn.Module, layout: Any, attention_mask: Any) -> None:
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


def forward_padding(module: nn.Module) -> Optional[Tensor]:
    """The 4-D padding mask of the forward running now, for an attention call that did not receive it through
    its keyword arguments (layers that do not pass them on: StableLM, Nemotron); ``None`` outside a forward.

    A gradient-checkpointed layer would recompute outside the forward, without the mask: refused instead.
    """
    stack = _ACTIVE.get()
    if not stack or stack[-1].padding is None:
        return None
    if stack[-1].checkpointing:
        raise ValueError(
            f"{type(module).__name__} was called without the padding mask the model was given: this model does not "
            "pass its attention keyword arguments through its layers, so its gradient-checkpointed layers would "
            "recompute attending to padding; call disable_prefix_sharing(model) before a padded forward, or "
            "train without gradient checkpointing"
        )
    return stack[-1].padding


def _checkpointing(module: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


def push_state(module: nn.Module, layout: Optional[PrefixLayout], mask: Any, padding: Any = None) -> None:
    """Record that ``module``'s forward starts with ``layout``, ``attention_mask`` ``mask`` and, without a
    layout, the 4-D ``padding`` mask built from it (a pre-hook); :func:`pop_state` (a forward hook) ends it."""
    checkpointing = module.training and _checkpointing(module)
    _ACTIVE.set(_ACTIVE.get() + (_ForwardState(id(module), layout, mask, padding, checkpointing, [0]),))
