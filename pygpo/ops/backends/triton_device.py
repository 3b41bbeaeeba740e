"""The triton backend's device check, shared by its entry points."""

from __future__ import annotations

from torch import Tensor

from pygpo.kernels import INTERPRET


def check_triton_device(hidden: Tensor) -> None:
    """Raise before any launch when ``hidden`` is on the CPU but the kernels were compiled for a GPU.

    CPU tensors run only in Triton's interpreter, which ``TRITON_INTERPRET=1`` selects when
    ``pygpo.kernels`` is first imported (``pygpo.kernels.INTERPRET``).
    """
    if hidden.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            "the triton backend got CPU tensors but its kernels were compiled for a GPU: set "
            "TRITON_INTERPRET=1 before pygpo.kernels is first imported, or use backend='torch'"
        )
