"""Version checks of the libraries pygpo runs on (read from version strings, never by importing more)."""

from __future__ import annotations

import re

import torch

#: FSDP2's all-gather records events on the CPU stream, which ``torch.cpu.Stream`` offers from torch 2.7
#: (pytorch#145935): below it FSDP2 fails inside torch on CPU.
FSDP2_ON_CPU_MIN_TORCH = (2, 7)


def major_minor(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"2.6.0+cu124"`` or ``"3.2"``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a version string: {version!r}")
    return int(found[1]), int(found[2])


def fsdp2_on_cpu_problem() -> str | None:
    """Why FSDP2 cannot shard a model on CPU with this torch, or ``None``."""
    if major_minor(torch.__version__) < FSDP2_ON_CPU_MIN_TORCH:
        want = ".".join(map(str, FSDP2_ON_CPU_MIN_TORCH))
        return f"FSDP2 on CPU needs torch >= {want}, this is torch {torch.__version__}"
    return None
