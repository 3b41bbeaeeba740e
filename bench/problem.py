"""The benchmark problem: its settings and the inputs every contender receives.

All contenders see the same tensors: ``hidden (N, D)`` and ``weight (V, D)`` (both requiring grad),
``labels (N,)`` with a given fraction of rows set to ``ignore_index``, and a random per-token
upstream gradient ``grad_out (N,)`` (so backward is exercised with more than a ``.sum()``).
Inputs are drawn on the CPU from a seeded generator and then moved, so a worker process that
rebuilds them from the same :class:`Problem` gets bit-identical tensors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shape, dtype and masking of one benchmark run (JSON-serialisable)."""

    n: int = 4096
    d: int = 1024
    v: int = 32000
    dtype: str = "float32"
    ignore_frac: float = 0.5
    seed: int = 0
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not 0.0 <= self.ignore_frac <= 1.0:
            raise ValueError(f"ignore_frac must lie in [0, 1], got {self.ignore_frac}")
        if min(self.n, self.d, self.v) <= 0:
            raise ValueError("n, d and v must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def num_ignored(self) -> int:
        return int(round(self.ignore_frac * self.n))

    def tag(self) -> str:
        """Short settings tag used in file names, e.g. ``n4096-d1024-v32000-float32-ign50``."""
        return f"n{self.n}-d{self.d}-v{self.v}-{self.dtype}-ign{round(100 * self.ignore_frac)}"


class Inputs(NamedTuple):
    hidden: Tensor  # (N, D), requires grad
    weight: Tensor  # (V, D), requires grad
    labels: Tensor  # (N,) int64, ignore_index on ignored rows
    grad_out: Tensor  # (N,) float32 upstream gradient of the per-token log-probs


def make_inputs(problem: Problem, device: str | torch.device) -> Inputs:
    """Seeded inputs for ``problem`` on ``device``.

    Logits come out with a standard deviation of about 2 (hidden ~ N(0, 1), weight ~ N(0, 4/D)), a
    realistic spread for an LM head. The ignored rows are drawn at random.
    """
    gen = torch.Generator().manual_seed(problem.seed)
    hidden = torch.randn(problem.n, problem.d, generator=gen)
    weight = torch.randn(problem.v, problem.d, generator=gen) * (2.0 / math.sqrt(problem.d))
    labels = torch.randint(0, problem.v, (problem.n,), generator=gen)
    ignored = torch.randperm(problem.n, generator=gen)[: problem.num_ignored]
    labels[ignored] = problem.ignore_index
    grad_out = torch.randn(problem.n, generator=gen)
    dt = problem.torch_dtype
    return Inputs(
        hidden.to(device=device, dtype=dt).requires_grad_(True),
        weight.to(device=device, dtype=dt).requires_grad_(True),
        labels.to(device),
        grad_out.to(device),
    )


def inputs_nbytes(inputs: Inputs) -> int:
    """Bytes held by the inputs themselves."""
    return sum(t.numel() * t.element_size() for t in inputs)


def checksum(inputs: Inputs) -> float:
    """A cheap fingerprint, to confirm that a worker process rebuilt the same inputs."""
    with torch.no_grad():
        return float(sum(t.double().sum().item() for t in (inputs.hidden, inputs.weight, inputs.grad_out)))
