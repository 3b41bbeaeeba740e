"""Numerically stable scalar functions shared by the heads.

- ``ls(z) = -log sigmoid(z) = softplus(-z)``
- ``logsig(z) = log sigmoid(z) = -softplus(-z)``
- ``log1mexp(x) = log(1 - e^x)`` for ``x <= 0``, switching between ``log(-expm1(x))`` and
  ``log1p(-exp(x))`` at ``x = -log 2`` (Maechler, "Accurately computing log(1 - exp(-|a|))", 2012).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOG2 = math.log(2.0)


def ls(z: Tensor) -> Tensor:
    """``-log sigmoid(z)``."""
    return F.softplus(-z)


def logsig(z: Tensor) -> Tensor:
    """``log sigmoid(z)``."""
    return F.logsigmoid(z)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (``-inf`` at 0, NaN above)."""
    # Evaluate both branches on inputs where each is safe so that gradients stay finite.
    small = x < -LOG2
    x_small = torch.where(small, x, torch.full_like(x, -1.0))
    x_large = torch.where(small, torch.full_like(x, -0.5), x)
    return torch.where(small, torch.log1p(-torch.exp(x_small)), torch.log(-torch.expm1(x_large)))
