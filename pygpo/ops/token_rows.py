"""Shared front half of the fused ops: validate, compact the valid rows, dispatch, scatter back.

Rows whose label is ``ignore_index`` are removed before any backend runs, so they cost no matmul
work; their outputs are 0.0 and they receive zero gradient.

The pieces (:func:`check_options`, :func:`resolve_run`, :func:`select_rows`, :func:`gather_rows`,
:func:`empty_outputs`, :func:`scatter_rows`) are used by :func:`valid_row_stats` (one model) and by
:func:`pygpo.ops.policy_ref.fused_linear_kl` (policy and reference side by side).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .backends.torch_tiles import acc_dtype
from .dispatch import load_backend, resolve_backend
from .token_stats import StatRequest, TokenStats
from .validation import check_flag, check_linear_inputs, check_memory_budget, check_positive


class RowSelection(NamedTuple):
    """Where the valid rows sit in the flattened ``(N,)`` input."""

    index: Tensor  # (M,) int64 positions of the valid rows
    num_rows: int  # N
    shape: torch.Size  # labels' shape


class ValidRowStats(NamedTuple):
    """Statistics of the valid rows and where they belong in the flattened input."""

    stats: TokenStats  # each (M,) float32 or None
    index: Tensor  # (M,) int64 positions in the flattened (N,) input
    num_rows: int  # N
    shape: torch.Size  # labels' shape


class _EmptyOutputs(torch.autograd.Function):
    """Outputs of zero rows, still attached to the graph so every input gets a zero gradient.

    ``flags[k]`` says whether output ``k`` is an empty float32 (float64 for float64 inputs) tensor or ``None``.
    """

    @staticmethod
    def forward(ctx, flags: tuple[bool, ...], *tensors: Optional[Tensor]):
        ctx.save_for_backward(*tensors)
        empty = tensors[0].new_zeros(0, dtype=acc_dtype(tensors[0]))
        return tuple(empty.clone() if f else None for f in flags)

    @staticmethod
    def backward(ctx, *grads):
        return (None,) + tuple(None if t is None else torch.zeros_like(t) for t in ctx.saved_tensors)


def empty_outputs(flags: tuple[bool, ...], *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """``len(flags)`` outputs for zero valid rows; ``tensors`` (first one not ``None``) get zero gradients."""
    return _EmptyOutputs.apply(tuple(flags), *tensors)


def check_options(temperature: float, softcap: Optional[float], memory_budget: Optional[int], *,
                  deterministic: Optional[bool] = None) -> None:
    """The scalar options every fused op shares: ``temperature`` and ``softcap`` (``None`` or) positive
    finite reals, ``memory_budget`` ``None`` or a positive int, ``deterministic`` ``None`` or a bool."""
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, allow_none=True)
    check_memory_budget(memory_budget)
    check_flag("deterministic", deterministic, allow_none=True)


def resolve_run(backend: str, device: torch.device, deterministic: Optional[bool], *,
                op: str = "token_stats") -> tuple[str, bool]:
    """Concrete backend name, and ``deterministic`` with ``None`` meaning ``True``.

    The deterministic Triton backward (logit-gradient chunks, then cuBLAS matmuls) measured 31.7 ms
    against 291 ms for the fused atomic one at N=8192, D=4096, V=128256 bf16 on an H100
    (``bench/results/logprobs_nvidia-h100-80gb-hbm3_2026-11-27_1f49527_*``), so it is the default.
    """
    name = resolve_backend(backend, device, op=op)
    return name, True if deterministic is None else bool(deterministic)


#: Device types whose torch has no ``nonzero_static`` kernel (CUDA before torch 2.6), found on first use.
_NO_NONZERO_STATIC: set[str] = set()


def nonzero_rows(mask: Tensor, count: int) -> Tensor:
    """``(count,)`` int64 positions of the True entries of the 1-D ``mask``, whose number ``count`` the
    caller knows: ``nonzero_static`` reads nothing back from the device, where this torch has it for the
    device (otherwise ``nonzero``, one host sync)."""
    if mask.device.type not in _NO_NONZERO_STATIC:
        try:
            return torch.nonzero_static(mask, size=count)[:, 0]
        except NotImplementedError:  # no kernel for this device in this torch
            _NO_NONZERO_STATIC.add(mask.device.type)
    return mask.nonzero()[:, 0]


def select_rows(labels: Tensor, ignore_index: int, num_valid: int) -> tuple[RowSelection, Tensor]:
    """The valid rows of ``labels (...)`` and their labels ``(M,)`` int64.

    ``num_valid`` (``M``, known on the host from the label check's one sync) sizes the compaction, so
    it reads nothing back from the device (``nonzero`` without a size would synchronise).
    """
    flat_y = labels.reshape(-1)
    if num_valid == flat_y.numel():  # nothing ignored (a prefix batch's targets): no compaction work at all
        index = torch.arange(num_valid, device=labels.device)
    else:
        index = nonzero_rows(flat_y != ignore_index, num_valid)
    return RowSelection(index, flat_y.numel(), labels.shape), flat_y.index_select(0, index).long()


def gather_rows(x: Tensor, rows: RowSelection) -> Tensor:
    """The valid rows ``(M, D)`` of ``x (..., D)``; a differentiable gather, so ignored rows get zero gradient."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows.index)


def valid_row_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    *,
    ignore_index: int,
    req: StatRequest,
    backend: str,
    memory_budget: Optional[int],
    deterministic: Optional[bool],
    rows: Optional[tuple[RowSelection, Tensor]] = None,
) -> ValidRowStats:
    """Validate, compact the valid rows, run the backend. ``rows``: the valid rows and their labels
    (:func:`select_rows`) of labels the caller has range-checked already; then nothing is read back
    from the device here (otherwise the label check is the call's one host sync)."""
    check_options(req.temperature, req.softcap, memory_budget, deterministic=deterministic)
    num_valid = check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index,
                                    label_range=rows is None)
    name, deterministic = resolve_run(backend, hidden.device, deterministic)

    rows, y = select_rows(labels, ignore_index, num_valid) if rows is None else rows
    h = gather_rows(hidden, rows)
    if rows.index.numel() == 0:
        flags = (True, True, req.entropy, req.log_sum_p2, req.mean_logit, req.top1)
        stats = TokenStats(*empty_outputs(flags, h, weight, bias))
    else:
        impl = load_backend(name)
        stats = impl.compute_token_stats(
            h.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), y, req,
            memory_budget=memory_budget, deterministic=deterministic,
        )
    return ValidRowStats(stats, rows.index, rows.num_rows, rows.shape)


def scatter_rows(values: Tensor, rows: RowSelection | ValidRowStats) -> Tensor:
    """Place per-valid-row ``values`` (M,) into a zero tensor of their dtype and the labels' shape."""
    out = values.new_zeros(rows.num_rows).index_put((rows.index,), values)
    return out.reshape(rows.shape)
