"""Correctness of a contender: its log-probs and gradients against naive eager torch on the same inputs."""

from __future__ import annotations

import torch
from torch import Tensor

from .measure import StepResult


def _max_abs(a: Tensor, b: Tensor) -> float:
    """Largest absolute elementwise difference, in float64."""
    return float((a.double() - b.double()).abs().max().item()) if a.numel() else 0.0


def _rel_norm(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius, float64); ``||a||`` when ``b`` is zero."""
    ref = b.double().norm().item()
    return float((a.double() - b.double()).norm().item() / ref) if ref > 0 else float((a.double()).norm().item())


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """Loose acceptance bounds: a contender outside them is computing something else."""
    if dtype == torch.float32:
        return {"logprobs_max_abs": 5e-3, "grad_rel": 5e-3}
    return {"logprobs_max_abs": 0.25, "grad_rel": 5e-2}


def compare(result: StepResult, reference: StepResult, dtype: torch.dtype) -> dict:
    """Differences of ``result`` from the naive ``reference`` on the same inputs, and a verdict."""
    diff = {
        "logprobs_max_abs": _max_abs(result.logprobs, reference.logprobs),
        "grad_hidden_max_abs": _max_abs(result.grad_hidden, reference.grad_hidden),
        "grad_weight_max_abs": _max_abs(result.grad_weight, reference.grad_weight),
        "grad_hidden_rel": _rel_norm(result.grad_hidden, reference.grad_hidden),
        "grad_weight_rel": _rel_norm(result.grad_weight, reference.grad_weight),
    }
    tol = tolerances(dtype)
    finite = all(torch.isfinite(t).all().item() for t in result)
    diff["ok"] = bool(
        finite
        and diff["logprobs_max_abs"] <= tol["logprobs_max_abs"]
        and max(diff["grad_hidden_rel"], diff["grad_weight_rel"]) <= tol["grad_rel"]
    )
    diff["tolerance"] = tol
    return diff
