"""Kernel tests run in Triton's CPU interpreter unless a CUDA device is present.

``triton.jit`` decides between compiling and interpreting when a kernel module is imported, so the
variable is set here, before any test module imports ``pygpo.kernels``. On a machine with CUDA the
kernels compile for the GPU and the same tests run on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
