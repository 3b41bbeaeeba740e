"""The contenders: one function per way of getting per-token log-probs of ``softmax(hidden @ W.T)``.

Every contender has the same signature, ``fn(hidden (N, D), weight (V, D), labels (N,), ignore_index)
-> (N,) float32 log-probs`` with 0.0 at ignored rows, and is differentiable w.r.t. hidden and
weight. Third-party imports happen inside :func:`available_contenders`, so a missing package only
marks its contender unavailable, with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LogProbFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]

#: TRL trainer's vocabulary tile width (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``).
TRL_CHUNK_SIZE = 32768


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    fn: LogProbFn
    notes: str = ""


def naive(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """Eager torch: F.linear -> float32 log_softmax -> gather over all rows; ignored rows set to 0."""
    logits = F.linear(hidden, weight).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    return logp.masked_fill(labels == ignore_index, 0.0)


def pygpo_torch(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """pygpo's chunked torch backend (compacts the valid rows itself)."""
    import pygpo

    return pygpo.fused_linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, backend="torch")


def pygpo_triton(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """pygpo's Triton backend with its defaults (compacts the valid rows itself; deterministic backward)."""
    import pygpo

    return pygpo.fused_linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, backend="triton")


def pygpo_triton_atomic(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """pygpo's Triton backend with the fused atomic backward (fp32 atomics, no dRaw buffer)."""
    import pygpo

    return pygpo.fused_linear_logprobs(
        hidden, weight, labels, ignore_index=ignore_index, backend="triton", deterministic=False
    )


def pygpo_cuda(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """pygpo's compiled backend: cuBLAS tiles plus the ``pygpo._C`` epilogue kernels."""
    import pygpo

    return pygpo.fused_linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, backend="cuda")


#: ``memory_budget`` of the ``pygpo_cuda_kept`` contender: room for the valid rows' whole bf16 logit
#: matrix at the GPU size (N=8192, V=128256: 1 GiB at 50% ignored rows, 2 GiB at 0%).
KEPT_BUDGET = 3 * 2**30


def pygpo_cuda_kept(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """The cuda backend with a budget that keeps the logit matrix for the backward (three matmuls)."""
    import pygpo

    return pygpo.fused_linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, backend="cuda",
                                       memory_budget=KEPT_BUDGET)


def torch_lce(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``-F.linear_cross_entropy(reduction="none")``, the reference path (``options=None``)."""
    loss = F.linear_cross_entropy(hidden, weight, labels, reduction="none", ignore_index=ignore_index)
    return -loss.float()


def torch_lce_chunked(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``-F.linear_cross_entropy(reduction="none", options=LinearCrossEntropyOptions())``: torch's
    batch-chunked op with its default ("auto") chunking and accumulation policy."""
    options = torch.nn.LinearCrossEntropyOptions()
    loss = F.linear_cross_entropy(
        hidden, weight, labels, reduction="none", ignore_index=ignore_index, options=options
    )
    return -loss.float()


def trl_chunked(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """TRL's ``ChunkedLogProbFunction`` on the valid rows only (compacted with a boolean mask and
    scattered back, as TRL's trainer does on Triton devices), log-probs only (``outputs=()``)."""
    from trl.kernels import ChunkedLogProbFunction

    mask = labels != ignore_index
    logp = ChunkedLogProbFunction.apply(
        hidden[mask], weight, None, labels[mask], 1.0, TRL_CHUNK_SIZE, None, 1.0, ()
    )[0]
    return logp.new_zeros(labels.shape).masked_scatter(mask, logp)


def liger_flce(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``-liger_fused_linear_cross_entropy(reduction="none")`` (Liger-Kernel, Triton)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none")
    return -loss.float()


def cce(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``-cut_cross_entropy.linear_cross_entropy(reduction="none")`` (Apple's Cut Cross-Entropy), with
    its default gradient filtering (``filter_eps``), as users run it."""
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="none")
    return -loss.float()


def _module_missing(name: str) -> Optional[str]:
    """Why ``name`` cannot be imported, or ``None`` if it can."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or a package that breaks at import
        return f"cannot import {name}: {type(exc).__name__}: {exc}"
    return None


def _triton_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CUDA only (on CPU only under TRITON_INTERPRET=1, for testing)"
    return _module_missing("triton")


def _triton_contender(device: torch.device, module: str) -> Optional[str]:
    """Third-party Triton contenders: CUDA, or the CPU under ``TRITON_INTERPRET=1``."""
    return _triton_reason(device) or _module_missing(module)


def _cuda_ext_reason(device: torch.device) -> Optional[str]:
    """Why pygpo's ``cuda`` backend cannot run on ``device`` (``None`` if it can)."""
    if device.type != "cuda":
        return "the cuda backend (pygpo._C) runs on CUDA devices only"
    return _module_missing("pygpo._C")


def _torch_lce_reason(chunked: bool) -> Optional[str]:
    if not hasattr(F, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (added in 2.13)"
    if chunked and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions"
    return None


def _catalogue(device: torch.device) -> list[tuple[str, LogProbFn, Callable[[], Optional[str]], str]]:
    """``(name, function, why it cannot run on device (None if it can), notes for the JSON)``."""
    return [
        ("naive", naive, lambda: None, "all rows through the matmul; N x V float32 logits materialised"),
        ("pygpo_torch", pygpo_torch, lambda: _module_missing("pygpo"), "backend='torch'"),
        ("pygpo_triton", pygpo_triton, lambda: _triton_reason(device) or _module_missing("pygpo"),
         "backend='triton' (deterministic backward: dRaw chunks + matmuls)"),
        ("pygpo_triton_atomic", pygpo_triton_atomic, lambda: _triton_reason(device) or _module_missing("pygpo"),
         "backend='triton', deterministic=False (fused backward with fp32 atomics)"),
        ("pygpo_cuda", pygpo_cuda, lambda: _cuda_ext_reason(device),
         "backend='cuda': torch.mm tiles (cuBLAS) + pygpo._C epilogue kernels"),
        ("pygpo_cuda_kept", pygpo_cuda_kept, lambda: _cuda_ext_reason(device),
         f"backend='cuda', memory_budget={KEPT_BUDGET}: the valid rows' logits kept for the backward when they "
         "fit (one matmul fewer)"),
        ("torch_lce", torch_lce, lambda: _torch_lce_reason(False),
         "F.linear_cross_entropy(reduction='none', options=None): all rows, logits materialised"),
        ("torch_lce_chunked", torch_lce_chunked, lambda: _torch_lce_reason(True),
         "F.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()): all rows, "
         "batch-chunked; reduction='none' is supported and its backward recomputes the chunks, so per-token "
         "upstream gradients are exact; default 'auto' policy (fp32 on CPU falls back to 'compact', "
         "chunks from 'aspect_ratio:2')"),
        ("trl_chunked", trl_chunked, lambda: _module_missing("trl.kernels"),
         f"valid rows compacted (hidden[mask]) before the call and scattered back; chunk_size={TRL_CHUNK_SIZE}, "
         "outputs=()"),
        ("liger_flce", liger_flce, lambda: _triton_contender(device, "liger_kernel.transformers.functional"),
         "reduction='none', all rows passed (ignore_index handled by the kernel)"),
        ("cce", cce, lambda: _triton_contender(device, "cut_cross_entropy"),
         "reduction='none', default filter_eps, all rows passed (ignore_index handled by the kernel)"),
    ]


CONTENDER_NAMES = tuple(name for name, *_ in _catalogue(torch.device("cpu")))


def available_contenders(
    device: torch.device, only: Optional[list[str]] = None
) -> tuple[list[Contender], dict[str, str]]:
    """Contenders that can run on ``device`` and ``{name: reason}`` for those that cannot.

    ``only`` restricts the run to the named contenders (``naive`` is always included, as the
    correctness reference).
    """
    if only is not None:
        unknown = sorted(set(only) - set(CONTENDER_NAMES))
        if unknown:
            raise ValueError(f"unknown contenders {unknown}; choose from {list(CONTENDER_NAMES)}")
    ready, skipped = [], {}
    for name, fn, why_not, notes in _catalogue(device):
        if only is not None and name != "naive" and name not in only:
            continue
        reason = why_not()
        if reason is None:
            ready.append(Contender(name, fn, notes))
        else:
            skipped[name] = reason
    return ready, skipped


def get_contender(name: str, device: torch.device) -> Contender:
    """One contender by name (raises ``RuntimeError`` with the reason if it cannot run here)."""
    ready, skipped = available_contenders(device, only=[name])
    for c in ready:
        if c.name == name:
            return c
    raise RuntimeError(f"contender {name!r} unavailable: {skipped.get(name)}")


# ----------------------------------------------------------------------------- loss heads
#
# The DPO head on token-level inputs: per-token policy / reference log-probs of B pairs (T tokens,
# response index sorted) -> per-response scores -> mean loss, forward + backward w.r.t. the log-probs.
# ``python -m bench.contenders --loss-heads --device cuda --out DIR`` times it at B=8 and B=512.

LossHeadFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]
LOSS_HEAD_BETA = 0.1


def head_torch_expression(lp: Tensor, rp: Tensor, index: Tensor, pairs: int) -> Tensor:
    """index_add per-response sums then ``softplus(-beta h).mean()`` inline (the floor of eager torch)."""
    u = lp.new_zeros(2 * pairs).index_add(0, index, lp - rp).view(pairs, 2)
    return F.softplus(-LOSS_HEAD_BETA * (u[:, 0] - u[:, 1])).mean()


def head_preference_loss(lp: Tensor, rp: Tensor, index: Tensor, pairs: int) -> Tensor:
    """index_add per-response sums then ``pygpo.preference_loss("dpo")`` (checks and TRL metrics)."""
    import pygpo

    p = lp.new_zeros(2 * pairs).index_add(0, index, lp).view(pairs, 2)
    r = rp.new_zeros(2 * pairs).index_add(0, index, rp).view(pairs, 2)
    return pygpo.preference_loss("dpo", p, r, beta=LOSS_HEAD_BETA).loss


def _fused_head(backend: str) -> LossHeadFn:
    def fn(lp: Tensor, rp: Tensor, index: Tensor, pairs: int) -> Tensor:
        from pygpo.ops.loss_head import fused_pairwise_loss_head

        return fused_pairwise_loss_head(lp, index, pairs, ref_logps=rp, beta=LOSS_HEAD_BETA, backend=backend,
                                        check_index=False).loss

    fn.__doc__ = f"pygpo.ops.loss_head.fused_pairwise_loss_head(backend={backend!r}, check_index=False)"
    return fn


def loss_head_contenders(device: torch.device) -> tuple[dict[str, LossHeadFn], dict[str, str]]:
    """``{name: fn}`` that can run on ``device`` and ``{name: reason}`` for those that cannot."""
    ready = {"torch_expression": head_torch_expression, "preference_loss": head_preference_loss,
             "pygpo_head_torch": _fused_head("torch")}
    skipped = {}
    reason = _cuda_ext_reason(device)
    if reason is None:
        ready["pygpo_head_cuda"] = _fused_head("cuda")
    else:
        skipped["pygpo_head_cuda"] = reason
    return ready, skipped


def _head_inputs(pairs: int, tokens_per_response: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(pairs)
    index = torch.arange(2 * pairs).repeat_interleave(tokens_per_response).to(device)
    lp = (-torch.rand(index.numel(), generator=g) * 3).to(device).requires_grad_(True)
    rp = (-torch.rand(index.numel(), generator=g) * 3).to(device)
    return lp, rp, index


def time_loss_heads(device: torch.device, batch_sizes: list[int], *, tokens_per_response: int = 256,
                    inner: int = 50, repeats: int = 15) -> dict:
    """Median over ``repeats`` rounds of the mean fwd+bwd time of ``inner`` calls, per contender and B
    (contenders take turns within a round; the device is synchronised around each round)."""
    import statistics
    import time

    from .measure import synchronize

    fns, skipped = loss_head_contenders(device)
    results: dict[str, dict[str, dict[str, float]]] = {name: {} for name in fns}
    for pairs in batch_sizes:
        lp, rp, index = _head_inputs(pairs, tokens_per_response, device)
        reference = None
        for name, fn in fns.items():  # warm-up, and every contender must give the same loss and gradient
            for _ in range(3):
                loss = fn(lp, rp, index, pairs)
                (grad,) = torch.autograd.grad(loss, lp)
            reference = (loss, grad) if reference is None else reference
            if not torch.allclose(loss, reference[0], rtol=1e-5, atol=1e-6):
                raise RuntimeError(f"loss head {name} disagrees: {float(loss)} vs {float(reference[0])}")
            if not torch.allclose(grad, reference[1], rtol=1e-4, atol=1e-7):
                err = float((grad - reference[1]).abs().max())
                raise RuntimeError(f"loss head {name}: gradient disagrees (max abs difference {err:.3g})")
        rounds: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    torch.autograd.grad(fn(lp, rp, index, pairs), lp)
                synchronize(device)
                rounds[name].append((time.perf_counter() - t0) / inner * 1e6)
        for name, r in rounds.items():
            results[name][str(pairs)] = {"median_us": statistics.median(r), "min_us": min(r), "max_us": max(r)}
    return {"results": results, "skipped": skipped,
            "settings": {"device": device.type, "batch_sizes": batch_sizes, "tokens_per_response": tokens_per_response,
                         "inner": inner, "repeats": repeats, "beta": LOSS_HEAD_BETA, "dtype": "float32",
                         "timing": "fwd+bwd w.r.t. per-token policy log-probs; median of per-round mean wall time"}}


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    import json

    from .machine import git_revision, machine_info, versions

    parser = argparse.ArgumentParser(prog="python -m bench.contenders", description="loss-head benchmark")
    parser.add_argument("--loss-heads", action="store_true", required=True, help="time the DPO loss heads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 512])
    parser.add_argument("--tokens", type=int, default=256, help="tokens per response")
    parser.add_argument("--inner", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", required=True, help="folder for loss_head_<device>.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = time_loss_heads(device, args.batch_sizes, tokens_per_response=args.tokens, inner=args.inner,
                             repeats=args.repeats)
    report.update(machine=machine_info(device), versions=versions(), git=git_revision())
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"loss_head_{device.type}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
    for name, by_b in report["results"].items():
        print(f"{name:20s} " + " ".join(f"B={b}: {v['median_us']:9.1f}us" for b, v in by_b.items()))
    for name, reason in report["skipped"].items():
        print(f"{name:20s} skipped: {reason}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
