"""Worker process for CPU peak-memory measurement of one contender (see :mod:`bench.measure`).

``python -m bench.memory_worker --contender NAME --problem '{"n": ...}' --threads T`` rebuilds the
benchmark inputs, measures the resident-set increase of one fwd+bwd step and prints one JSON line.
Run by ``bench.measure.cpu_peak_bytes_subprocess``; a fresh process per contender keeps one
contender's allocations, caches and imports out of another's figure.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

from .contenders import get_contender
from .measure import fwd_bwd, reset_rss_peak, ru_maxrss_bytes, rss_bytes, rss_peak_bytes
from .problem import Inputs, Problem, checksum, inputs_nbytes, make_inputs

WARMUP_ROWS = 128


def warmup_inputs(inputs: Inputs) -> Inputs:
    """The first ``WARMUP_ROWS`` rows: enough to trigger lazy imports and library initialisation,
    small enough that the warm-up costs a fraction of a step."""
    k = min(WARMUP_ROWS, inputs.labels.shape[0])
    hidden = inputs.hidden.detach()[:k].requires_grad_(True)
    return Inputs(hidden, inputs.weight, inputs.labels[:k], inputs.grad_out[:k])


def measure(name: str, problem: Problem) -> dict:
    """Peak resident-set increase (bytes) of one fwd+bwd step of contender ``name`` on the CPU."""
    contender = get_contender(name, torch.device("cpu"))
    inputs = make_inputs(problem, "cpu")
    can_reset = reset_rss_peak()
    if can_reset:
        fwd_bwd(contender.fn, warmup_inputs(inputs), problem.ignore_index)  # lazy imports, library init
        gc.collect()
        base = rss_bytes()
        reset_rss_peak()
        result = fwd_bwd(contender.fn, inputs, problem.ignore_index)
        peak = rss_peak_bytes()
        method = ("VmHWM after one step minus VmRSS before it, peak reset via /proc/self/clear_refs, "
                  "after a warm-up step on the first rows")
    else:
        gc.collect()
        base = ru_maxrss_bytes()
        result = fwd_bwd(contender.fn, inputs, problem.ignore_index)
        peak = ru_maxrss_bytes()
        method = "ru_maxrss increase over one first step (no clear_refs; includes one-time initialisation)"
    del result
    return {
        "contender": name,
        "peak_bytes": int(max(peak - base, 0)),
        "baseline_rss_bytes": int(base),
        "inputs_bytes": inputs_nbytes(inputs),
        "inputs_checksum": checksum(inputs),
        "method": method,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", required=True)
    parser.add_argument("--problem", required=True, help="JSON of bench.problem.Problem fields")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.contender, Problem(**json.loads(args.problem)))), flush=True)


if __name__ == "__main__":
    main()
