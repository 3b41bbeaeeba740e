"""First-order-only backwards: a clear error on double backward instead of a wrong or broken graph.

The fused ops' backwards compute gradients with in-place tile arithmetic and compiled kernels; they
are not themselves differentiable. :func:`first_order_only` decorates such a ``backward``: it runs it
without recording a graph and, under ``create_graph=True``, returns gradients whose own ``grad_fn``
raises as soon as a second backward reaches them. Unlike ``torch.autograd.function.once_differentiable``,
which marks the gradients only when the *upstream* gradients require grad, this marks them whenever a
graph is being created, because the gradients always depend on the op's saved inputs: a second
derivative that silently treated them as constants would be wrong.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Passes first-order gradients through; its backward (a second-order derivative) raises.

    ``anchors`` (the op's saved inputs, or upstream gradients, that require grad) connect this node to
    the graph, so a second ``torch.autograd.grad`` w.r.t. the op's inputs reaches it and raises.
    """

    @staticmethod
    def forward(ctx, name: str, grads: tuple, *anchors):
        del anchors
        ctx.name = name
        return grads

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"{ctx.name} is differentiable once only: trying to differentiate twice (create_graph=True and a "
            "second backward through its gradient); second-order derivatives are not supported"
        )


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an ``autograd.Function.backward`` (under ``@staticmethod``) that supports first order only.

    A first-order backward, with or without ``retain_graph``, runs exactly as before. With
    ``create_graph=True`` the gradients come back attached to a node that raises when differentiated.
    """
    name = backward.__qualname__.split(".")[0]

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():  # grad mode is on in a backward only under create_graph=True
            return grads
        anchors = [t for t in (*ctx.saved_tensors, *grad_outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not anchors:  # nothing the gradients depend on is differentiable: they are constants
            return grads
        single = not isinstance(grads, tuple)
        marked = _NotTwiceDifferentiable.apply(name, (grads,) if single else grads, *anchors)
        return marked[0] if single else marked

    return wrapper
