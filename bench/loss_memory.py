"""Peak memory of one DPO-loss step per contender: the CUDA allocator peak, or on the CPU a fresh worker process.

The CPU worker is ``python -m bench.fused_loss --worker NAME --problem JSON`` (the entry point's hidden
options call :func:`worker_measure`); it rebuilds the inputs from the :class:`LossProblem` and reports their
checksum, so a worker that drew other tensors is noted. The method is :mod:`bench.memory_worker`'s: a
warm-up step first, then ``VmHWM`` after one step minus ``VmRSS`` before it, glibc malloc pinned to mmap.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from typing import Callable

import torch

from . import measure
from .contenders import Contender
from .loss_contenders import loss_contenders
from .loss_problem import LossInputs, LossProblem, first_pair, loss_checksum, make_loss_inputs
from .machine import REPO_ROOT
from .runner import fill_peak_memory


def _loss_step(c: Contender, inputs: LossInputs, ignore_index: int) -> Callable[[], object]:
    return lambda: measure.fwd_bwd(c.fn, inputs.step, ignore_index)


def worker_measure(name: str, problem: LossProblem, liger_compiled: bool) -> dict:
    """In a fresh CPU process: resident-set increase of one step of contender ``name`` (``bench.memory_worker``'s
    method: a warm-up on pair 0, then ``VmHWM`` after one step minus ``VmRSS`` before it)."""
    inputs = make_loss_inputs(problem, "cpu")
    small = first_pair(inputs, problem.pairs)
    warm = loss_contenders(problem, small[1:], only=[name], liger_compiled=liger_compiled)[0]
    c = next(c for c in loss_contenders(problem, inputs[1:], only=[name], liger_compiled=liger_compiled)[0]
             if c.name == name)
    can_reset = measure.reset_rss_peak()
    if can_reset:
        _loss_step(next(w for w in warm if w.name == name), small, problem.ignore_index)()
    del warm, small
    gc.collect()
    base = measure.rss_bytes() if can_reset else measure.ru_maxrss_bytes()
    measure.reset_rss_peak()
    result = _loss_step(c, inputs, problem.ignore_index)()
    peak = measure.rss_peak_bytes() if can_reset else measure.ru_maxrss_bytes()
    del result
    return {"contender": name, "peak_bytes": int(max(peak - base, 0)), "baseline_rss_bytes": int(base),
            "inputs_checksum": loss_checksum(inputs),
            "method": "VmHWM after one step minus VmRSS before it (after a warm-up on pair 0)" if can_reset
            else "ru_maxrss increase over one first step (no clear_refs)"}


def cpu_peak_subprocess(name: str, problem: LossProblem, threads: int, liger_compiled: bool) -> dict:
    """``python -m bench.fused_loss --worker NAME`` in a fresh process, malloc pinned to mmap as in
    :func:`bench.measure.cpu_peak_bytes_subprocess`."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(measure.MMAP_THRESHOLD),
               MALLOC_TRIM_THRESHOLD_=str(measure.MMAP_THRESHOLD))
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.fused_loss", "--worker", name, "--threads", str(threads),
           "--problem", json.dumps(dataclasses.asdict(problem))] + ([] if liger_compiled else ["--liger-eager"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def measure_memory(contenders: list[Contender], inputs: LossInputs, problem: LossProblem, device: torch.device,
                   records: dict, liger_compiled: bool) -> None:
    """Fill ``peak_mem_bytes`` (above the inputs) for every contender that has not failed."""
    fill_peak_memory(
        contenders, device, records,
        cuda_step=lambda c: _loss_step(c, inputs, problem.ignore_index),
        cpu_report=lambda name: cpu_peak_subprocess(name, problem, torch.get_num_threads(), liger_compiled),
        expected_checksum=loss_checksum(inputs) if device.type == "cpu" else None,
    )
