"""The DPO-loss benchmark's problem: its sizes and the inputs every contender receives.

Every contender gets policy ``hidden (2B, T, D)`` and lm_head ``weight (V, D)`` (both requiring grad),
reference ``ref_hidden (2B, T, D)`` and ``ref_weight (V, D)`` (no grad), and next-token ``labels (2B, T)``
with ``ignore_index`` on the prompt; rows rank-major (chosen rows, then rejected rows). Inputs are drawn
on the CPU from a seeded generator and then moved, so a worker process that rebuilds them from the same
:class:`LossProblem` gets bit-identical tensors.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
from torch import Tensor

from .problem import DTYPES, IGNORE_INDEX, Inputs, checksum

#: The issue's sizes per device (the targets are set for these only).
SIZES = {
    "cpu": dict(pairs=8, seq=1024, prompt=512, d=1024, v=32000, dtype="float32"),
    "cuda": dict(pairs=8, seq=2048, prompt=1024, d=4096, v=128256, dtype="bfloat16"),
}
QUICK = dict(pairs=2, seq=64, prompt=32, d=64, v=1000)
CHECK = dict(pairs=2, seq=48, prompt=24, d=64, v=512)  # the float64 correctness step's size
RUNS = {"default": dict(repeats=3, warmup=1), "quick": dict(repeats=2, warmup=1)}


@dataclasses.dataclass(frozen=True)
class LossProblem:
    """Sizes of one run: ``pairs`` (B) chosen/rejected pairs of ``seq`` (T) tokens, the first ``prompt`` of
    them labelled ``ignore_index``; hidden size ``d``, vocabulary ``v``; DPO ``beta``. JSON-serialisable."""

    pairs: int = 8
    seq: int = 1024
    prompt: int = 512
    d: int = 1024
    v: int = 32000
    dtype: str = "float32"
    beta: float = 0.1
    ref_noise: float = 0.05
    seed: int = 0
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if min(self.pairs, self.seq, self.d, self.v) <= 0:
            raise ValueError(f"pairs, seq, d and v must be positive, got {self.pairs}, {self.seq}, {self.d}, {self.v}")
        if not 0 <= self.prompt < self.seq:
            raise ValueError(f"prompt must lie in [0, seq) so every response has a token, got {self.prompt} (seq={self.seq})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def valid_tokens(self) -> int:
        return 2 * self.pairs * (self.seq - self.prompt)

    def sizes(self) -> tuple:
        return (self.pairs, self.seq, self.prompt, self.d, self.v, self.dtype)

    def tag(self) -> str:
        """Short settings tag for file names, e.g. ``b8-t1024-p512-d1024-v32000-float32``."""
        return f"b{self.pairs}-t{self.seq}-p{self.prompt}-d{self.d}-v{self.v}-{self.dtype}"


class LossInputs(NamedTuple):
    """``step`` holds what the runner differentiates (``grad_out`` is the scalar 1); the reference is frozen."""

    step: Inputs
    ref_hidden: Tensor
    ref_weight: Tensor


def make_loss_inputs(problem: LossProblem, device: str | torch.device) -> LossInputs:
    """Seeded inputs, drawn on the CPU then moved (a worker process rebuilds them bit for bit).

    Logits have a standard deviation of about 2; the reference is the policy plus ``ref_noise`` relative
    noise, so the log-ratios are small and the loss keeps a real gradient, as early in DPO training.
    """
    p = problem
    gen = torch.Generator().manual_seed(p.seed)
    hidden = torch.randn(2 * p.pairs, p.seq, p.d, generator=gen)
    weight = torch.randn(p.v, p.d, generator=gen) * (2.0 / math.sqrt(p.d))
    ref_hidden = hidden + p.ref_noise * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight + p.ref_noise * torch.randn(weight.shape, generator=gen) * (2.0 / math.sqrt(p.d))
    labels = torch.randint(0, p.v, (2 * p.pairs, p.seq), generator=gen)
    labels[:, : p.prompt] = p.ignore_index
    dt = p.torch_dtype
    step = Inputs(hidden.to(device=device, dtype=dt).requires_grad_(True),
                  weight.to(device=device, dtype=dt).requires_grad_(True),
                  labels.to(device), torch.ones((), device=device))
    return LossInputs(step, ref_hidden.to(device=device, dtype=dt), ref_weight.to(device=device, dtype=dt))


def first_pair(inputs: LossInputs, pairs: int) -> LossInputs:
    """Pair 0 alone (rows 0 and B): a warm-up batch that keeps the rank-major layout."""
    rows = torch.tensor([0, pairs], device=inputs.step.labels.device)
    s = inputs.step
    step = Inputs(s.hidden.detach()[rows].requires_grad_(True), s.weight, s.labels[rows], s.grad_out)
    return LossInputs(step, inputs.ref_hidden[rows], inputs.ref_weight)


def loss_checksum(inputs: LossInputs) -> float:
    """:func:`bench.problem.checksum` of the step inputs plus the sum of ``ref_hidden`` (float64): a worker
    compares it with the timed inputs' to show it rebuilt the same tensors."""
    return checksum(inputs.step) + float(inputs.ref_hidden.double().sum())
