"""pytest-benchmark entries: fwd+bwd of per-token log-probs, one entry per contender.

Run with ``python -m pytest tests/bench -q`` (the main test command collects only ``tests/``). Small CPU
sizes by default; override with the environment variables ``PYGPO_BENCH_DEVICE`` (cpu|cuda),
``PYGPO_BENCH_N``, ``_D``, ``_V``, ``_DTYPE``, ``_IGNORE_FRAC`` and ``_ROUNDS`` (Triton contenders
run on the CPU only with ``TRITON_INTERPRET=1`` and ``PYGPO_BENCH_INTERPRET=1``). Each entry first
checks its contender against naive eager torch on the same inputs (a wrong result fails the entry);
timings are reported by pytest-benchmark and never asserted.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.contenders import CONTENDER_NAMES, available_contenders, naive
from bench.correctness import compare
from bench.measure import StepResult, fwd_bwd, synchronize
from bench.problem import Inputs, Problem, make_inputs

DEVICE = torch.device(os.environ.get("PYGPO_BENCH_DEVICE", "cpu"))
PROBLEM = Problem(
    n=int(os.environ.get("PYGPO_BENCH_N", 512)),
    d=int(os.environ.get("PYGPO_BENCH_D", 256)),
    v=int(os.environ.get("PYGPO_BENCH_V", 4096)),
    dtype=os.environ.get("PYGPO_BENCH_DTYPE", "float32"),
    ignore_frac=float(os.environ.get("PYGPO_BENCH_IGNORE_FRAC", 0.5)),
)
ROUNDS = int(os.environ.get("PYGPO_BENCH_ROUNDS", 5))
TRITON_CONTENDERS = ("pygpo_triton", "pygpo_triton_atomic", "liger_flce", "cce")


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("PYGPO_BENCH_DEVICE=cuda but no CUDA device is visible")
    return make_inputs(PROBLEM, DEVICE)


@pytest.fixture(scope="module")
def reference(inputs: Inputs) -> StepResult:
    return fwd_bwd(naive, inputs, PROBLEM.ignore_index)


@pytest.mark.parametrize("name", CONTENDER_NAMES)
def test_logprobs_fwd_bwd(benchmark, name: str, inputs: Inputs, reference: StepResult) -> None:
    ready, skipped = available_contenders(DEVICE, only=[name])
    if name in skipped:
        pytest.skip(skipped[name])
    if DEVICE.type == "cpu" and name in TRITON_CONTENDERS and os.environ.get("PYGPO_BENCH_INTERPRET") != "1":
        pytest.skip("Triton interpreter timings mean nothing (set PYGPO_BENCH_INTERPRET=1 to run it anyway)")
    contender = next(c for c in ready if c.name == name)

    diff = compare(fwd_bwd(contender.fn, inputs, PROBLEM.ignore_index), reference, PROBLEM.torch_dtype)
    assert diff["ok"], f"{name} differs from naive eager torch: {diff}"

    def step() -> None:
        fwd_bwd(contender.fn, inputs, PROBLEM.ignore_index)
        synchronize(DEVICE)

    benchmark.group = f"logprobs fwd+bwd {DEVICE.type} {PROBLEM.tag()}"
    benchmark.extra_info.update(settings=PROBLEM.__dict__, device=DEVICE.type, notes=contender.notes,
                                max_abs_logprob_diff=diff["logprobs_max_abs"])
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
