"""Shared pieces of the Triton kernel tests: where they run and how their errors are judged.

Tolerances (DESIGN.md, numerics): fp32 within ``FP32_RTOL`` of the float64 reference's largest
magnitude (at least 1e-2); fp16/bf16 no worse than twice the error of the same naive computation done
by torch in that dtype, plus a floor of 1e-5 relative.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch
from torch import Tensor

FP32_RTOL = 1e-5


def triton_device() -> str:
    """``"cpu"`` in Triton's interpreter, else ``"cuda"``; skips the calling test module when the
    kernels were compiled for a GPU that is not there (``pygpo.kernels`` imported before
    ``TRITON_INTERPRET=1`` was set)."""
    from pygpo.kernels import INTERPRET

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip(
            "pygpo.kernels was imported before TRITON_INTERPRET=1 was set and there is no GPU",
            allow_module_level=True,
        )
    return "cpu" if INTERPRET else "cuda"


def max_err(x: Tensor, ref: Tensor) -> float:
    """Largest absolute difference, in float64 (0 for empty tensors)."""
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def scale(ref: Tensor) -> float:
    """Largest magnitude of ``ref`` (0 for an empty tensor)."""
    return ref.double().abs().max().item() if ref.numel() else 0.0


def assert_matches_reference(
    case: str, dtype: torch.dtype, pairs: Sequence[tuple[str, Tensor, Tensor]], baseline: Callable[[], list[Tensor]]
) -> None:
    """Each ``(name, got, float64 reference)`` of ``pairs`` within the tolerance of ``dtype``.

    ``baseline()`` gives, in the order of ``pairs``, the naive computation in ``dtype``; it is called
    only below fp32, where the allowed error is twice the baseline's own plus ``1e-5`` relative.
    """
    if dtype == torch.float32:
        for name, g, r in pairs:
            tol = FP32_RTOL * max(scale(r), 1e-2)
            assert max_err(g, r) <= tol, f"{case}: {name} error {max_err(g, r):.3g} > {tol:.3g}"
        return
    for (name, g, r), b in zip(pairs, baseline()):
        allowed = 2.0 * max_err(b, r) + 1e-5 * scale(r)
        assert max_err(g, r) <= allowed, (
            f"{case}: {name} error {max_err(g, r):.3g} > 2 x baseline {max_err(b, r):.3g} + floor"
        )
