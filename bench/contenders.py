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
    """pygpo's fused Triton backend (compacts the valid rows itself)."""
    import pygpo

    return pygpo.fused_linear_logprobs(hidden, weight, labels, ignore_index=ignore_index, backend="triton")


def pygpo_triton_det(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """pygpo's Triton backend with the deterministic backward (dRaw chunks + matmuls, no atomics)."""
    import pygpo

    return pygpo.fused_linear_logprobs(
        hidden, weight, labels, ignore_index=ignore_index, backend="triton", deterministic=True
    )


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
         "backend='triton'"),
        ("pygpo_triton_det", pygpo_triton_det, lambda: _triton_reason(device) or _module_missing("pygpo"),
         "backend='triton', deterministic=True"),
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
