"""Triton kernels of pygpo, installed as ``pygpo.kernels`` (the source folder is ``kernels/``).

Importing this package imports Triton; nothing else in pygpo imports it eagerly. Whether the kernels
run compiled on a GPU or in Triton's CPU interpreter is fixed when this package is first imported,
by ``TRITON_INTERPRET`` (see :mod:`.utils`).

* :mod:`.linear_logprob_fwd`: fused ``hidden @ W.T`` -> log-prob of the label, lse, entropy,
  log sum p^2, mean logit, without materialising the logits.
* :mod:`.linear_logprob_bwd`: its backward, recomputing logit tiles; fused (atomics) or
  deterministic (dRaw chunks + matmuls).
"""

from .linear_logprob_bwd import linear_logprob_bwd
from .linear_logprob_fwd import ForwardStats, linear_logprob_fwd
from .utils import INTERPRET

__all__ = ["ForwardStats", "INTERPRET", "linear_logprob_bwd", "linear_logprob_fwd"]
