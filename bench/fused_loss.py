"""Benchmark: a DPO step from final hidden states to the loss, forward + backward, pygpo against what users run.

Usage::

    python -m bench.fused_loss                        # CPU: B=8 pairs, T=1024 (512-token prompt), D=1024, V=32000 fp32
    python -m bench.fused_loss --device cuda          # GPU: B=8, T=2048 (1024-token prompt), D=4096, V=128256 bf16
    python -m bench.fused_loss --quick                # tiny shapes, a smoke test

Every contender gets the same inputs: policy ``hidden (2B, T, D)`` and lm_head ``weight (V, D)`` (both
requiring grad), reference ``ref_hidden (2B, T, D)`` and ``ref_weight (V, D)`` (no grad), next-token
``labels (2B, T)`` with ``-100`` on the prompt; rows rank-major (chosen rows, then rejected rows). Each
computes the sigmoid DPO loss ``-mean log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` over
summed completion log-probs (Rafailov et al., 2023, "Direct Preference Optimization", eq. 7), reference
scoring included, the way its library does it:

- ``pygpo``: ``pygpo.FusedPreferenceLoss("dpo", beta=beta)`` with its defaults (metrics on);
- ``pygpo_eager``: the same with ``eager_gradients=True`` (gradients computed in the forward); and two
  breakdown rows, ``pygpo_lean`` (no metrics, no finiteness check) and ``pygpo_ops`` (the bare ops);
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``ref_input``/``ref_weight``; ``compiled`` as chosen);
- ``trl``: TRL's DPOTrainer path from the hidden states on: the fused lm_head it patches into the model
  (``ChunkedLogProbFunction`` with the trainer's chunk size and outputs, valid rows only on Triton
  devices and all rows elsewhere, as ``add_fused_lm_head`` does), per-row sums, and the trainer's
  ``loss_type="sigmoid"`` formula (inline in ``DPOTrainer._compute_loss``, so written out here);
- ``naive``: ``F.linear``, float32 ``log_softmax``, gather, masked sums, the DPO formula.

The model body is common to all and excluded. Steps, timing and the correctness step are those of
:mod:`bench.runner` (a contender is a ``(hidden, weight, labels, ignore_index) -> loss`` closure over the
reference tensors; the upstream gradient is 1): first every contender is checked against the naive loss
in float64 at a small size, then timed (median of round-robin rounds), then its peak memory measured
(CUDA allocator peak, or on the CPU a fresh worker process per contender, as ``bench.memory_worker``).
Writes ``bench/results/fused_loss_<device>_<date>_<rev>_<settings>.json`` and a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import subprocess
import sys
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import measure
from .contenders import Contender
from .machine import REPO_ROOT, device_name, git_revision, machine_info, slug, versions
from .problem import DTYPES, IGNORE_INDEX, Inputs, checksum, inputs_nbytes
from .report import MIB, _check, _fmt, _ratio, write_json
from .runner import _failure, check_correctness, time_contenders

#: ``(hidden, weight, labels, ref_hidden, ref_weight) -> scalar loss``
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
OURS = "pygpo"
REFERENCE = "naive"  # the correctness step's reference (float64 at the small size)
CONTENDER_NAMES = ("naive", "pygpo", "pygpo_eager", "pygpo_lean", "pygpo_ops", "liger", "trl")
#: TRL's DPOTrainer asks its fused lm_head for these (the extra ones feed its logged metrics).
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")

SIZES = {
    "cpu": dict(pairs=8, seq=1024, prompt=512, d=1024, v=32000, dtype="float32"),
    "cuda": dict(pairs=8, seq=2048, prompt=1024, d=4096, v=128256, dtype="bfloat16"),
}
QUICK = dict(pairs=2, seq=64, prompt=32, d=64, v=1000)
CHECK = dict(pairs=2, seq=48, prompt=24, d=64, v=512)  # the float64 correctness step's size
RUNS = {"default": dict(repeats=3, warmup=1), "quick": dict(repeats=2, warmup=1)}


# ---------------------------------------------------------------------------------------------------
# problem and inputs


@dataclasses.dataclass(frozen=True)
class LossProblem:
    """Sizes of one run: ``pairs`` (B) chosen/rejected pairs of ``seq`` (T) tokens, the first ``prompt`` of
    them labelled ``ignore_index``; hidden size ``d``, vocabulary ``v``; DPO ``beta``. JSON-serialisable."""

    pairs: int = 8
    seq: int = 1024
    prompt: int = 512
    d: int = 1024
    v: int = 32000
    dtype: str = "float32"
    beta: float = 0.1
    ref_noise: float = 0.05
    seed: int = 0
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if min(self.pairs, self.seq, self.d, self.v) <= 0:
            raise ValueError(f"pairs, seq, d and v must be positive, got {self.pairs}, {self.seq}, {self.d}, {self.v}")
        if not 0 <= self.prompt < self.seq:
            raise ValueError(f"prompt must lie in [0, seq) so every response has a token, got {self.prompt} (seq={self.seq})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def valid_tokens(self) -> int:
        return 2 * self.pairs * (self.seq - self.prompt)

    def sizes(self) -> tuple:
        return (self.pairs, self.seq, self.prompt, self.d, self.v, self.dtype)

    def tag(self) -> str:
        """Short settings tag for file names, e.g. ``b8-t1024-p512-d1024-v32000-float32``."""
        return f"b{self.pairs}-t{self.seq}-p{self.prompt}-d{self.d}-v{self.v}-{self.dtype}"


class LossInputs(NamedTuple):
    """``step`` holds what the runner differentiates (``grad_out`` is the scalar 1); the reference is frozen."""

    step: Inputs
    ref_hidden: Tensor
    ref_weight: Tensor


def make_loss_inputs(problem: LossProblem, device: str | torch.device) -> LossInputs:
    """Seeded inputs, drawn on the CPU then moved (a worker process rebuilds them bit for bit).

    Logits have a standard deviation of about 2; the reference is the policy plus ``ref_noise`` relative
    noise, so the log-ratios are small and the loss keeps a real gradient, as early in DPO training.
    """
    p = problem
    gen = torch.Generator().manual_seed(p.seed)
    hidden = torch.randn(2 * p.pairs, p.seq, p.d, generator=gen)
    weight = torch.randn(p.v, p.d, generator=gen) * (2.0 / math.sqrt(p.d))
    ref_hidden = hidden + p.ref_noise * torch.randn(hidden.shape, generator=gen)
    ref_weight = weight + p.ref_noise * torch.randn(weight.shape, generator=gen) * (2.0 / math.sqrt(p.d))
    labels = torch.randint(0, p.v, (2 * p.pairs, p.seq), generator=gen)
    labels[:, : p.prompt] = p.ignore_index
    dt = p.torch_dtype
    step = Inputs(hidden.to(device=device, dtype=dt).requires_grad_(True),
                  weight.to(device=device, dtype=dt).requires_grad_(True),
                  labels.to(device), torch.ones((), device=device))
    return LossInputs(step, ref_hidden.to(device=device, dtype=dt), ref_weight.to(device=device, dtype=dt))


def first_pair(inputs: LossInputs, pairs: int) -> LossInputs:
    """Pair 0 alone (rows 0 and B): a warm-up batch that keeps the rank-major layout."""
    rows = torch.tensor([0, pairs], device=inputs.step.labels.device)
    s = inputs.step
    step = Inputs(s.hidden.detach()[rows].requires_grad_(True), s.weight, s.labels[rows], s.grad_out)
    return LossInputs(step, inputs.ref_hidden[rows], inputs.ref_weight)


# ---------------------------------------------------------------------------------------------------
# contenders


def dpo_sigmoid(policy: Tensor, ref: Tensor, beta: float) -> Tensor:
    """``-mean log sigmoid(beta * (chosen log-ratio - rejected log-ratio))`` of rank-major ``(2B,)`` sums."""
    chosen, rejected = (policy - ref).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def naive_loss(beta: float, ignore_index: int, compute_dtype: Optional[torch.dtype] = None) -> LossFn:
    """Eager torch over all rows, logits materialised; ``compute_dtype=torch.float64`` gives the reference."""

    def sequence_logps(h: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        if compute_dtype is not None:
            h, w = h.to(compute_dtype), w.to(compute_dtype)
        logits = F.linear(h, w)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (logp * (labels != ignore_index)).sum(-1)

    def loss(h: Tensor, w: Tensor, labels: Tensor, ref_h: Tensor, ref_w: Tensor) -> Tensor:
        with torch.no_grad():
            ref = sequence_logps(ref_h, ref_w, labels)
        return dpo_sigmoid(sequence_logps(h, w, labels), ref, beta)

    return loss


def pygpo_loss(beta: float, ignore_index: int, **options) -> LossFn:
    import pygpo

    module = pygpo.FusedPreferenceLoss("dpo", beta=beta, ignore_index=ignore_index, **options)
    return lambda h, w, labels, ref_h, ref_w: module(h, w, labels, ref_hidden=ref_h, ref_weight=ref_w).loss


def pygpo_ops_loss(beta: float, ignore_index: int) -> LossFn:
    """The floor under the module: ``fused_linear_logprobs`` for the policy and, under no_grad, the
    reference, then row sums and the DPO formula; what the module adds on top is its overhead."""
    import pygpo

    def sequence_logps(h: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        return pygpo.fused_linear_logprobs(h, w, labels, ignore_index=ignore_index).sum(-1)

    def loss(h: Tensor, w: Tensor, labels: Tensor, ref_h: Tensor, ref_w: Tensor) -> Tensor:
        with torch.no_grad():
            ref = sequence_logps(ref_h, ref_w, labels)
        return dpo_sigmoid(sequence_logps(h, w, labels), ref, beta)

    return loss


def liger_loss(beta: float, ignore_index: int, compiled: bool) -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    module = LigerFusedLinearDPOLoss(ignore_index=ignore_index, beta=beta, compiled=compiled)
    return lambda h, w, labels, ref_h, ref_w: module(w, h, labels, ref_input=ref_h, ref_weight=ref_w)[0]


def trl_loss(beta: float, ignore_index: int) -> LossFn:
    """TRL's fused lm_head (as ``add_fused_lm_head`` calls it) for policy and reference, then DPO sigmoid."""
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction, _use_triton

    def token_logps(h: Tensor, w: Tensor, labels: Tensor, outputs: tuple[str, ...]) -> Tensor:
        mask = labels != ignore_index
        compact = _use_triton(h.device)  # TRL scores only the valid rows on Triton devices
        rows = h[mask] if compact else h.reshape(-1, h.size(-1))
        targets = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
        logps = _ChunkedLogProbFunction.apply(rows, w, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                              outputs)[0]
        if compact:
            return logps.new_zeros(mask.shape).masked_scatter(mask, logps)
        return logps.view(mask.shape).masked_fill(~mask, 0)

    def loss(h: Tensor, w: Tensor, labels: Tensor, ref_h: Tensor, ref_w: Tensor) -> Tensor:
        with torch.no_grad():
            ref = token_logps(ref_h, ref_w, labels, ("log_probs",)).sum(-1)
        return dpo_sigmoid(token_logps(h, w, labels, TRL_DPO_OUTPUTS).sum(-1), ref, beta)

    return loss


def _catalogue(problem: LossProblem, liger_compiled: bool) -> dict[str, tuple[Callable[[], LossFn], str, str]]:
    """``name -> (factory, module it needs, notes for the JSON)``."""
    b, ii = problem.beta, problem.ignore_index
    return {
        "naive": (lambda: naive_loss(b, ii), "torch",
                  "all rows through F.linear; (2B, T, V) logits and float32 log_softmax materialised, policy and reference"),
        "pygpo": (lambda: pygpo_loss(b, ii), "pygpo",
                  "pygpo.FusedPreferenceLoss('dpo', beta) defaults: backend='auto', compute_metrics=True, "
                  "check_finite=True; valid rows only; reference scored under no_grad in its own pass"),
        "pygpo_eager": (lambda: pygpo_loss(b, ii, eager_gradients=True), "pygpo",
                        "pygpo.FusedPreferenceLoss('dpo', beta, eager_gradients=True): gradients computed in the "
                        "forward from a kept logit tile per chunk of pairs (3 matmuls per policy row, not 4)"),
        "pygpo_lean": (lambda: pygpo_loss(b, ii, compute_metrics=False, check_finite=False), "pygpo",
                       "pygpo.FusedPreferenceLoss('dpo', beta, compute_metrics=False, check_finite=False): "
                       "the module without its metrics and finiteness check (a breakdown, not a target)"),
        "pygpo_ops": (lambda: pygpo_ops_loss(b, ii), "pygpo",
                      "pygpo.fused_linear_logprobs for policy and reference (no_grad), row sums, the DPO "
                      "formula: the bare ops under the module (a breakdown, not a target)"),
        "liger": (lambda: liger_loss(b, ii, liger_compiled), "liger_kernel.chunked_loss",
                  f"LigerFusedLinearDPOLoss(beta, compiled={liger_compiled}) defaults (chunk_size=1 pair, "
                  "loss_type='sigmoid'); all rows; gradients computed during the forward"),
        "trl": (lambda: trl_loss(b, ii), "trl.trainer.utils",
                f"TRL DPOTrainer lm_head path: _ChunkedLogProbFunction with outputs={TRL_DPO_OUTPUTS} (policy) and "
                "('log_probs',) (reference, no_grad), chunk _CHUNKED_LOGPROB_CHUNK_SIZE; valid rows only where TRL "
                "uses Triton (CUDA/XPU), all rows elsewhere; loss_type='sigmoid' formula; the trainer's metric "
                "reductions and .item() calls are not included"),
    }


def loss_contenders(
    problem: LossProblem, refs: tuple[Tensor, Tensor], *, only: Optional[list[str]] = None,
    liger_compiled: bool = True, reference: bool = False,
) -> tuple[list[Contender], dict[str, str]]:
    """Contenders bound to the reference tensors ``refs`` and ``{name: reason}`` for those that cannot run.

    ``reference=True`` puts the float64 naive loss first under the name ``naive`` (the runner's correctness
    reference) and renames the run-dtype naive ``naive_<dtype>``. ``naive`` always runs.
    """
    if only is not None and set(only) - set(CONTENDER_NAMES):
        raise ValueError(f"unknown contenders {sorted(set(only) - set(CONTENDER_NAMES))}; choose from {list(CONTENDER_NAMES)}")
    ref_h, ref_w = refs

    def bind(name: str, fn: LossFn, notes: str) -> Contender:
        return Contender(name, lambda h, w, labels, _ii: fn(h, w, labels, ref_h, ref_w), notes)

    ready, skipped = [], {}
    if reference:
        ready.append(bind(REFERENCE, naive_loss(problem.beta, problem.ignore_index, torch.float64), "float64 reference"))
    for name, (factory, module, notes) in _catalogue(problem, liger_compiled).items():
        if only is not None and name != "naive" and name not in only:
            continue
        try:
            fn = factory()
        except Exception as exc:  # noqa: BLE001 - a missing or broken package marks the contender unavailable
            skipped[name] = f"cannot set up {module}: {_failure(exc)}"
            continue
        ready.append(bind(f"naive_{problem.dtype}" if reference and name == "naive" else name, fn, notes))
    return ready, skipped


# ---------------------------------------------------------------------------------------------------
# memory


def _loss_step(c: Contender, inputs: LossInputs, ignore_index: int) -> Callable[[], object]:
    return lambda: measure.fwd_bwd(c.fn, inputs.step, ignore_index)


def worker_measure(name: str, problem: LossProblem, liger_compiled: bool) -> dict:
    """In a fresh CPU process: resident-set increase of one step of contender ``name`` (``bench.memory_worker``'s
    method: a warm-up on pair 0, then ``VmHWM`` after one step minus ``VmRSS`` before it)."""
    inputs = make_loss_inputs(problem, "cpu")
    small = first_pair(inputs, problem.pairs)
    warm = loss_contenders(problem, small[1:], only=[name], liger_compiled=liger_compiled)[0]
    c = next(c for c in loss_contenders(problem, inputs[1:], only=[name], liger_compiled=liger_compiled)[0]
             if c.name == name)
    can_reset = measure.reset_rss_peak()
    if can_reset:
        _loss_step(next(w for w in warm if w.name == name), small, problem.ignore_index)()
    del warm, small
    gc.collect()
    base = measure.rss_bytes() if can_reset else measure.ru_maxrss_bytes()
    measure.reset_rss_peak()
    result = _loss_step(c, inputs, problem.ignore_index)()
    peak = measure.rss_peak_bytes() if can_reset else measure.ru_maxrss_bytes()
    del result
    return {"contender": name, "peak_bytes": int(max(peak - base, 0)), "baseline_rss_bytes": int(base),
            "inputs_checksum": checksum(inputs.step) + float(inputs.ref_hidden.double().sum()),
            "method": "VmHWM after one step minus VmRSS before it (after a warm-up on pair 0)" if can_reset
            else "ru_maxrss increase over one first step (no clear_refs)"}


def cpu_peak_subprocess(name: str, problem: LossProblem, threads: int, liger_compiled: bool) -> dict:
    """``python -m bench.fused_loss --worker NAME`` in a fresh process, malloc pinned to mmap as in
    :func:`bench.measure.cpu_peak_bytes_subprocess`."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(measure.MMAP_THRESHOLD),
               MALLOC_TRIM_THRESHOLD_=str(measure.MMAP_THRESHOLD))
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "bench.fused_loss", "--worker", name, "--threads", str(threads),
           "--problem", json.dumps(dataclasses.asdict(problem))] + ([] if liger_compiled else ["--liger-eager"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=REPO_ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker failed (rc={proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def measure_memory(contenders: list[Contender], inputs: LossInputs, problem: LossProblem, device: torch.device,
                   records: dict, liger_compiled: bool) -> None:
    """Fill ``peak_mem_bytes`` (above the inputs) for every contender that has not failed."""
    expected = checksum(inputs.step) + float(inputs.ref_hidden.double().sum()) if device.type == "cpu" else None
    for c in contenders:
        if records[c.name]["status"] == "failed":
            continue
        try:
            if device.type == "cuda":
                peak = measure.cuda_peak_bytes(_loss_step(c, inputs, problem.ignore_index), device)
            else:
                report = cpu_peak_subprocess(c.name, problem, torch.get_num_threads(), liger_compiled)
                peak = report["peak_bytes"]
                records[c.name]["memory_worker"] = {k: report[k] for k in ("baseline_rss_bytes", "method")}
                if abs(report["inputs_checksum"] - expected) > 1e-6 * max(1.0, abs(expected)):
                    records[c.name]["memory_note"] = "worker inputs differ from the timed inputs"
        except Exception as exc:  # noqa: BLE001
            records[c.name]["memory_error"] = _failure(exc)
            gc.collect()
            continue
        records[c.name].update(peak_mem_bytes=int(peak), peak_mem_mib=round(peak / MIB, 2))


# ---------------------------------------------------------------------------------------------------
# run, ratios, targets


def ratios_vs(records: dict[str, dict], base: str = OURS) -> dict[str, dict[str, Optional[float]]]:
    """Each contender's median time, peak memory and CPU time over ``base``'s (> 1: ``base`` is better)."""
    b = records.get(base, {})
    return {name: {"time": _ratio(c.get("median_ms"), b.get("median_ms")),
                   "memory": _ratio(c.get("peak_mem_bytes"), b.get("peak_mem_bytes")),
                   "cpu_time": _ratio(c.get("median_cpu_ms"), b.get("median_cpu_ms"))}
            for name, c in records.items() if c.get("median_ms") is not None}


def targets(result: dict) -> dict:
    """The issue's targets on this run, only at the sizes they were set for (informational, never asserted).

    CPU (B=8, T=1024 with a 512-token prompt, D=1024, V=32000 fp32): pygpo faster than naive, Liger and TRL,
    and its peak memory at or under the lowest of theirs. GPU (B=8, T=2048, D=4096, V=128256 bf16; the
    prompt taken as half the sequence): pygpo at most half Liger's time and no slower than TRL's, at lower
    peak memory than both. Values are pygpo / contender.
    """
    s, c = result["settings"], result["contenders"]
    sizes = tuple(s[k] for k in ("pairs", "seq", "prompt", "d", "v", "dtype"))
    device = s["device"]
    if sizes != tuple(SIZES[device][k] for k in ("pairs", "seq", "prompt", "d", "v", "dtype")):
        return {}
    med = lambda n: c.get(n, {}).get("median_ms")  # noqa: E731
    mem = lambda n: c.get(n, {}).get("peak_mem_bytes")  # noqa: E731
    out: dict[str, dict] = {}
    if device == "cpu":
        for other in ("naive", "liger", "trl"):
            out[f"time_vs_{other}"] = _check(_ratio(med(OURS), med(other)), 1.0)
        others = [mem(n) for n in ("naive", "liger", "trl")]
        lowest = None if any(m is None for m in others) else min(others)
        out["memory_vs_lowest"] = _check(_ratio(mem(OURS), lowest), 1.0)
    else:
        out["time_vs_liger"] = _check(_ratio(med(OURS), med("liger")), 0.5)
        out["time_vs_trl"] = _check(_ratio(med(OURS), med("trl")), 1.0)
        for other in ("liger", "trl"):
            out[f"memory_vs_{other}"] = _check(_ratio(mem(OURS), mem(other)), 1.0)
    return out


def load_average() -> Optional[list[float]]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run(problem: LossProblem, device: torch.device, *, repeats: int, warmup: int, only: Optional[list[str]] = None,
        memory: bool = True, liger_compiled: bool = True) -> dict:
    """Correctness (float64 naive, small size), timing and memory; returns the JSON-ready result."""
    load_before = load_average()
    check = dataclasses.replace(problem, **CHECK)
    check_inputs = make_loss_inputs(check, device)
    checked, skipped = loss_contenders(check, check_inputs[1:], only=only, liger_compiled=liger_compiled, reference=True)
    check_records: dict[str, dict] = {c.name: {"status": "ok"} for c in checked}
    check_correctness(checked, check_inputs.step, check, device, check_records)
    del check_inputs

    inputs = make_loss_inputs(problem, device)
    contenders, _ = loss_contenders(problem, inputs[1:], only=[n for n in CONTENDER_NAMES if n not in skipped],
                                    liger_compiled=liger_compiled)
    records: dict[str, dict] = {name: {"status": "unavailable", "reason": why} for name, why in skipped.items()}
    for c in contenders:
        small = check_records[f"naive_{problem.dtype}" if c.name == "naive" else c.name]
        records[c.name] = {"status": small["status"], "notes": c.notes, "correctness": small.get("correctness"),
                           **({"reason": small["reason"]} if "reason" in small else {})}
    timed = [c for c in contenders if records[c.name]["status"] != "failed"]
    time_contenders(timed, inputs.step, problem, device, repeats, warmup, records)
    if memory:
        measure_memory(timed, inputs, problem, device, records, liger_compiled)
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
                           f"inputs at {CHECK} (bench.runner.check_correctness, bench.correctness tolerances)",
        },
        "contenders": records,
    }
    result["ratios"] = {f"vs_{OURS}": ratios_vs(records)}
    result["targets"] = targets(result)
    return result


# ---------------------------------------------------------------------------------------------------
# output


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
                 liger_compiled=not args.liger_eager)
    path = default_json_path(args.out, slug(device_name(device)), str(result["git"]["rev"]), args.tag or problem.tag())
    write_json(result, path)
    print(table(result))
    print(f"load average before/after: {result['load_average']}")
    print(f"wrote {path}")
    if not args.no_plot:
        png = os.path.splitext(path)[0] + ".png"
        plot(result, png)
        print(f"wrote {png}")
    for name, check in result["targets"].items():
        print(f"target {name}: pygpo {check['value']} (limit {check['limit']}) met={check['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
