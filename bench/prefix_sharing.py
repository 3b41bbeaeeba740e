"""Prefix sharing benchmark: fwd+bwd time of shared vs unshared preference batches, next to the ceiling.

``python -m bench.prefix_sharing`` (CPU, a small random Llama) and ``python -m bench.prefix_sharing
--device cuda`` (GPU: the attention kernel at S=4096, d=128 against SDPA causal, then the end-to-end
step on a larger Llama in bf16).

A *step* scores every response of a packed batch of preference examples and back-propagates through
the model: model body -> lm_head on the target rows -> per-response log-prob sums -> a weighted sum ->
backward. Packing (``pack``, token lists -> ``PrefixBatch``) is the data collator's work, done in a
training loop by the data loader's workers while the GPU runs the previous step; it is timed apart
(``shared_pack_ms``, ``unshared_pack_ms``) and not inside the step. The same step runs on

* **shared**: ``pack(prompts, [[chosen, rejected], ...])``, every prompt computed once;
* **unshared**: the same examples as ``2E`` separate ``prompt + response`` sequences
  (``pack(..., min_responses=1)``), through the very same code path (same attention backend, same
  packing), so the ratio isolates the sharing;
* **padded** (reported, not the baseline): what a stock trainer does, ``2E`` rows padded to the
  longest, transformers' own SDPA causal attention.

The ceiling of the speed-up is the token ratio ``sum(2P + Rc + Rr) / sum(P + Rc + Rr)``
(``PrefixBatch.stats().ratio``); the target on CPU is at least 90% of it.

Length profiles, sampled from log-normal distributions (not fixed):

* ``ultrafeedback``: short prompts, long responses, mean prompt ~0.4x the two responses together;
* ``capybara``: long multi-turn prompts, mean prompt ~1.6x the two responses together.

The idea and both profiles follow "Accelerating Direct Preference Optimization with Prefix Sharing"
(Wang & Hegde, 2024); the GPU kernel is compared with the FlashAttention-2-based SDPA.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

PROFILES = {
    # name: (mean prompt tokens, mean tokens of one response); prompt / (2 * response) = 0.4 and 1.6.
    "ultrafeedback": (0.4 * 2 * 160, 160),
    "capybara": (1.6 * 2 * 80, 80),
}


@dataclass
class Setup:
    """Model and batch sizes of one run."""

    device: str
    dtype: torch.dtype
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    examples: int
    max_tokens: int  # longest example (sampled lengths are shrunk to fit)
    scale: float  # multiplies the profile's mean lengths
    repeats: int
    batches: int
    backend: str


CPU_SETUP = Setup("cpu", torch.float32, hidden=256, layers=4, heads=4, kv_heads=2, vocab=4096, examples=8,
                  max_tokens=1024, scale=0.5, repeats=5, batches=2, backend="torch")
# 24 examples a batch (about 20k tokens unshared; 12 with --quick): a first H100 run with 4 measured a
# step of ~55 ms that was mostly launch and host overhead, the same for shared and unshared batches, so
# the ratio said little about the sharing. (The padded stock step holds 2E rows of the longest length.)
GPU_SETUP = Setup("cuda", torch.bfloat16, hidden=2048, layers=8, heads=16, kv_heads=8, vocab=32000, examples=24,
                  max_tokens=4096, scale=2.0, repeats=10, batches=2, backend="auto")


def sample_examples(profile: str, n: int, vocab: int, seed: int, scale: float = 1.0,
                    max_tokens: Optional[int] = None) -> tuple[list[list[int]], list[list[list[int]]]]:
    """``n`` random examples with prompt / response lengths drawn from log-normals of the profile's means
    (sigma 0.6, at least 4 tokens); lengths are shrunk together when an example exceeds ``max_tokens``."""
    mean_p, mean_r = PROFILES[profile]
    rng = random.Random(seed)
    sigma = 0.6

    def draw(mean: float) -> int:
        return max(4, int(round(rng.lognormvariate(math.log(mean * scale) - sigma ** 2 / 2, sigma))))

    prompts, responses = [], []
    for _ in range(n):
        p, c, r = draw(mean_p), draw(mean_r), draw(mean_r)
        if max_tokens is not None and p + c + r > max_tokens:
            f = max_tokens / (p + c + r)
            p, c, r = (max(1, int(x * f)) for x in (p, c, r))
        tok = lambda m: [rng.randrange(vocab) for _ in range(m)]  # noqa: E731
        prompts.append(tok(p))
        responses.append([tok(c), tok(r)])
    return prompts, responses


def build_model(s: Setup, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=int(s.hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=8192, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=s.device, dtype=s.dtype)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(step: Callable[[], Any], device: str, repeats: int) -> float:
    """Median wall time (ms) of ``step`` over ``repeats`` calls after one warm-up call."""
    return _timed_interleaved({"step": step}, device, repeats)["step"]["wall_ms"]


def _timed_interleaved(steps: dict[str, Callable[[], Any]], device: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall time and process CPU time (ms) of each step, the steps taking turns (A, B, C, A, B, ...)
    after one warm-up call each, so that load from other processes hits all of them alike.

    On a shared CPU the wall time mostly measures the neighbours; the process CPU time (with one torch
    thread, no spinning) counts the work done by this process and is the figure the CPU ratios use.
    """
    for step in steps.values():
        step()
    _sync(device)
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            _sync(device)
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])}
            for name in steps}


def _shared_step(model, batch):
    """Score every response of the packed ``batch`` and back-propagate (the batch moves to the model's
    device inside, as a training step's would)."""
    from pygpo.integrations.transformers import response_logprobs

    def step():
        logps = response_logprobs(model, batch)
        (logps * 1e-3).sum().backward()

    return step


def _pack_ms(prompts, responses, max_tokens: int, min_responses: int, repeats: int):
    """``(batch, median ms of pack)`` over ``repeats`` calls (host work only)."""
    from pygpo.prefix import pack

    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        batch = pack(prompts, responses, max_tokens=max_tokens, min_responses=min_responses)
        times.append((time.perf_counter() - t0) * 1e3)
    return batch, statistics.median(times)


def _padded_step(model, prompts, responses, device):
    """2E rows ``prompt + response`` right-padded to the longest; causal SDPA needs no mask for real tokens."""
    seqs = [(p, y) for p, ys in zip(prompts, responses) for y in ys]
    S = max(len(p) + len(y) for p, y in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    labels = torch.full((len(seqs), S), -100, dtype=torch.long)
    for i, (p, y) in enumerate(seqs):
        ids[i, :len(p) + len(y)] = torch.tensor(p + y)
        labels[i, len(p) - 1:len(p) + len(y) - 1] = torch.tensor(y)
    ids, labels = ids.to(device), labels.to(device)
    sel = (labels != -100).flatten().nonzero().flatten()
    seq_of = sel // S

    def step():
        hidden = model.model(input_ids=ids).last_hidden_state
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, sel)
        logp = torch.log_softmax(model.lm_head(rows).float(), -1).gather(-1, labels.flatten()[sel][:, None])[:, 0]
        per_seq = torch.zeros(len(seqs), device=device).index_add(0, seq_of, logp)
        (per_seq * 1e-3).sum().backward()

    return step


def bench_profile(s: Setup, profile: str, shared_model, stock_model, seed: int = 0) -> dict[str, Any]:
    """Shared / unshared / padded step times (ms, medians summed over ``s.batches`` batches) and the ceiling.

    The speed-up uses process CPU time on the CPU (robust to other load on a shared machine; one torch
    thread) and wall time on a GPU (CUDA-synchronised).
    """
    metric = "cpu_ms" if s.device == "cpu" else "wall_ms"
    tot = {f"{n}_{m}": 0.0 for n in ("shared", "unshared", "padded") for m in ("wall_ms", "cpu_ms")}
    tot.update(shared_pack_ms=0.0, unshared_pack_ms=0.0)
    tokens = {"tokens_unshared": 0, "tokens_shared": 0, "padded_tokens_shared": 0, "padded_tokens_unshared": 0}
    for i in range(s.batches):
        prompts, responses = sample_examples(profile, s.examples, s.vocab, seed + i, s.scale, s.max_tokens)
        singles_p = [p for p, ys in zip(prompts, responses) for _ in ys]
        singles_r = [[y] for ys in responses for y in ys]
        # Each batch is packed into one row (row capacity = every token of the unshared batch), so
        # neither side pays for padding and the ratio measures the sharing alone.
        row = sum(len(p) + len(y[0]) for p, y in zip(singles_p, singles_r))
        shared_batch, ms = _pack_ms(prompts, responses, row, 2, s.repeats)
        tot["shared_pack_ms"] += ms
        unshared_batch, ms = _pack_ms(singles_p, singles_r, row, 1, s.repeats)
        tot["unshared_pack_ms"] += ms
        shared, unshared = _shared_step(shared_model, shared_batch), _shared_step(shared_model, unshared_batch)
        st, su = shared_batch.stats(), unshared_batch.stats()
        steps = {"shared": shared, "unshared": unshared}
        if stock_model is not None:
            steps["padded"] = _padded_step(stock_model, prompts, responses, s.device)
        for name, times in _timed_interleaved(steps, s.device, s.repeats).items():
            for m, ms in times.items():
                tot[f"{name}_{m}"] += ms
        shared_model.zero_grad(set_to_none=True)
        if stock_model is not None:
            stock_model.zero_grad(set_to_none=True)
        tokens["tokens_unshared"] += st.tokens_unshared
        tokens["tokens_shared"] += st.tokens_shared
        tokens["padded_tokens_shared"] += st.padded_tokens
        tokens["padded_tokens_unshared"] += su.padded_tokens
    ceiling = tokens["tokens_unshared"] / tokens["tokens_shared"]
    speedup = tot[f"unshared_{metric}"] / tot[f"shared_{metric}"]
    out = {"profile": profile, "metric": metric, **tot, **tokens, "ceiling": ceiling, "speedup": speedup,
           "fraction_of_ceiling": speedup / ceiling,
           "speedup_wall": tot["unshared_wall_ms"] / tot["shared_wall_ms"]}
    if stock_model is not None:
        out["speedup_vs_padded"] = tot[f"padded_{metric}"] / tot[f"shared_{metric}"]
    return out


def kernel_problem(S: int = 4096, d: int = 128, batch: int = 2, heads: int = 16, kv_heads: int = 16,
                   dtype: torch.dtype = torch.bfloat16, device: str = "cuda"):
    """Random ``q, k, v, dO`` and the two layouts of the kernel comparison: ``(q, k, v, do, layouts)``.

    Layouts on the same ``S`` tokens per row: ``causal`` (one document, one response: the mask *is*
    causal, the like-for-like comparison with SDPA) and ``shared`` (documents of a prompt and two
    responses, Capybara-like, packed to ``S``: sparser than causal).
    """
    from pygpo.prefix import PrefixLayout

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, S, d, device=device, dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(batch, kv_heads, S, d, device=device, dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(batch, kv_heads, S, d, device=device, dtype=dtype, generator=g).requires_grad_()
    do = torch.randn(batch, heads, S, d, device=device, dtype=dtype, generator=g)

    rng = random.Random(0)
    shared_rows = []
    for _ in range(batch):
        docs, used = [], 0
        while True:
            p, c, r = (max(1, x * S // 4096) for x in (rng.randint(200, 600), rng.randint(80, 250),
                                                        rng.randint(80, 250)))
            if used + p + c + r > S:
                break
            docs.append((p, [c, r]))
            used += p + c + r
        shared_rows.append(docs)
    layouts = {
        "causal": PrefixLayout.from_lengths([[(S // 2, [S - S // 2])]] * batch, seq_len=S),
        "shared": PrefixLayout.from_lengths(shared_rows, seq_len=S),
    }
    return q, k, v, do, layouts


def bench_attention_kernel(S: int = 4096, d: int = 128, batch: int = 2, heads: int = 16, kv_heads: int = 16,
                           dtype: torch.dtype = torch.bfloat16, repeats: int = 20,
                           device: str = "cuda") -> list[dict[str, Any]]:
    """GPU: fwd+bwd of the Triton prefix attention vs ``scaled_dot_product_attention(is_causal=True)``
    on the layouts of :func:`kernel_problem` (target on ``causal``: within 1.1x). Equal query and
    key/value heads by default, so SDPA's flash kernel runs without a grouped-query detour.
    ``device="cpu"`` under ``TRITON_INTERPRET=1`` at tiny sizes is a smoke test only.
    """
    import torch.nn.functional as F

    from pygpo.prefix import prefix_attention

    dev = device
    q, k, v, do, layouts = kernel_problem(S, d, batch, heads, kv_heads, dtype, dev)

    def sdpa_step():
        # equal heads (the default): no copies timed; GQA: the copies SDPA's flash kernel needs
        kk = k if heads == kv_heads else k.repeat_interleave(heads // kv_heads, 1)
        vv = v if heads == kv_heads else v.repeat_interleave(heads // kv_heads, 1)
        out = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        torch.autograd.grad(out, (q, k, v), do)

    sdpa_ms = _timed(sdpa_step, dev, repeats)
    # GPT-OSS-style local layers on the causal layout: a window of S/32 keys (128 at 4096) and sinks;
    # the window skips the tiles out of reach (no SDPA counterpart: its masked path is dense)
    sinks = torch.linspace(-1.0, 1.0, heads, device=dev)
    variants = [(name, layout, None, None) for name, layout in layouts.items()]
    variants.append(("causal_window_sinks", layouts["causal"], max(1, S // 32), sinks))
    results = []
    for name, layout, window, sink in variants:
        def step(layout=layout, window=window, sink=sink):
            out = prefix_attention(q, k, v, layout, sliding_window=window, sinks=sink, backend="triton")
            torch.autograd.grad(out, (q, k, v), do)

        ms = _timed(step, dev, repeats)
        with torch.no_grad():
            ref = prefix_attention(q.float(), k.float(), v.float(), layout, sliding_window=window, sinks=sink,
                                   backend="torch")
            got = prefix_attention(q, k, v, layout, sliding_window=window, sinks=sink, backend="triton")
            err = float((got.float() - ref).abs().max())
        results.append({"layout": name, "S": S, "d": d, "batch": batch, "heads": heads, "kv_heads": kv_heads,
                        "sliding_window": window, "sinks": sink is not None,
                        "dtype": str(dtype), "prefix_ms": ms, "sdpa_causal_ms": sdpa_ms,
                        "ratio_to_sdpa": ms / sdpa_ms, "max_abs_err_vs_torch_fp32": err})
    return results


def _machine(device: str) -> dict[str, Any]:
    try:
        from .machine import git_revision, machine_info, versions

        return {"machine": machine_info(torch.device(device)), "versions": versions(), "git": git_revision()}
    except ImportError:  # bench/machine.py absent: the minimum
        import platform

        return {"machine": {"device": device, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "torch_threads": torch.get_num_threads()},
                "versions": {"torch": torch.__version__}, "git": {"rev": "unknown", "dirty": None}}


def run(s: Setup, out_dir: str, kernel: bool, end_to_end: bool = True) -> dict[str, Any]:
    """Run the benchmark for setup ``s`` (kernel comparison first when ``kernel``), print a summary and
    write the JSON report into ``out_dir``; returns the report."""
    info = _machine(s.device)
    report: dict[str, Any] = {
        "benchmark": "prefix_sharing",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "setup": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(s).items()},
        **info,
        "profiles": [],
        "note": "ratios come from one process and one run; CPU ratios use process CPU time because wall "
                "times on a shared machine mostly measure the neighbours",
    }
    if kernel:
        report["attention_kernel"] = bench_attention_kernel()
        for r in report["attention_kernel"]:
            print(f"kernel {r['layout']:7s} S={r['S']} d={r['d']}: prefix {r['prefix_ms']:.3f} ms, "
                  f"SDPA causal {r['sdpa_causal_ms']:.3f} ms, ratio {r['ratio_to_sdpa']:.3f}", flush=True)
    if end_to_end:
        try:
            from pygpo.integrations.transformers import enable_prefix_sharing

            shared_model = enable_prefix_sharing(build_model(s), backend=s.backend)
            stock_model = build_model(s, "sdpa")
        except ImportError as exc:  # no transformers on this machine
            report["end_to_end_skipped"] = f"{type(exc).__name__}: {exc}"
            print(f"end-to-end step skipped: {exc}", flush=True)
        else:
            for profile in PROFILES:
                r = bench_profile(s, profile, shared_model, stock_model)
                report["profiles"].append(r)
                m = r["metric"]
                print(f"{profile:14s} ({m}) shared {r['shared_' + m]:8.1f}  unshared {r['unshared_' + m]:8.1f}  "
                      f"padded {r['padded_' + m]:8.1f}  speedup {r['speedup']:.3f} (wall {r['speedup_wall']:.3f})  "
                      f"ceiling {r['ceiling']:.3f} -> {100 * r['fraction_of_ceiling']:.1f}% of ceiling  "
                      f"(pack, outside the step: {r['shared_pack_ms']:.1f} / {r['unshared_pack_ms']:.1f} ms)", flush=True)
    from .report import write_dated_json

    write_dated_json(report, out_dir, f"prefix_sharing_{'cpu' if s.device == 'cpu' else 'cuda'}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="fewer repeats and batches (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--no-kernel", action="store_true", help="GPU: skip the attention-kernel comparison")
    ap.add_argument("--kernel-only", action="store_true", help="GPU: only the attention-kernel comparison")
    args = ap.parse_args(argv)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device")
    s = CPU_SETUP if args.device == "cpu" else GPU_SETUP
    if args.quick:
        s = Setup(**{**vars(s), "repeats": 2, "batches": 1, "examples": max(2, s.examples // 2)})
    if args.repeats:
        s = Setup(**{**vars(s), "repeats": args.repeats})
    if args.kernel_only and args.device != "cuda":
        ap.error("--kernel-only needs --device cuda")
    run(s, args.out, kernel=args.device == "cuda" and not args.no_kernel, end_to_end=not args.kernel_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
