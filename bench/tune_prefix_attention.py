"""Per-kernel timings of the prefix-sharing attention over a small grid of tile configurations.

``python -m bench.tune_prefix_attention --out DIR`` (GPU; ``bench/gpu_check.sh`` runs it).

The attention's fwd+bwd is three kernels: the forward, ``dK/dV`` and ``dQ``
(``pygpo/kernels/prefix_attention_*.py``). Their tile shapes, warps and pipeline stages
(``PrefixAttentionConfig``) were chosen without a GPU at hand; this script times each kernel alone,
for every candidate of its own grid, at S=4096, d=128, bf16, on the ``causal`` and ``shared``
layouts of :func:`bench.prefix_sharing.kernel_problem`, beside SDPA's causal forward and fwd+bwd.
Every candidate's output is compared with a float32 torch reference (relative max error), so a fast
but wrong configuration is flagged, not chosen.

The JSON gives, per layout and kernel, each candidate's median time (``triton.testing.do_bench``), the
fastest correct one, and the fwd+bwd totals of the current default and of the per-kernel best, as
ratios to SDPA's causal fwd+bwd: what ``default_config`` should become; and the total with the ``dK/dV``
kernel that accumulates ``dQ`` with atomics instead of the ``dQ`` kernel (``atomic_dq``). A candidate that does not
compile or does not fit the shared memory is recorded with its error.

``--device cpu`` (under ``TRITON_INTERPRET=1``, tiny sizes) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import time
from typing import Any, Callable, Optional

import torch

#: ``(block_m, block_n, num_warps, num_stages)`` candidates of each kernel on a GPU; the first of each
#: list is the current default for 16-bit inputs and head dim 128 (``default_config``).
#: Early in each list (a capped sweep skips the tail): FlashAttention-2-style backward tiles with deep
#: pipelines, a thin block on the inner loop's axis (32 queries per step for dK/dV, 32 keys for dQ) at 4
#: warps and 5 stages; they fit an H100's shared memory at d=128 (dK/dV: 5 x 16 KiB of q/dO stages plus
#: 64 KiB of k/v).
GPU_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 4),
            (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2)],
    "dq": [(128, 32, 8, 3), (128, 32, 4, 5), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3),
           (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2)],
    "dkdv": [(64, 64, 8, 3), (32, 128, 4, 5), (64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2),
             (32, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (16, 128, 8, 3)],
}
#: Interpreter smoke test: tiles of 16 and 32 only.
CPU_CANDIDATES = {"fwd": [(16, 16, 4, 1), (32, 16, 4, 1)], "dq": [(16, 16, 4, 1), (16, 32, 4, 1)],
                  "dkdv": [(16, 16, 4, 1), (32, 16, 4, 1)]}
#: A candidate is correct when its largest error is within this fraction of the reference's largest
#: magnitude (bf16 inputs; the default configurations give about 1e-2).
REL_TOLERANCE = 5e-2


def _timer(device: str, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of a call: ``triton.testing.do_bench`` on CUDA, perf_counter on CPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=10, rep=max(repeats, 20), return_mode="median"))

    def cpu_time(fn):
        fn()
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def _rel_err(actual, expected) -> float:
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    return max(float((a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-12))
               for a, e in zip(actual, expected))


def _reference(q, k, v, do, layout, scale: float):
    """float32 torch-backend output and gradients ``(o, dq, dk, dv)``."""
    from pygpo.prefix import prefix_attention

    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    o = prefix_attention(qf, kf, vf, layout, scale=scale, backend="torch")
    dq, dk, dv = torch.autograd.grad(o, (qf, kf, vf), do.float())
    return o.detach(), dq, dk, dv


def _sweep(name: str, candidates, run: Callable[[tuple], Any], expected, timer,
           deadline: Optional[float] = None) -> dict[str, Any]:
    """Time ``run(candidate)`` for each candidate; check it against ``expected``; pick the fastest correct.

    Past ``deadline`` (a ``time.monotonic()`` value) the remaining candidates are recorded as skipped,
    except the first (the default), which is always timed so that every total exists.
    """
    rows = []
    for i, cand in enumerate(candidates):
        row: dict[str, Any] = {"block_m": cand[0], "block_n": cand[1], "num_warps": cand[2], "num_stages": cand[3]}
        if i and deadline is not None and time.monotonic() > deadline:
            row.update(ok=False, skipped="time budget spent")
            rows.append(row)
            continue
        try:
            row["rel_err"] = _rel_err(run(cand), expected)
            row["ok"] = row["rel_err"] <= REL_TOLERANCE
            row["ms"] = timer(lambda: run(cand))
        except Exception as exc:  # noqa: BLE001  (out of shared memory, compile errors: recorded, not fatal)
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        rows.append(row)
        print(f"  {name:5s} {cand}: " + (f"{row['ms']:.3f} ms, rel err {row['rel_err']:.1e}" if "ms" in row
                                        else row.get("error", row.get("skipped", ""))), flush=True)
    good = [r for r in rows if r.get("ok") and "ms" in r]
    best = min(good, key=lambda r: r["ms"]) if good else None
    return {"candidates": rows, "default": rows[0], "best": best}


def _slices(deadline: Optional[float], parts: int) -> list[Optional[float]]:
    """``parts`` cumulative deadlines splitting what is left until ``deadline`` evenly (time a part leaves
    unused goes to the next ones); ``None`` for each without a deadline."""
    if deadline is None:
        return [None] * parts
    t0 = time.monotonic()
    return [t0 + (deadline - t0) * (i + 1) / parts for i in range(parts)]


def tune_layout(layout_name: str, layout, q, k, v, do, candidates, timer,
                deadline: Optional[float] = None) -> dict[str, Any]:
    """Sweep the three kernels on one layout, and the ``dK/dV`` kernel with atomic ``dQ``. With ``deadline``,
    each of the four sweeps gets an even share of the time left (so a slow compile cannot leave the last
    sweep, and with it one side of the atomic-dQ comparison, with its default alone); candidates past
    their sweep's share are skipped (:func:`_sweep`)."""
    from pygpo.kernels.prefix_attention_bwd import attention_delta, launch_dkdv, launch_dq
    from pygpo.kernels.prefix_attention_fwd import prefix_attention_fwd
    from pygpo.prefix.blocks import build_block_map

    device = q.device
    scale = q.shape[-1] ** -0.5
    bounds = layout.token_bounds(device)
    o_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, do, layout, scale)

    def lists(m: int, n: int, key_major: bool):
        bm = build_block_map(layout, m, n, device)
        return bm.key_major() if key_major else bm.query_major()

    with torch.no_grad():
        m0, n0, w0, s0 = candidates["fwd"][0]
        o, lse2 = prefix_attention_fwd(q, k, v, bounds, *lists(m0, n0, False), scale, m0, n0, w0, s0)
        delta, lse2 = attention_delta(o, do), lse2.contiguous()
        print(f"layout {layout_name}", flush=True)
        ends = _slices(deadline, 4)
        fwd = _sweep("fwd", candidates["fwd"], lambda c: prefix_attention_fwd(
            q, k, v, bounds, *lists(c[0], c[1], False), scale, c[0], c[1], c[2], c[3])[0], o_ref, timer, ends[0])
        dq = _sweep("dq", candidates["dq"], lambda c: launch_dq(
            q, k, v, do, lse2, delta, bounds, lists(c[0], c[1], False), (c[0], c[1]), scale, (c[2], c[3])),
            dq_ref, timer, ends[1])
        dkdv = _sweep("dkdv", candidates["dkdv"], lambda c: launch_dkdv(
            q, k, v, do, lse2, delta, bounds, lists(c[0], c[1], True), (c[0], c[1]), scale, (c[2], c[3]))[:2],
            (dk_ref, dv_ref), timer, ends[2])
        # the dK/dV kernel that also accumulates dQ with atomics: replaces the dQ kernel
        dkdv_atomic = _sweep("dkdv_atomic_dq", candidates["dkdv"][:5], lambda c: launch_dkdv(
            q, k, v, do, lse2, delta, bounds, lists(c[0], c[1], True), (c[0], c[1]), scale, (c[2], c[3]),
            atomic_dq=True), (dk_ref, dv_ref, dq_ref), timer, ends[3])
        delta_ms = timer(lambda: attention_delta(o, do))
    kernels = {"fwd": fwd, "dq": dq, "dkdv": dkdv, "dkdv_atomic_dq": dkdv_atomic}

    def total(pick: str, names: tuple[str, ...]) -> Optional[float]:
        picked = [kernels[k][pick] for k in names]
        if any(p is None or "ms" not in p or not p.get("ok") for p in picked):
            return None  # a kernel without a correct timed candidate: no total
        return sum(p["ms"] for p in picked) + delta_ms

    two_kernels, atomic = ("fwd", "dq", "dkdv"), ("fwd", "dkdv_atomic_dq")
    return {"layout": layout_name, "kernels": kernels, "delta_ms": delta_ms,
            "total_default_ms": total("default", two_kernels), "total_best_ms": total("best", two_kernels),
            "total_best_atomic_dq_ms": total("best", atomic)}


def sdpa_times(q, k, v, do, timer) -> dict[str, float]:
    """SDPA causal forward, and fwd+bwd, on the same tensors (equal query and key/value heads)."""
    import torch.nn.functional as F

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), do)

    return {"fwd_ms": timer(fwd), "fwd_bwd_ms": timer(fwd_bwd)}


def run(device: str, S: int, d: int, batch: int, heads: int, repeats: int, out: Optional[str],
        budget_s: Optional[float] = None) -> dict[str, Any]:
    """Sweep every layout of ``kernel_problem``; with ``budget_s``, each layout gets an even share of it
    (what one leaves unused goes to the next) and candidates (but the defaults) that would start past
    their share are skipped. The JSON is rewritten after each layout, so a run cut short keeps what it
    measured."""
    from .prefix_sharing import _machine, kernel_problem

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, do, layouts = kernel_problem(S, d, batch, heads, heads, dtype, device)
    timer = _timer(device, repeats)
    candidates = GPU_CANDIDATES if device == "cuda" else CPU_CANDIDATES
    sdpa = sdpa_times(q, k, v, do, timer)
    report = {"benchmark": "tune_prefix_attention", "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "setup": {"device": device, "dtype": str(dtype), "S": S, "d": d, "batch": batch, "heads": heads,
                        "rel_tolerance": REL_TOLERANCE, "budget_s": budget_s},
              **_machine(device), "sdpa_causal": sdpa, "layouts": []}
    deadline = None if budget_s is None else time.monotonic() + budget_s
    for i, (name, layout) in enumerate(layouts.items()):
        r = tune_layout(name, layout, q, k, v, do, candidates, timer, _slices(deadline, len(layouts) - i)[0])
        for key in ("total_default_ms", "total_best_ms", "total_best_atomic_dq_ms"):
            r[key.replace("_ms", "_vs_sdpa")] = None if r[key] is None else r[key] / sdpa["fwd_bwd_ms"]
        print(f"{r['layout']}: default {r['total_default_ms']} ms, per-kernel best {r['total_best_ms']} ms, "
              f"with atomic dQ {r['total_best_atomic_dq_ms']} ms, SDPA causal fwd+bwd {sdpa['fwd_bwd_ms']:.3f} ms",
              flush=True)
        report["layouts"].append(r)
        if out:
            from .machine import device_name, slug
            from .report import write_dated_json

            write_dated_json(report, out, f"tune_prefix_attention_{slug(device_name(torch.device(device)))}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--S", type=int, default=None, help="tokens per row (default 4096; 64 on CPU)")
    ap.add_argument("--d", type=int, default=None, help="head dim (default 128; 32 on CPU)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=None, help="heads (default 16; 2 on CPU)")
    ap.add_argument("--repeats", type=int, default=20,
                    help="CPU: timed calls per candidate; CUDA: milliseconds of repetition for triton's do_bench")
    ap.add_argument("--out", default=None, help="folder for the JSON")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds after which untried candidates (not the defaults) are skipped")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device")
    gpu = args.device == "cuda"
    run(args.device, args.S or (4096 if gpu else 64), args.d or (128 if gpu else 32), args.batch,
        args.heads or (16 if gpu else 2), args.repeats, args.out, args.budget_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
