"""``acc += a @ b`` into an accumulator of higher precision than ``a`` and ``b``.

Every chunked backward in pygpo sums one matmul per chunk of rows into a float32 gradient:
``dW += dRaw^T @ H_chunk`` (and, in the tile backends, ``dH_rows += dRaw @ W_cols``). With bf16 or
fp16 inputs there are three ways to do it, tried in this order:

1. **in place** (CUDA): ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)``: cuBLAS reads
   the half-precision operands, accumulates in fp32 and adds into ``acc`` itself (beta = 1). No
   temporary at all.
2. **fp32 product** (CUDA): ``acc += torch.mm(a, b, out_dtype=torch.float32)``: same precision, but
   a temporary the size of ``acc`` (2 GiB for dW at V=128256, D=4096) written and read once per
   chunk: on an H100 run of the fused DPO loss this was about 2 GiB of peak memory and ~10 ms.
3. **rounded product** (anywhere): ``acc += torch.mm(a, b)``, the product rounded once to the inputs'
   dtype before the fp32 add (a half-precision temporary).

Which of 1 and 2 this torch build supports is probed once per device on a tiny exact product, so an
overload that exists but misbehaves is never trusted. Inputs in the accumulator's dtype use
``acc.addmm_(a, b)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)
#: per device: the best working mode, 1 (in place), 2 (fp32 product) or 3 (rounded product)
_MODE: dict[torch.device, int] = {}


def _probe(device: torch.device) -> int:
    """The first of the modes 1, 2 that gives the exact result on ``device``, else 3."""
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device, dtype=torch.bfloat16)
    expected = torch.tensor([[7.5, 10.5], [15.5, 22.5]])  # 0.5 + a @ a, exact in every dtype here
    try:
        acc = torch.full((2, 2), 0.5, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        if torch.equal(acc.cpu(), expected):
            return 1
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    try:
        acc = torch.full((2, 2), 0.5, device=device)
        acc.add_(torch.mm(a, a, out_dtype=torch.float32))
        if torch.equal(acc.cpu(), expected):
            return 2
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    return 3


def accumulate_mode(device: torch.device) -> int:
    """How :func:`add_matmul_` accumulates half-precision products on ``device`` (module docstring)."""
    if device.type != "cuda":
        return 3  # the out_dtype overloads are CUDA kernels
    if device not in _MODE:
        _MODE[device] = _probe(device)
    return _MODE[device]


def add_matmul_(acc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``acc += a @ b`` in place, ``acc`` ``(m, n)`` float32 (or ``a``'s dtype), ``a (m, k)``, ``b (k, n)``.

    Returns ``acc``. ``a`` and ``b`` may be transposed views; a non-contiguous ``acc`` costs the
    in-place mode one temporary.
    """
    if a.dtype == acc.dtype:
        return acc.addmm_(a, b)
    mode = accumulate_mode(a.device) if acc.dtype == torch.float32 and a.dtype in _HALF else 3
    if mode == 1:
        if acc.is_contiguous():
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return acc.copy_(torch.addmm(acc, a, b, out_dtype=torch.float32))
    if mode == 2:
        return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    return acc.add_(torch.mm(a, b))
