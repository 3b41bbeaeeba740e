"""Backend selection: ``backend="auto"|"torch"|"triton"|"cuda"`` and the ``PYGPO_BACKEND`` override.

``auto`` picks the Triton backend for CUDA tensors when triton is installed, and the torch backend
otherwise; it picks the compiled ``cuda`` backend (``pygpo._C``) only for the ops that :data:`PREFER_CUDA`
names, those where the GPU benchmark measured it faster. ``PYGPO_BACKEND`` replaces ``auto`` (an explicit
``backend=`` argument wins over it) for the ops that have that backend (:data:`OP_BACKENDS`). Triton on CPU tensors runs only under ``TRITON_INTERPRET=1`` (how
the tests exercise the kernels); ``cuda`` runs on CUDA tensors only.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from types import ModuleType
from typing import Optional

import torch

from ..versions import major_minor

BACKENDS = ("auto", "torch", "triton", "cuda")

#: The ops for which ``auto`` chooses the compiled ``cuda`` backend on CUDA tensors (when ``pygpo._C``
#: is installed): only those where ``bench/gpu_check.sh`` measured ``cuda`` faster than the alternative.
#: H100 80GB, 2026-11-27 (``bench/results/*_nvidia-h100-80gb-hbm3_2026-11-27_1f49527*``):
#:
#: - ``loss_head``: 0.42 ms vs 0.80 ms for the torch implementation at B=8, 0.37 vs 0.71 ms at B=512.
#: - ``token_stats`` (``fused_linear_logprobs`` fwd+bwd, N=8192 D=4096 V=128256 bf16): a tie at 50%
#:   ignored rows (31.7 ms each; Triton peaks at 2068 MiB, cuda at 3624 MiB) and cuda 7% faster with
#:   none ignored (65.7 vs 70.9 ms). DPO batches ignore their prompt rows, so Triton stays.
PREFER_CUDA: frozenset[str] = frozenset({"loss_head"})


#: The backends each op has (``loss_head``'s ``triton`` runs its torch implementation).
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "token_stats": ("torch", "triton", "cuda"),
    "policy_ref": ("torch", "triton"),
    "prefix_attention": ("torch", "triton"),
    "loss_head": ("torch", "triton", "cuda"),
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what to install or change."""


#: Oldest triton the kernels support: triton 3.1 (which torch 2.5 pins) fails inside its interpreter
#: and its compiler on them.
MIN_TRITON = (3, 2)


@functools.lru_cache(maxsize=None)
def triton_version() -> Optional[tuple[int, int]]:
    """``(major, minor)`` of the installed triton, read from its metadata without importing it; ``None``
    when triton is absent or its distribution name is not a known one (then it is not refused). Read once
    per process: the lookup costs a fraction of a millisecond, and every dispatch (each attention layer's)
    asks."""
    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu"):
        try:
            return major_minor(importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            continue
        except ValueError:  # a version string without major.minor: not refused
            return None
    return None


def triton_problem() -> Optional[str]:
    """Why the triton backend cannot run here (no triton, or one older than :data:`MIN_TRITON`), or ``None``."""
    try:
        missing = importlib.util.find_spec("triton") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        return "needs the triton package: pip install 'triton>=3.2' (or pip install 'pygpo[triton]')"
    version = triton_version()
    if version is not None and version < MIN_TRITON:
        return (f"needs triton >= {MIN_TRITON[0]}.{MIN_TRITON[1]}, found triton {version[0]}.{version[1]} "
                "(torch 2.5 brings triton 3.1, torch >= 2.6 brings triton >= 3.2)")
    return None


def triton_available() -> bool:
    """Whether a supported triton can be imported, without importing it (importing triton costs about a second)."""
    return triton_problem() is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda_extension_runs_on(device: torch.device) -> bool:
    """Whether ``pygpo._C`` is installed and built for ``device``'s GPU architecture."""
    from .. import _cuda

    return _cuda.supports(device)


def _check_cuda_backend(device: torch.device, source: str) -> None:
    from .. import _cuda

    if not _cuda.available():
        raise BackendUnavailableError(
            f"{source}='cuda' needs the compiled extension pygpo._C, which this install lacks "
            f"({_cuda.import_error()}). {_cuda.BUILD_HINT}"
        )
    if device.type != "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"{source}='cuda' runs on a GPU, but there is no CUDA device (torch.cuda.is_available() is False; "
                f"tensors are on {device}); use backend='torch' here"
            )
        raise BackendUnavailableError(
            f"{source}='cuda' runs on CUDA tensors; got tensors on {device}. Move them to a GPU or use backend='torch'"
        )
    problem = _cuda.device_problem(device)  # e.g. a GPU architecture the build has no code for
    if problem:
        raise BackendUnavailableError(problem)


def resolve_backend(backend: str, device: torch.device, *, op: str = "token_stats") -> str:
    """The concrete backend name (``torch``, ``triton`` or ``cuda``) for ``op`` on tensors on ``device``.

    An explicit ``backend`` that ``op`` lacks is an error; ``PYGPO_BACKEND`` naming a backend that ``op``
    lacks (``cuda`` for prefix attention) leaves that op to ``auto``, so one override serves a whole run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if op not in OP_BACKENDS:
        raise ValueError(f"unknown op {op!r}")
    source = "backend"
    if backend == "auto":
        env = os.environ.get("PYGPO_BACKEND", "").strip().lower()
        if env and env not in BACKENDS:
            raise ValueError(f"PYGPO_BACKEND must be one of {BACKENDS}, got {env!r}")
        if env in OP_BACKENDS[op]:
            backend, source = env, "PYGPO_BACKEND"
    if backend == "auto":
        if device.type == "cuda" and op in PREFER_CUDA and cuda_extension_runs_on(device):
            return "cuda"
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend not in OP_BACKENDS[op]:
        raise BackendUnavailableError(f"backend={backend!r} does not implement {op}; use one of "
                                      f"{', '.join(repr(b) for b in ('auto',) + OP_BACKENDS[op])}")
    if backend == "cuda":
        _check_cuda_backend(device, source)
    if backend == "triton":
        problem = triton_problem()
        if problem:
            raise BackendUnavailableError(f"{source}='triton' {problem}; or use backend='torch'")
        if device.type != "cuda" and not _interpreting():
            raise BackendUnavailableError(
                f"{source}='triton' runs on CUDA tensors; got tensors on {device}. Move them to a GPU, use "
                f"{'PYGPO_BACKEND=torch' if source == 'PYGPO_BACKEND' else 'backend=' + repr('torch')}, or set "
                "TRITON_INTERPRET=1 (slow, for testing) before importing triton"
            )
    return backend


#: ``(op, backend) -> module`` under ``pygpo.ops.backends``. ``token_stats`` modules implement
#: ``compute_token_stats`` (see :mod:`pygpo.ops.token_stats`); ``policy_ref`` modules implement
#: ``compute_policy_ref`` (see :mod:`pygpo.ops.policy_ref_stats`).
_BACKEND_MODULES = {
    ("token_stats", "torch"): "torch_chunked",
    ("token_stats", "triton"): "triton_fused",
    ("token_stats", "cuda"): "cuda_logprobs",
    ("policy_ref", "torch"): "torch_policy_ref",
    ("policy_ref", "triton"): "triton_policy_ref",
}


def load_backend(name: str, op: str = "token_stats") -> ModuleType:
    """The module implementing ``op`` for backend ``name``, imported on first use (triton is heavy)."""
    if op not in {o for o, _ in _BACKEND_MODULES}:
        raise ValueError(f"unknown op {op!r}")
    module = _BACKEND_MODULES.get((op, name))
    if module is None and name in BACKENDS and name != "auto":
        raise BackendUnavailableError(f"backend {name!r} does not implement {op}; use backend='torch' or 'triton'")
    if module is None:
        raise ValueError(f"unknown backend {name!r}")
    return importlib.import_module(f"{__package__}.backends.{module}")
