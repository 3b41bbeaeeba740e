"""Small shared pieces of the Triton kernels: interpreter detection and launch configurations.

Nothing here imports ``pygpo``: ``kernels/`` sits below every other layer of the package.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


#: Whether the kernels of this process run in Triton's CPU interpreter. ``triton.jit`` makes the same
#: decision when a kernel module is imported, so this is read once, at import time, as well: setting
#: ``TRITON_INTERPRET=1`` later has no effect on kernels already defined.
INTERPRET: bool = _env_flag("TRITON_INTERPRET")


def interpreter_config() -> list[triton.Config]:
    """One small fixed configuration: autotuning inside the interpreter only burns CI time.

    ``BLOCK_D=32`` against ``D=48`` and ``BLOCK_V=64`` against ``V=1001`` keep every ragged edge of the
    test shapes exercised.
    """
    return [triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1)]


def gpu_configs() -> list[triton.Config]:
    """A handful of tiles for Ampere/Hopper; ``BLOCK_D=64`` keeps a bf16 operand tile at 16 KiB."""
    cfg = []
    for bn, bv, warps, stages in (
        (128, 128, 8, 3),
        (128, 128, 4, 4),
        (64, 128, 4, 4),
        (128, 64, 4, 4),
        (64, 64, 4, 3),
    ):
        cfg.append(triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": 64}, num_warps=warps, num_stages=stages))
    return cfg


#: The configurations every kernel of this package is autotuned over (one when interpreting).
CONFIGS: list[triton.Config] = interpreter_config() if INTERPRET else gpu_configs()


def _benchmark(kernel_call, quantiles):
    """The active driver's benchmarker, looked up when the autotuner first times a config."""
    from triton.runtime.driver import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotune(*, key: list[str], reset_to_zero: Optional[list[str]] = None):
    """``triton.autotune`` over :data:`CONFIGS`, usable with every triton from 3.2.

    Triton 3.2's ``Autotuner`` asks for the active GPU driver when it is created, so a module that
    defines an autotuned kernel fails to import without a GPU (in the interpreter, or to compile ahead of
    time for a named target), and its ``triton.autotune`` drops ``do_bench=``; the ``Autotuner`` is built
    here with a benchmarker looked up at the first timing instead. In the interpreter there is one config:
    ``triton.heuristics`` fixes its meta-parameters (triton 3.2's interpreter rejects the launch options
    that an ``Autotuner`` adds, and one config is never timed, so ``reset_to_zero`` never applies).
    """
    if INTERPRET:
        (config,) = CONFIGS
        return triton.heuristics({name: (lambda args, v=value: v) for name, value in config.kwargs.items()})
    from triton.runtime.autotuner import Autotuner

    def wrap(fn):
        return Autotuner(fn, fn.arg_names, CONFIGS, key, reset_to_zero, None, do_bench=_benchmark)

    return wrap


#: Largest ``BLOCK_V`` among ``CONFIGS``: vocabulary splits are multiples of it, so every program's
#: vocabulary range is a whole number of tiles whatever configuration the autotuner picks.
VOCAB_ALIGN: int = max(c.kwargs["BLOCK_V"] for c in CONFIGS)

#: Smallest ``BLOCK_N`` among ``CONFIGS``: buffers with one row per row block are sized with it.
MIN_BLOCK_N: int = min(c.kwargs["BLOCK_N"] for c in CONFIGS)


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether to feed ``tl.dot`` fp32 copies of the operands instead of ``dtype``.

    Triton 3.9's interpreter computes ``tl.dot`` on bf16 operands from their raw bit patterns (numpy
    has no bfloat16), which gives garbage; upcasting inside the kernel keeps the bf16 path testable
    on CPU. On a GPU the dots stay in bf16 on the tensor cores.
    """
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: full fp32 ("ieee") for fp32 inputs, matching torch's default
    ``torch.backends.cuda.matmul.allow_tf32 = False``; TF32 only when the user enabled it in torch.
    Operands in fp16/bf16 ignore it."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"



def logit_dot_options(dtype: torch.dtype) -> dict[str, object]:
    """The ``UPCAST`` and ``INPUT_PRECISION`` constexprs of the logit kernels' ``tl.dot`` for ``dtype``
    operands (:func:`upcast_dots`, :func:`dot_precision`)."""
    return dict(UPCAST=upcast_dots(dtype), INPUT_PRECISION=dot_precision(dtype))


def transform_args(softcap: Optional[float], temperature: float) -> tuple[float, float]:
    """The ``(softcap, inv_temp)`` arguments of the logit kernels' transform
    ``z = softcap * tanh(raw / softcap) / temperature``; without a softcap (compiled out by
    ``HAS_SOFTCAP=False``) 1.0 stands in."""
    return (float(softcap) if softcap is not None else 1.0), 1.0 / float(temperature)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant on CPU, to exercise split merging)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2
