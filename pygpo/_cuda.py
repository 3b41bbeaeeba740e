"""Loader of the compiled extension ``pygpo._C`` and the conventions for calling it.

``pygpo._C`` (built from ``csrc/`` by ``setup.py`` when a CUDA toolkit is present) takes raw addresses,
sizes, dtype codes and a CUDA stream handle, never torch tensors, so it does not depend on torch's C++
ABI. This module turns tensors into those arguments. It imports nothing from the rest of pygpo; the
dispatcher (:mod:`pygpo.ops.dispatch`) turns a missing extension into ``BackendUnavailableError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

_module: Optional[ModuleType] = None
_error: Optional[str] = None
#: ``device index -> None`` (the kernels run there) or why they cannot, from :func:`arch_problem`.
_ARCH_CHECKED: dict[int, Optional[str]] = {}

#: ``torch.dtype -> dtype code`` understood by ``pygpo._C`` (``csrc/common.cuh``, ``enum DType``).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

BUILD_HINT = (
    "pygpo._C is built by setup.py when a CUDA toolkit (nvcc) is found: reinstall from source with one, e.g. "
    "`PYGPO_BUILD_CUDA=1 pip install -e .` (pip fetches pybind11 and ninja; offline, with both installed, add "
    "--no-build-isolation), or install a pygpo platform wheel built with the extension"
)


def load() -> Optional[ModuleType]:
    """``pygpo._C``, or ``None`` if it is not installed (the reason is in :func:`import_error`)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("pygpo._C")
        except ImportError as exc:
            _error = f"{type(exc).__name__}: {exc}"
    return _module


def available() -> bool:
    """Whether ``pygpo._C`` can be imported."""
    return load() is not None


def import_error() -> Optional[str]:
    """Why ``pygpo._C`` could not be imported (``None`` if it was, or was not tried)."""
    load()
    return _error


def require() -> ModuleType:
    """``pygpo._C``; raises ``ImportError`` with the build instructions when it is absent."""
    module = load()
    if module is None:
        raise ImportError(f"pygpo._C is not installed ({_error}). {BUILD_HINT}")
    return module


def dtype_code(t: Tensor, allowed: tuple[torch.dtype, ...], name: str) -> int:
    """The dtype code of ``t``; ``TypeError`` naming ``name`` when its dtype is not in ``allowed``."""
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed]}, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def ptr(t: Optional[Tensor]) -> int:
    """Address of ``t``'s first element, 0 for ``None``."""
    return 0 if t is None else t.data_ptr()


def launch_context(t: Tensor) -> tuple[int, int]:
    """``(device index, stream handle)`` torch uses for ``t``'s CUDA device."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def built_archs() -> tuple[int, ...]:
    """SM versions ``pygpo._C`` holds machine code for, in build order (``setup.py``'s ``PYGPO_CUDA_ARCHS``,
    e.g. ``(80, 86, 89, 90)``; the last one's PTX is embedded too); empty when the build did not say."""
    text = str(getattr(require(), "CUDA_ARCHS", ""))
    parts = [p.strip() for p in text.replace(",", ";").split(";")]
    return tuple(int(p) for p in parts if p.isdigit())


def arch_problem(capability: tuple[int, int], archs: Sequence[int]) -> Optional[str]:
    """``None`` when a GPU of compute ``capability`` (major, minor) runs kernels built for ``archs``, else why not.

    Machine code for ``sm_XY`` runs on ``X.Z`` with ``Z >= Y`` (same major); the PTX of the last arch is
    compiled by the driver for any GPU at least that new. Unknown ``archs`` (empty) are not refused.
    """
    if not archs:
        return None
    major, minor = capability
    cc = 10 * major + minor
    if any(a // 10 == major and a % 10 <= minor for a in archs) or cc >= archs[-1]:
        return None
    listed = ", ".join(f"sm_{a}" for a in archs)
    return (f"pygpo._C holds kernels for {listed} (and PTX for compute_{archs[-1]}), none of which runs on a GPU "
            f"of compute capability {major}.{minor} (sm_{cc}): rebuild it for this GPU with "
            f"PYGPO_CUDA_ARCHS={cc} PYGPO_BUILD_CUDA=1 pip install -e ., or use "
            f"backend='triton' or 'torch'")


def device_problem(device: torch.device) -> Optional[str]:
    """Why ``pygpo._C`` cannot launch on ``device`` (``None`` when it can; CPU tensors run the host twins)."""
    if not available():
        return f"pygpo._C is not installed ({_error}). {BUILD_HINT}"
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"there is no CUDA device for {device} (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_CHECKED:
        _ARCH_CHECKED[index] = arch_problem(torch.cuda.get_device_capability(index), built_archs())
    return _ARCH_CHECKED[index]


def supports(device: torch.device) -> bool:
    """Whether ``pygpo._C`` runs on ``device`` (installed, and built for the GPU's architecture)."""
    return device_problem(device) is None


def check_device(device: torch.device) -> None:
    """``RuntimeError`` with the reason and the fix when ``pygpo._C`` cannot run on ``device``."""
    problem = device_problem(device)
    if problem is not None:
        raise RuntimeError(problem)


def launch(kind: str, like: Tensor, *structs: Any) -> None:
    """Kernel ``kind`` of ``pygpo._C`` (``epilogue_fwd``, ``head_bwd``...) with ``structs`` on ``like``'s CUDA
    device and torch's current stream there, after checking that the build runs on that GPU."""
    check_device(like.device)
    device, stream = launch_context(like)
    getattr(require(), kind)(device, stream, *structs)


def make(cls_name: str, **fields: Any) -> Any:
    """An argument struct of ``pygpo._C`` (``EpilogueArgs``, ``FoldArgs``...) with ``fields`` set."""
    obj = getattr(require(), cls_name)()
    for key, value in fields.items():
        setattr(obj, key, value)
    return obj
