"""One benchmark run: check every contender against the naive result, then time it and measure memory.

All contenders run in this one process on the same inputs. The order is:

1. correctness: one step of naive eager torch is the reference; every other contender's log-probs
   and gradients are compared with it (a contender that fails to run is recorded with the reason);
2. timing: ``warmup`` untimed steps each, then ``repeats`` timed rounds in which the contenders take
   turns (round-robin), so drifting background load spreads over all of them; the median is kept;
3. memory: see :mod:`bench.measure` (CUDA allocator peak, or a fresh CPU worker process each).
"""

from __future__ import annotations

import datetime
import gc
import traceback
from typing import Callable, Optional

import torch
from tqdm import tqdm

from . import measure
from .correctness import compare
from .contenders import Contender, available_contenders
from .machine import machine_info, versions, git_revision
from .problem import Inputs, Problem, checksum, inputs_nbytes, make_inputs
from .report import option_targets, ratios, targets

TIMING_METHOD = (
    "median of the repeats of one fwd+bwd step (forward to per-token log-probs, then torch.autograd.grad "
    "w.r.t. hidden and weight with a random per-token upstream gradient); contenders take turns each "
    "round; {clock}"
)
CUDA_MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated over one step after reset_peak_memory_stats, minus "
    "torch.cuda.memory_allocated just before the step (only the inputs are held then)"
)
CPU_MEMORY_METHOD = (
    "fresh worker process per contender (python -m bench.memory_worker) rebuilding the same inputs "
    "(checksum compared); {worker}; glibc malloc pinned to mmap for blocks >= 128 KiB "
    "(MALLOC_MMAP_THRESHOLD_) so freed memory leaves the resident set. Includes the returned "
    "log-probs and gradients, like the CUDA figure"
)


def _failure(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {str(exc).strip()[:500]}{where}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_correctness(
    contenders: list[Contender], inputs: Inputs, problem: Problem, device: torch.device, records: dict
) -> list[Contender]:
    """Fill ``records[name]`` with status and differences from naive; return the contenders that ran."""
    ran = []
    reference: Optional[measure.StepResult] = None
    for c in tqdm(contenders, desc="correctness", leave=False, disable=None):
        try:
            result = measure.fwd_bwd(c.fn, inputs, problem.ignore_index)
            measure.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded, not raised
            records[c.name].update(status="failed", reason=_failure(exc))
            _free(device)
            continue
        if reference is None and c.name == "naive":
            reference = result
        if reference is None:
            records[c.name]["correctness"] = {"ok": None, "note": "no naive reference (it failed)"}
        else:
            records[c.name]["correctness"] = compare(result, reference, problem.torch_dtype)
            if not records[c.name]["correctness"]["ok"]:
                records[c.name].update(status="incorrect", reason="differs from naive beyond tolerance")
        ran.append(c)
        del result
    del reference
    _free(device)
    return ran


def time_contenders(
    contenders: list[Contender], inputs: Inputs, problem: Problem, device: torch.device,
    repeats: int, warmup: int, records: dict,
) -> None:
    """Warm up, then time ``repeats`` round-robin rounds; fills ``times_ms`` and ``median_ms``."""
    steps = {c.name: (lambda fn=c.fn: measure.fwd_bwd(fn, inputs, problem.ignore_index)) for c in contenders}
    live = dict(steps)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    with tqdm(total=len(steps) * (warmup + repeats), desc="timing", leave=False, disable=None) as bar:
        for rnd in range(warmup + repeats):
            for name, step in list(live.items()):
                try:
                    t = measure.time_step(step, device)
                except Exception as exc:  # noqa: BLE001
                    records[name].update(status="failed", reason=_failure(exc))
                    live.pop(name)
                    _free(device)
                    continue
                if rnd >= warmup:
                    wall[name].append(t.wall_ms)
                    if t.cpu_ms is not None:
                        cpu[name].append(t.cpu_ms)
                bar.update(1)
    for name in live:
        records[name]["times_ms"] = wall[name]
        records[name]["median_ms"] = measure.median(wall[name]) if wall[name] else None
        records[name]["min_ms"] = min(wall[name]) if wall[name] else None
        if cpu[name]:
            records[name]["cpu_times_ms"] = cpu[name]
            records[name]["median_cpu_ms"] = measure.median(cpu[name])


def measure_memory(
    contenders: list[Contender], inputs: Inputs, problem: Problem, device: torch.device, records: dict
) -> None:
    """Fill ``peak_mem_bytes`` for every contender still standing."""
    fill_peak_memory(
        contenders, device, records,
        cuda_step=lambda c: lambda: measure.fwd_bwd(c.fn, inputs, problem.ignore_index),
        cpu_report=lambda name: measure.cpu_peak_bytes_subprocess(name, problem, torch.get_num_threads()),
        expected_checksum=checksum(inputs) if device.type == "cpu" else None,
    )


def fill_peak_memory(
    contenders: list[Contender], device: torch.device, records: dict, *,
    cuda_step: Callable[[Contender], Callable[[], object]], cpu_report: Callable[[str], dict],
    expected_checksum: Optional[float],
) -> None:
    """``peak_mem_bytes`` of each contender not failed: the CUDA allocator's peak over ``cuda_step(c)()``,
    or on the CPU the report of a fresh worker process, ``cpu_report(name)``, whose ``inputs_checksum``
    must match ``expected_checksum``. A contender whose measurement fails gets ``memory_error``."""
    for c in tqdm(contenders, desc="memory", leave=False, disable=None):
        if records[c.name]["status"] == "failed":
            continue
        try:
            if device.type == "cuda":
                peak = measure.cuda_peak_bytes(cuda_step(c), device)
            else:
                report = cpu_report(c.name)
                peak = report["peak_bytes"]
                records[c.name]["memory_worker"] = {k: report[k] for k in ("baseline_rss_bytes", "method")}
                if abs(report["inputs_checksum"] - expected_checksum) > 1e-6 * max(1.0, abs(expected_checksum)):
                    records[c.name]["memory_note"] = "worker inputs differ from the timed inputs"
        except Exception as exc:  # noqa: BLE001
            records[c.name]["memory_error"] = _failure(exc)
            _free(device)
            continue
        records[c.name]["peak_mem_bytes"] = int(peak)
        records[c.name]["peak_mem_mib"] = round(peak / 2**20, 2)


def run(
    problem: Problem, device: torch.device, *, repeats: int, warmup: int,
    only: Optional[list[str]] = None, memory: bool = True,
) -> dict:
    """The whole benchmark; returns the JSON-ready result dict."""
    contenders, skipped = available_contenders(device, only)
    records: dict[str, dict] = {c.name: {"status": "ok", "notes": c.notes} for c in contenders}
    records.update({name: {"status": "unavailable", "reason": why} for name, why in skipped.items()})
    inputs = make_inputs(problem, device)
    ran = check_correctness(contenders, inputs, problem, device, records)
    time_contenders(ran, inputs, problem, device, repeats, warmup, records)
    if memory:
        measure_memory(ran, inputs, problem, device, records)
    clock = ("CUDA events" if device.type == "cuda" else
             "time.perf_counter; also process CPU time (time.process_time, all threads) as median_cpu_ms")
    if device.type == "cuda":
        memory_method = CUDA_MEMORY_METHOD
    else:
        worker = ("peak resident set of one step after a warm-up step on the first 128 rows (VmHWM reset "
                  "via /proc/self/clear_refs) minus VmRSS before it")
        memory_method = CPU_MEMORY_METHOD.format(worker=worker) if memory else "not measured (--skip-memory)"
    result = {
        "benchmark": "fused linear -> per-token log-probs, forward + backward",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "versions": versions(),
        "git": git_revision(),
        "settings": {
            **problem.__dict__, "device": device.type, "repeats": repeats, "warmup": warmup,
            "valid_rows": problem.n - problem.num_ignored, "inputs_bytes": inputs_nbytes(inputs),
            "upstream_gradient": "random N(0,1) per token (including ignored rows, whose log-prob is constant 0)",
        },
        "method": {
            "timing": TIMING_METHOD.format(clock=clock),
            "memory": memory_method,
            "correctness": "each contender's log-probs and gradients vs naive eager torch on the same inputs "
                           "(max abs difference, relative Frobenius error of gradients); tolerance per dtype",
        },
        "contenders": records,
    }
    result["ratios"] = ratios(records)
    result["targets"] = targets(result)
    result["option_targets"] = option_targets(result)
    return result
