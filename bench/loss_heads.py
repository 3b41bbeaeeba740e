"""Cost of the DPO loss head on CPU: ``python -m bench.loss_heads``.

The head is tiny next to the model, but it runs every step and its launches and host syncs add up.
This measures one forward+backward call of the DPO head on ``(B, 2)`` float32 scores at B=8 and
B=512, median time per call, for:

- ``torch_expression``: ``softplus(-beta * h).mean()`` written inline (the floor: no validation,
  no metrics);
- ``preference_loss``: ``pygpo.losses.preference_loss("dpo", ...)`` with every check (one host sync
  for the finiteness check) and the TRL metrics;
- ``preference_loss_unchecked``: the same with ``check_finite=False``.

The head has no Python loop over the batch, so its time should barely move from B=8 to B=512;
``scaling_512_over_8`` reports the ratio. Results go to
``bench/results/loss_heads_cpu_<date>.json`` with the machine, versions and git revision.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pygpo.losses import preference_loss

from .machine import git_revision, machine_info, versions

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BETA = 0.1


def _inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(batch, 2, generator=g) * 50
    ref = policy + torch.randn(batch, 2, generator=g)
    return policy.requires_grad_(True), ref


def contenders() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    def torch_expression(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        u = p - r
        return F.softplus(-BETA * (u[:, 0] - u[:, 1])).mean()

    def checked(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return preference_loss("dpo", p, r, beta=BETA).loss

    def unchecked(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return preference_loss("dpo", p, r, beta=BETA, check_finite=False).loss

    return {"torch_expression": torch_expression, "preference_loss": checked, "preference_loss_unchecked": unchecked}


def time_round_robin_us(
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], batch: int, *, inner: int, repeats: int, backward: bool
) -> dict[str, dict[str, float]]:
    """Per contender: median (and spread) over ``repeats`` rounds of the mean time of ``inner`` calls,
    in microseconds. Contenders take turns within each round, so load drift hits all of them alike."""
    policy, ref = _inputs(batch)

    def caller(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            loss = fn(policy, ref)
            if backward:
                torch.autograd.grad(loss, policy)

        return call

    calls = {name: caller(fn) for name, fn in fns.items()}
    for call in calls.values():  # warm-up
        for _ in range(max(inner // 4, 5)):
            call()
    rounds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            rounds[name].append((time.perf_counter() - t0) / inner * 1e6)
    return {name: {"median_us": statistics.median(r), "min_us": min(r), "max_us": max(r)} for name, r in rounds.items()}


def run(batch_sizes: list[int], *, inner: int, repeats: int) -> dict[str, object]:
    fns = contenders()
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {name: {"forward": {}, "forward_backward": {}} for name in fns}
    for mode, backward in (("forward", False), ("forward_backward", True)):
        for b in batch_sizes:
            for name, timing in time_round_robin_us(fns, b, inner=inner, repeats=repeats, backward=backward).items():
                results[name][mode][str(b)] = timing
    summary: dict[str, dict[str, float]] = {name: {} for name in results}
    if {"8", "512"} <= {str(b) for b in batch_sizes}:
        for name in results:
            r = results[name]["forward_backward"]
            summary[name]["scaling_512_over_8"] = r["512"]["median_us"] / r["8"]["median_us"]
    base = results["torch_expression"]["forward_backward"]
    for name in results:
        r = results[name]["forward_backward"]
        summary[name].update({f"overhead_vs_torch_expression_B{b}": r[str(b)]["median_us"] / base[str(b)]["median_us"] for b in batch_sizes})
    return {
        "benchmark": "loss_heads",
        "head": "dpo",
        "dtype": "float32",
        "beta": BETA,
        "timing_method": f"median over {repeats} rounds of the mean wall time of {inner} calls (time.perf_counter) after "
        "warm-up; contenders take turns within each round; ratios (summary) are from this one run",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": versions(),
        "git": git_revision(),
        "results": results,
        "summary": summary,
    }


def _print(report: dict[str, object]) -> None:
    results = report["results"]
    assert isinstance(results, dict)
    print(f"{'contender':28s} {'mode':18s} " + " ".join(f"{'B=' + b:>12s}" for b in next(iter(results.values()))["forward"]))
    for name, modes in results.items():
        for mode, by_b in modes.items():
            print(f"{name:28s} {mode:18s} " + " ".join(f"{v['median_us']:10.1f}us" for v in by_b.values()))
    for name, s in report["summary"].items():  # type: ignore[union-attr]
        print(f"{name}: " + ", ".join(f"{k}={v:.2f}" for k, v in s.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loss_heads", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 512])
    parser.add_argument("--inner", type=int, default=200, help="calls per timed round")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (the median is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="output JSON path (default bench/results/loss_heads_cpu_<date>.json)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.batch_sizes, inner=args.inner, repeats=args.repeats)
    _print(report)
    out = args.out or os.path.join(RESULTS_DIR, f"loss_heads_cpu_{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
