"""The fused ops under ``torch.autocast``: they choose their own precision, the same in forward and backward.

Autocast would run the ``torch.mm`` calls of a backend's forward (which typically sits inside an
autocast region, as in TRL's training step) in 16 bits, and those of its backward (which usually runs
outside it) in the inputs' dtype: the backward would then differentiate other logits than those the
forward's log-sum-exp came from. :func:`autocast_off` runs a backend's ``forward`` and ``backward``
with autocast disabled, so both follow the backend's documented numerics (fp32 accumulation of the
inputs' dtype) whatever the caller's autocast state. The ``cuda`` backend instead adopts autocast's
dtype for its tiles, chosen once in the forward (:mod:`pygpo.ops.backends.cuda_logprobs`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

#: Device types whose autocast state is switched off (those pygpo's backends run on).
DEVICE_TYPES = ("cpu", "cuda")


def autocast_disabled() -> contextlib.ExitStack:
    """A context with autocast off for every device type of :data:`DEVICE_TYPES` where it is on."""
    stack = contextlib.ExitStack()
    for device_type in DEVICE_TYPES:
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def autocast_off(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an autograd ``forward`` / ``backward`` to run it with autocast disabled."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper
