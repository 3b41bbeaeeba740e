"""Triton kernels of pygpo, installed as ``pygpo.kernels`` (the source folder is ``kernels/``).

Importing this package imports Triton; nothing else in pygpo imports it eagerly. Whether the kernels
run compiled on a GPU or in Triton's CPU interpreter is fixed when this package is first imported,
by ``TRITON_INTERPRET`` (see :mod:`.utils`).

* :mod:`.linear_logprob_fwd`: fused ``hidden @ W.T`` -> log-prob of the label, lse, entropy,
  log sum p^2, mean logit, without materialising the logits.
* :mod:`.linear_logprob_bwd`: its backward, recomputing logit tiles; fused (atomics) or
  deterministic (dRaw chunks + matmuls).
"""

if __name__ == "pygpo.kernels":
    from .linear_logprob_bwd import linear_logprob_bwd  # noqa: F401
    from .linear_logprob_fwd import ForwardStats, linear_logprob_fwd  # noqa: F401
    from .utils import INTERPRET  # noqa: F401

    __all__ = ["ForwardStats", "INTERPRET", "linear_logprob_bwd", "linear_logprob_fwd"]
else:
    # This folder imported as the top-level package ``kernels``: a source checkout on ``sys.path`` (``python
    # -m pytest`` or ``python -c`` from its root) shadows the Hugging Face ``kernels`` package, which
    # transformers probes by importing it. Import nothing, so that the probe neither imports triton nor
    # fails without it (transformers then reads no version and ignores the package).
    __all__ = []
