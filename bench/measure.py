"""Timing and peak-memory measurements of one fwd+bwd step (correctness lives in ``bench.correctness``).

A *step* is ``out = fn(hidden, weight, labels)`` followed by
``torch.autograd.grad(out, (hidden, weight), grad_out)``: per-token log-probs with a random per-token
upstream gradient. Gradients are returned, not accumulated into ``.grad``, so repeated steps
allocate the same memory every time.

Memory:

- CUDA: ``torch.cuda.max_memory_allocated()`` over one step, after ``reset_peak_memory_stats()``,
  minus the bytes allocated just before the step (the inputs; nothing else is held then).
- CPU: a fresh worker process per contender (``python -m bench.memory_worker``) rebuilds the same
  inputs, runs one warm-up step on its first 128 rows, then resets the kernel's resident-set high-water mark
  (``echo 5 > /proc/self/clear_refs``) and reports ``VmHWM`` after one step minus ``VmRSS`` before
  it. glibc's malloc is pinned to ``mmap`` for blocks of 128 KiB and up (``MALLOC_MMAP_THRESHOLD_``),
  so freed tensors leave the resident set and cannot hide a later allocation. Where ``clear_refs``
  cannot be written, the worker skips the warm-up and uses the ``ru_maxrss`` increase instead.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .contenders import LogProbFn
from .problem import Inputs, Problem

MMAP_THRESHOLD = 128 * 1024


class StepResult(NamedTuple):
    logprobs: Tensor
    grad_hidden: Tensor
    grad_weight: Tensor


def fwd_bwd(fn: LogProbFn, inputs: Inputs, ignore_index: int) -> StepResult:
    """One forward and backward pass of ``fn`` with the per-token upstream gradient."""
    out = fn(inputs.hidden, inputs.weight, inputs.labels, ignore_index)
    g_h, g_w = torch.autograd.grad(out, (inputs.hidden, inputs.weight), grad_outputs=inputs.grad_out.to(out.dtype))
    return StepResult(out.detach(), g_h, g_w)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTime(NamedTuple):
    wall_ms: float
    cpu_ms: Optional[float]  # process CPU time (all threads), CPU device only


def time_step(step: Callable[[], object], device: torch.device) -> StepTime:
    """Wall time of one call of ``step`` (CUDA events on a GPU) and, on the CPU, the process CPU time.

    On a shared CPU the CPU time is the steadier figure: threads that are waiting for a core do not
    accumulate it (busy-waiting OpenMP threads do, a little).
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        step()
        end.record()
        end.synchronize()
        return StepTime(float(start.elapsed_time(end)), None)
    c0, t0 = time.process_time(), time.perf_counter()
    step()
    return StepTime((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------------
# memory


def cuda_peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on the GPU during ``step`` above what was allocated before it."""
    gc.collect()
    synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); ``False`` if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def rss_bytes() -> int:
    """Current resident set size."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return ru_maxrss_bytes()


def rss_peak_bytes() -> int:
    """Resident-set high-water mark since the last :func:`reset_rss_peak` (or process start)."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def cpu_peak_bytes_subprocess(name: str, problem: Problem, threads: int, timeout_s: float = 600.0) -> dict:
    """Run ``bench.memory_worker`` for contender ``name`` in a fresh process; returns its JSON report.

    Raises ``RuntimeError`` with the worker's stderr tail when it fails.
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # a fixed value also stops glibc raising it
    env["MALLOC_TRIM_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [sys.executable, "-m", "bench.memory_worker", "--contender", name, "--threads", str(threads),
           "--problem", json.dumps(problem.__dict__)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=root)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])
