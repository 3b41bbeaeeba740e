"""Benchmark: a DPO step from final hidden states to the loss, forward + backward, pygpo against what users run.

Usage::

    python -m bench.fused_loss                        # CPU: B=8 pairs, T=1024 (512-token prompt), D=1024, V=32000 fp32
    python -m bench.fused_loss --device cuda          # GPU: B=8, T=2048 (1024-token prompt), D=4096, V=128256 bf16
    python -m bench.fused_loss --quick                # tiny shapes, a smoke test

Every contender gets the same inputs (:mod:`bench.loss_problem`: policy ``hidden (2B, T, D)`` and lm_head
``weight (V, D)`` requiring grad, a frozen reference ``ref_hidden``/``ref_weight``, ``labels (2B, T)`` with
``-100`` on the prompt; rows rank-major) and computes the sigmoid DPO loss (Rafailov et al., 2023, eq. 7),
reference scoring included, the way its library does it (:mod:`bench.loss_contenders`: ``pygpo``,
``pygpo_eager``, the breakdown rows ``pygpo_lean`` and ``pygpo_ops``, ``liger``, ``trl``, ``naive``).

The model body is common to all and excluded. Steps, timing and the correctness step are those of
:mod:`bench.runner` (a contender is a ``(hidden, weight, labels, ignore_index) -> loss`` closure over the
reference tensors; the upstream gradient is 1): first every contender is checked against the naive loss
in float64 at a small size, then timed (median of round-robin rounds), then its peak memory measured
(:mod:`bench.loss_memory`: CUDA allocator peak, or on the CPU a fresh worker process per contender, run as
``python -m bench.fused_loss --worker NAME``). Ratios, targets, table and plot: :mod:`bench.loss_report`.
Writes ``bench/results/fused_loss_<device>_<date>_<rev>_<settings>.json`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from typing import Optional

import torch

from .loss_contenders import (CONTENDER_NAMES, OURS, REFERENCE, TRL_DPO_OUTPUTS, LossFn, dpo_sigmoid, liger_loss,
                              loss_contenders, naive_loss, pygpo_loss, pygpo_ops_loss, trl_loss)
from .loss_memory import cpu_peak_subprocess, measure_memory, worker_measure
from .loss_problem import CHECK, QUICK, RUNS, SIZES, LossInputs, LossProblem, first_pair, make_loss_inputs
from .loss_report import default_json_path, option_targets, plot, ratios_vs, table, targets
from .machine import REPO_ROOT, device_name, git_revision, machine_info, slug, versions
from .problem import DTYPES, inputs_nbytes
from .report import publish
from .runner import check_correctness, time_contenders

# Importable from here as before (tests and scripts use them); each lives in its bench.loss_* module.
__all__ = [
    "CHECK", "CONTENDER_NAMES", "OURS", "QUICK", "REFERENCE", "RUNS", "SIZES", "TRL_DPO_OUTPUTS", "LossFn",
    "LossInputs", "LossProblem", "cpu_peak_subprocess", "default_json_path", "dpo_sigmoid", "first_pair",
    "liger_loss", "load_average", "loss_contenders", "main", "make_loss_inputs", "measure_memory", "naive_loss",
    "parse_args", "plot", "pygpo_loss", "pygpo_ops_loss", "ratios_vs", "run", "table", "targets", "trl_loss",
    "worker_measure",
]


# ---------------------------------------------------------------------------------------------------
# run


def load_average() -> Optional[list[float]]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run(problem: LossProblem, device: torch.device, *, repeats: int, warmup: int, only: Optional[list[str]] = None,
        memory: bool = True, liger_compiled: bool = True, check_at_size: Optional[bool] = None) -> dict:
    """Correctness (float64 naive, small size), timing and memory; returns the JSON-ready result.

    ``check_at_size`` (default: on CUDA) also compares every timed contender with the run-dtype naive at
    the timed size, after timing and memory: paths that depend on the size (several eager chunks, TRL's
    vocabulary chunks, a backend's kept-or-recompute choice) are checked where they were timed. A
    contender that fails there is marked ``incorrect`` and enters no ratio or target.
    """
    load_before = load_average()
    check = dataclasses.replace(problem, **CHECK)
    check_inputs = make_loss_inputs(check, device)
    checked, skipped = loss_contenders(check, check_inputs[1:], only=only, liger_compiled=liger_compiled, reference=True)
    check_records: dict[str, dict] = {c.name: {"status": "ok"} for c in checked}
    check_correctness(checked, check_inputs.step, check, device, check_records)
    del check_inputs
    if liger_compiled:
        # compiled code of the check size would make torch.compile treat the timed size's shapes as dynamic
        # (a recompilation a user's fixed-shape run does not have): start the timed size from scratch
        torch._dynamo.reset()

    inputs = make_loss_inputs(problem, device)
    contenders, _ = loss_contenders(problem, inputs[1:], only=[n for n in (only or CONTENDER_NAMES) if n not in skipped],
                                    liger_compiled=liger_compiled)
    records: dict[str, dict] = {name: {"status": "unavailable", "reason": why} for name, why in skipped.items()}
    for c in contenders:
        small = check_records[f"naive_{problem.dtype}" if c.name == "naive" else c.name]
        records[c.name] = {"status": small["status"], "notes": c.notes, "correctness": small.get("correctness"),
                           **({"reason": small["reason"]} if "reason" in small else {})}
    timed = [c for c in contenders if records[c.name]["status"] != "failed"]
    time_contenders(timed, inputs.step, problem, device, repeats, warmup, records)
    timed = [c for c in timed if records[c.name]["status"] != "failed"]  # keep the reason it failed with
    if memory:
        measure_memory(timed, inputs, problem, device, records, liger_compiled)
    if device.type == "cuda" if check_at_size is None else check_at_size:
        _check_at_size(timed, inputs, problem, device, records)
    clock = "CUDA events" if device.type == "cuda" else "time.perf_counter (and process CPU time as median_cpu_ms)"
    result = {
        "benchmark": "DPO loss from final hidden states + lm_head (policy and reference), forward + backward",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "load_average": {"before": load_before, "after": load_average()},
        "versions": versions(),
        "git": git_revision(),
        "settings": {**dataclasses.asdict(problem), "device": device.type, "repeats": repeats, "warmup": warmup,
                     "rows": 2 * problem.pairs, "valid_tokens": problem.valid_tokens,
                     "inputs_bytes": inputs_nbytes(inputs.step) + inputs_nbytes(inputs[1:]),
                     "liger_compiled": liger_compiled, "correctness_size": CHECK},
        "method": {
            "timing": f"median of {repeats} round-robin rounds after {warmup} warm-up round(s) of one step: the loss, "
                      f"then torch.autograd.grad w.r.t. hidden and lm_head weight; {clock}",
            "memory": ("torch.cuda.max_memory_allocated over one step minus what was allocated before it (the inputs)"
                       if device.type == "cuda" else
                       "fresh worker process per contender (python -m bench.fused_loss --worker), peak resident set of "
                       "one step above the resident set before it, glibc malloc pinned to mmap (>= 128 KiB); includes "
                       "the returned gradients") if memory else "not measured (--skip-memory)",
            "correctness": f"loss and gradients of each contender (run dtype) vs the naive loss in float64 on the same "
                           f"inputs at {CHECK} (bench.runner.check_correctness, bench.correctness tolerances)"
                           + ("; then vs the run-dtype naive at the timed size (correctness_at_size)"
                              if (device.type == "cuda" if check_at_size is None else check_at_size) else ""),
        },
        "contenders": records,
    }
    result["ratios"] = {f"vs_{OURS}": ratios_vs(records)}
    result["targets"] = targets(result)
    result["option_targets"] = option_targets(result)
    return result


def _check_at_size(timed, inputs, problem: LossProblem, device: torch.device, records: dict) -> None:
    """Each timed contender against the run-dtype naive on the timed inputs (``records[name]
    ["correctness_at_size"]``); a failure there marks the contender ``incorrect``."""
    at_size: dict[str, dict] = {c.name: {} for c in timed}
    check_correctness(sorted(timed, key=lambda c: c.name != "naive"), inputs.step, problem, device, at_size)
    for name, rec in at_size.items():
        records[name]["correctness_at_size"] = rec.get("correctness")
        if rec.get("status") in ("incorrect", "failed"):
            records[name].update(status="incorrect", reason=f"at the timed size: {rec.get('reason')}")


# ---------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fused_loss", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on cpu, bfloat16 on cuda")
    for name, what in (("pairs", "chosen/rejected pairs B"), ("seq", "tokens per row T"), ("prompt", "prompt tokens"),
                       ("d", "hidden size"), ("v", "vocabulary")):
        p.add_argument(f"--{name}", type=int, help=f"{what} (default: the issue's size for --device; --quick: tiny)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--repeats", type=int, help=f"timed rounds (default {RUNS['default']['repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed rounds first (default {RUNS['default']['warmup']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--contenders", help=f"comma-separated subset of {','.join(CONTENDER_NAMES)} (naive always runs)")
    p.add_argument("--liger-eager", action="store_true", help="LigerFusedLinearDPOLoss(compiled=False) (default: compiled)")
    p.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--check-at-size", action=argparse.BooleanOptionalAction, default=None,
                   help="also check every contender against naive at the timed size (default: on CUDA only)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"), help="folder, or a .json path")
    p.add_argument("--tag", help="suffix of the auto-generated file name (default: the settings)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats, for smoke tests")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: CPU memory worker for one contender
    p.add_argument("--problem", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = {**SIZES[args.device], **(QUICK if args.quick else {})}
    for key, value in {**sizes, **RUNS["quick" if args.quick else "default"]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        problem = LossProblem(**json.loads(args.problem))
        print(json.dumps(worker_measure(args.worker, problem, not args.liger_eager)), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    problem = LossProblem(pairs=args.pairs, seq=args.seq, prompt=args.prompt, d=args.d, v=args.v, dtype=args.dtype,
                          beta=args.beta, seed=args.seed)
    only = [s.strip() for s in args.contenders.split(",") if s.strip()] if args.contenders else None
    result = run(problem, device, repeats=args.repeats, warmup=args.warmup, only=only, memory=not args.skip_memory,
                 liger_compiled=not args.liger_eager, check_at_size=args.check_at_size)
    path = default_json_path(args.out, slug(device_name(device)), str(result["git"]["rev"]), args.tag or problem.tag())
    publish(result, path, table(result), plot, plot=not args.no_plot,
            notes=(f"load average before/after: {result['load_average']}",))
    return 0


if __name__ == "__main__":
    sys.exit(main())
