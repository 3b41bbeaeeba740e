"""Backend selection: ``backend="auto"|"torch"|"triton"`` and the ``PYGPO_BACKEND`` override.

``auto`` picks the Triton backend for CUDA tensors when triton is installed, and the torch backend
otherwise. ``PYGPO_BACKEND`` replaces ``auto`` (an explicit ``backend=`` argument wins over it).
Triton on CPU tensors runs only under ``TRITON_INTERPRET=1`` (how the tests exercise the kernels).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says what to install or change."""


def triton_available() -> bool:
    """Whether triton can be imported, without importing it (importing triton costs about a second)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name (``torch`` or ``triton``) for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("PYGPO_BACKEND", "").strip().lower()
        if env and env not in BACKENDS:
            raise ValueError(f"PYGPO_BACKEND must be one of {BACKENDS}, got {env!r}")
        backend = env or "auto"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise BackendUnavailableError(
                "backend='triton' needs the triton package: pip install 'triton>=3.2' (or pip install 'pygpo[triton]')"
            )
        if device.type != "cuda" and not _interpreting():
            raise BackendUnavailableError(
                f"backend='triton' runs on CUDA tensors; got tensors on {device}. Move them to a GPU, use "
                "backend='torch', or set TRITON_INTERPRET=1 (slow, for testing) before importing triton"
            )
    return backend


def load_backend(name: str) -> ModuleType:
    """The module implementing ``compute_token_stats`` for backend ``name``."""
    if name == "torch":
        from .backends import torch_chunked

        return torch_chunked
    if name == "triton":
        from .backends import triton_fused

        return triton_fused
    raise ValueError(f"unknown backend {name!r}")
