"""Where a fused DPO step spends its time: ``torch.profiler`` over one step of chosen contenders.

Usage::

    python -m bench.profile_fused_loss --device cuda                 # the GPU size of bench.fused_loss
    python -m bench.profile_fused_loss --quick --contenders pygpo    # tiny, on the CPU

The inputs and contenders are those of :mod:`bench.fused_loss` (``bench.loss_problem``,
``bench.loss_contenders``). Each contender runs one warm-up step, then one profiled step (the loss and
``torch.autograd.grad`` w.r.t. hidden states and lm_head weight); the operators and kernels that took
the most time are printed and written to ``profile_fused_loss_<device>_<settings>.txt`` in ``--out``.
On a GPU the table is sorted by device time, so it shows how much goes to cuBLAS matmuls, Triton
kernels and pygpo's epilogues. A diagnostic: nothing here is a benchmark figure.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from .loss_contenders import CONTENDER_NAMES, loss_contenders
from .loss_problem import QUICK, SIZES, LossProblem, make_loss_inputs
from .machine import REPO_ROOT
from .measure import synchronize


def profile_contenders(problem: LossProblem, device: torch.device, names: list[str], rows: int = 15) -> str:
    """The profiler tables of one step of each contender in ``names``, as one text."""
    inputs = make_loss_inputs(problem, device)
    contenders, skipped = loss_contenders(problem, inputs[1:], only=names)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    s = inputs.step
    parts = [f"# profile of one fwd+bwd step, {problem.tag()} on {device.type}"]
    parts += [f"# {name}: unavailable ({why})" for name, why in skipped.items()]
    for c in contenders:
        if c.name not in names:
            continue  # naive always comes along; profile only what was asked for

        def step() -> None:
            loss = c.fn(s.hidden, s.weight, s.labels, problem.ignore_index)
            torch.autograd.grad(loss, (s.hidden, s.weight))

        step()
        synchronize(device)
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
        parts.append(f"## {c.name}: {c.notes}\n{prof.key_averages().table(sort_by=sort, row_limit=rows)}")
    return "\n\n".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_fused_loss", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--contenders", default="pygpo,pygpo_eager,trl",
                   help=f"comma-separated subset of {','.join(CONTENDER_NAMES)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for smoke tests")
    p.add_argument("--rows", type=int, default=15, help="table rows per contender")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDER_NAMES))
    if unknown:
        p.error(f"unknown contenders {unknown}; choose from {list(CONTENDER_NAMES)}")
    sizes = dict(SIZES[args.device])
    if args.quick:
        sizes.update(QUICK, dtype="float32")
    problem = LossProblem(**sizes)
    text = profile_contenders(problem, torch.device(args.device), names, rows=args.rows)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile_fused_loss_{args.device}_{problem.tag()}.txt")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
