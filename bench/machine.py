"""What machine and software a benchmark ran on: device name, cores, memory, versions, git revision."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from typing import Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What :func:`source_digest` hashes: the code a benchmark measures, wherever the files came from.
SOURCE_DIRS = ("pygpo", "kernels", "csrc", "bench")
SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h", ".sh")
SOURCE_FILES = ("setup.py", "pyproject.toml")
PACKAGES = ("torch", "triton", "trl", "transformers", "liger-kernel", "cut-cross-entropy", "pygpo", "numpy")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(device: torch.device) -> str:
    """GPU name for a CUDA device, CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _mem_total_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def versions() -> dict[str, Optional[str]]:
    """Python and package versions (``None`` for packages not installed); nothing is imported."""
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch_cuda"] = torch.version.cuda
    return out


def source_digest(root: str = REPO_ROOT) -> str:
    """sha256 (16 hex digits) of the source a benchmark runs: paths and contents of the files under
    ``SOURCE_DIRS`` with a ``SOURCE_SUFFIXES`` suffix, plus ``SOURCE_FILES``, in sorted order.

    Unlike the revision it needs no ``.git`` and sees uncommitted edits, so a result from a dirty tree
    or a copied checkout (the device machine's) can still be matched to the exact code.
    """
    paths = [os.path.join(root, f) for f in SOURCE_FILES if os.path.isfile(os.path.join(root, f))]
    for top in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and d != "results"]
            paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(SOURCE_SUFFIXES)]
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as fh:
            digest.update(hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()[:16]


def git_revision() -> dict[str, object]:
    """Short revision, dirty flag, untracked-file count and :func:`source_digest` of the checkout.

    ``PYGPO_GIT_REV`` overrides the revision (the device machine gets the files without ``.git``).
    """

    def git(*args: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    rev = os.environ.get("PYGPO_GIT_REV") or git("rev-parse", "--short", "HEAD")
    if rev is None:
        rev = "nocommit" if git("rev-parse", "--git-dir") is not None else "unknown"
    tracked = git("status", "--porcelain", "--untracked-files=no")
    untracked = git("ls-files", "--others", "--exclude-standard")
    return {
        "rev": rev,
        "dirty": None if tracked is None else bool(tracked),  # tracked files modified
        "untracked_files": None if untracked is None else len(untracked.splitlines()),
        "source_sha256": source_digest(),
    }


def machine_info(device: torch.device) -> dict[str, object]:
    """Everything about the machine worth keeping beside a timing."""
    info: dict[str, object] = {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": _mem_total_bytes(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_memory_bytes=props.total_memory,
            gpu_multiprocessors=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
        )
    return info
