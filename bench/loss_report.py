"""The DPO-loss benchmark's report: ratios to pygpo, the issue's targets, the file name, a table and a plot."""

from __future__ import annotations

import datetime
import os
from typing import Optional

from .loss_contenders import OURS
from .loss_problem import SIZES
from .report import MIB, _check, _fmt, _ratio, trusted


def ratios_vs(records: dict[str, dict], base: str = OURS) -> dict[str, dict[str, Optional[float]]]:
    """Each contender's median time, peak memory and CPU time over ``base``'s (> 1: ``base`` is better);
    contenders that failed their correctness check are left out."""
    records = trusted(records)
    b = records.get(base, {})
    return {name: {"time": _ratio(c.get("median_ms"), b.get("median_ms")),
                   "memory": _ratio(c.get("peak_mem_bytes"), b.get("peak_mem_bytes")),
                   "cpu_time": _ratio(c.get("median_cpu_ms"), b.get("median_cpu_ms"))}
            for name, c in records.items() if c.get("median_ms") is not None}


#: The other pygpo settings whose targets are reported beside the default's (:func:`option_targets`).
OPTIONS = ("pygpo_eager",)


def targets(result: dict, ours: str = OURS) -> dict:
    """The issue's targets on this run, only at the sizes they were set for (informational, never asserted).

    CPU (B=8, T=1024 with a 512-token prompt, D=1024, V=32000 fp32): pygpo faster than naive, Liger and TRL,
    and its peak memory at or under the lowest of theirs. GPU (B=8, T=2048, D=4096, V=128256 bf16; the
    prompt taken as half the sequence): pygpo at most half Liger's time and no slower than TRL's, at lower
    peak memory than both. Values are ``ours`` / contender (``ours``: the pygpo contender judged, by
    default the module's defaults).
    """
    s, c = result["settings"], trusted(result["contenders"])  # a wrong contender meets nothing
    sizes = tuple(s[k] for k in ("pairs", "seq", "prompt", "d", "v", "dtype"))
    device = s["device"]
    if sizes != tuple(SIZES[device][k] for k in ("pairs", "seq", "prompt", "d", "v", "dtype")):
        return {}
    med = lambda n: c.get(n, {}).get("median_ms")  # noqa: E731
    mem = lambda n: c.get(n, {}).get("peak_mem_bytes")  # noqa: E731
    out: dict[str, dict] = {}
    if device == "cpu":
        for other in ("naive", "liger", "trl"):
            out[f"time_vs_{other}"] = _check(_ratio(med(ours), med(other)), 1.0)
        others = [mem(n) for n in ("naive", "liger", "trl")]
        lowest = None if any(m is None for m in others) else min(others)
        out["memory_vs_lowest"] = _check(_ratio(mem(ours), lowest), 1.0)
    else:
        out["time_vs_liger"] = _check(_ratio(med(ours), med("liger")), 0.5)
        out["time_vs_trl"] = _check(_ratio(med(ours), med("trl")), 1.0)
        for other in ("liger", "trl"):
            out[f"memory_vs_{other}"] = _check(_ratio(mem(ours), mem(other)), 1.0)
    return out


def option_targets(result: dict, options: tuple[str, ...] = OPTIONS) -> dict[str, dict]:
    """:func:`targets` for each other pygpo setting in ``options`` that ran and passed its checks."""
    c = trusted(result["contenders"])
    return {name: targets(result, name) for name in options if c.get(name, {}).get("median_ms") is not None}


def default_json_path(out: str, device_slug: str, rev: str, tag: str) -> str:
    """``out`` if it names a ``.json`` file, else ``out/fused_loss_<device>_<date>_<rev>_<tag>.json``."""
    if out.endswith(".json"):
        return out
    return os.path.join(out, f"fused_loss_{device_slug}_{datetime.date.today().isoformat()}_{rev}_{tag}.json")


def table(result: dict) -> str:
    """One line per contender: status, times, memory, ratios to pygpo, differences from float64 naive."""
    vs = result["ratios"][f"vs_{OURS}"]
    lines = [f"{'contender':<10} {'status':<11} {'median ms':>10} {'cpu ms':>9} {'peak MiB':>9} {'t/pygpo':>8} "
             f"{'m/pygpo':>8}  {'|dloss|':>8} {'grad rel':>8}"]
    for name, c in result["contenders"].items():
        r, diff, mem = vs.get(name, {}), c.get("correctness") or {}, c.get("peak_mem_bytes")
        grad = max(diff.get("grad_hidden_rel", float("nan")), diff.get("grad_weight_rel", float("nan"))) if diff else None
        lines.append(f"{name:<10} {c['status']:<11} {_fmt(c.get('median_ms'), '.1f'):>10} "
                     f"{_fmt(c.get('median_cpu_ms'), '.0f'):>9} {_fmt(None if mem is None else mem / MIB, '.1f'):>9} "
                     f"{_fmt(r.get('time'), '.2f'):>8} {_fmt(r.get('memory'), '.2f'):>8}  "
                     f"{_fmt(diff.get('logprobs_max_abs'), '.1e'):>8} {_fmt(grad, '.1e'):>8}")
        if c.get("reason"):
            lines.append(f"{'':<10} -> {c['reason'][:150]}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Median time and peak memory per contender, each bar labelled with its ratio to pygpo."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = result["ratios"][f"vs_{OURS}"]
    names = list(vs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (field, scale, label, key) in zip(axes, (("median_ms", 1.0, "median fwd+bwd time (ms)", "time"),
                                                     ("peak_mem_bytes", 1 / MIB, "peak memory above inputs (MiB)", "memory"))):
        values = [(result["contenders"][n].get(field) or 0) * scale for n in names]
        bars = ax.bar(names, values, color=["tab:green" if n == OURS else "tab:gray" for n in names])
        for bar, n, value in zip(bars, names, values):
            r = vs[n].get(key)
            ax.annotate(f"{value:,.0f}" + ("" if r is None else f"\n{r:.2f}x"),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(label)
        ax.margins(y=0.25)
    s, m = result["settings"], result["machine"]
    fig.suptitle(f"DPO loss from hidden states, fwd+bwd, {m['device_name']} ({m['torch_threads']} threads): B={s['pairs']} "
                 f"T={s['seq']} prompt={s['prompt']} D={s['d']} V={s['v']} {s['dtype']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
