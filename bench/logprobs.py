"""Benchmark runner: fused linear -> per-token log-probs (fwd+bwd), pygpo against the alternatives.

Usage::

    python -m bench.logprobs                          # CPU defaults: N=4096 D=1024 V=32000 fp32, 50% ignored
    python -m bench.logprobs --ignore-frac 0
    python -m bench.logprobs --device cuda --n 8192 --d 4096 --v 128256 --dtype bfloat16
    python -m bench.logprobs --quick                  # tiny shapes, a smoke test

Writes ``bench/results/logprobs_<device>_<date>_<gitrev>_<settings>.json`` and a PNG beside it, and
prints a table. See :mod:`bench.runner` for what is measured and how.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .contenders import CONTENDER_NAMES
from .machine import REPO_ROOT, device_name, git_revision, slug
from .problem import DTYPES, Problem
from .report import default_json_path, plot, publish, table
from .runner import run

DEFAULTS = dict(n=4096, d=1024, v=32000, repeats=5, warmup=1)
QUICK = dict(n=256, d=64, v=1000, repeats=3, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.logprobs", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--n", type=int, help=f"tokens (default {DEFAULTS['n']}; --quick {QUICK['n']})")
    p.add_argument("--d", type=int, help=f"hidden size (default {DEFAULTS['d']}; --quick {QUICK['d']})")
    p.add_argument("--v", type=int, help=f"vocabulary (default {DEFAULTS['v']}; --quick {QUICK['v']})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--ignore-frac", type=float, default=0.5, help="fraction of rows labelled ignore_index")
    p.add_argument("--repeats", type=int, help=f"timed rounds (default {DEFAULTS['repeats']})")
    p.add_argument("--warmup", type=int, help=f"untimed rounds first (default {DEFAULTS['warmup']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--contenders", help=f"comma-separated subset of {','.join(CONTENDER_NAMES)} (naive always runs)")
    p.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"),
                   help="folder for the JSON (auto-named) or a .json path")
    p.add_argument("--tag", help="suffix of the auto-generated file name (default: the settings)")
    p.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats, for smoke tests")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    problem = Problem(n=args.n, d=args.d, v=args.v, dtype=args.dtype, ignore_frac=args.ignore_frac, seed=args.seed)
    only = [s.strip() for s in args.contenders.split(",") if s.strip()] if args.contenders else None

    result = run(problem, device, repeats=args.repeats, warmup=args.warmup, only=only, memory=not args.skip_memory)

    json_path = default_json_path(args.out, slug(device_name(device)), str(git_revision()["rev"]),
                                  args.tag or problem.tag())
    publish(result, json_path, table(result), plot, png=args.plot, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
