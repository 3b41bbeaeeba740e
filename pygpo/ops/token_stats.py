"""The per-token statistics every backend computes, and the math they share.

A backend receives the *valid* rows only (ignored rows were compacted away by the caller) and returns,
for each row ``i`` with hidden state ``h_i`` and label ``y_i``:

    raw_v  = h_i . W_v + b_v                                  (v = 0 .. V-1)
    c_v    = softcap * tanh(raw_v / softcap)   if softcap else raw_v
    z_v    = c_v / temperature
    lse    = log sum_v exp(z_v)
    logprob    = z_y - lse
    entropy    = lse - sum_v p_v z_v                          (p = softmax(z))
    log_sum_p2 = log sum_v p_v^2 = log sum_v exp(2 z_v) - 2 lse
    mean_logit = (1 / V) sum_v z_v                            (label smoothing needs it)
    is_top1    = 1.0 if z_y = max_v z_v else 0.0              (a metric: TRL's token accuracy)

The softcap is applied before the temperature, as a model's ``final_logit_softcapping`` comes before
sampling temperature.

Gradients. With upstream gradients ``g_lp, g_lse, g_ent, g_l2, g_mz`` (one scalar per row, any may be
absent), the gradient with respect to ``z`` is

    dz_v = g_lp (1[v = y] - p_v) + g_lse p_v - g_ent p_v (z_v - lse + entropy)
           + 2 g_l2 (p_v^2 / S2 - p_v) + g_mz / V,            S2 = sum_v p_v^2

and ``draw_v = dz_v / temperature * (1 - tanh^2(raw_v / softcap))`` (the last factor only with a softcap).
Then ``dH = dRaw @ W``, ``dW = dRaw^T @ H`` and ``db = sum_rows dRaw``.

Online form used by every backend. Over vocabulary tiles a row keeps a running max ``m`` and

    s  = sum exp(z - m),  t = sum exp(z - m) z,  s2 = sum exp(2 (z - m)),  sz = sum z,

rescaling ``s, t`` by ``exp(m_old - m_new)`` and ``s2`` by its square when the max grows. At the end
``lse = m + log s``, ``entropy = lse - t / s``, ``log_sum_p2 = log s2 - 2 log s``, ``mean_logit = sz / V``.

Masked vocabulary. Logits of ``-inf`` (a vocabulary masked through a ``-inf`` bias) have ``p_v = 0``
exactly; with the convention ``0 log 0 = 0`` they add nothing to the entropy, to ``t`` or to any
gradient but the mean logit's (``mean_logit`` itself is ``-inf``). Every backend keeps the running max
finite (a tile of only ``-inf`` logits leaves it at the lowest finite float) and floors ``z - m`` and
``log p`` at :data:`LOG_FLOOR` where they multiply a weight ``p``: ``exp(LOG_FLOOR)`` is exactly 0 in
float32 and float64, so the floor changes no value and only turns ``0 * (-inf)`` (nan) into 0.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

#: Floor of ``z - max`` and ``log p`` in the terms ``p log p``: far below where ``exp`` underflows to exactly
#: 0 (about -104 in float32, -745 in float64), so any ``log p < LOG_FLOOR`` has ``p == 0`` exactly.
LOG_FLOOR = -1.0e4

#: Names of the statistics, in the order backends return them.
STAT_NAMES = ("logprobs", "lse", "entropy", "log_sum_p2", "mean_logit", "is_top1")


class TokenStats(NamedTuple):
    """Per-row statistics, each ``(M,)`` float32 (float64 from the torch backend for float64 inputs) or
    ``None`` when not requested.

    ``logprobs`` and ``lse`` are always present; all present fields are differentiable except
    ``is_top1`` (1.0 where the label's logit is the row's largest, ties included; a metric).
    """

    logprobs: Tensor
    lse: Tensor
    entropy: Optional[Tensor]
    log_sum_p2: Optional[Tensor]
    mean_logit: Optional[Tensor]
    is_top1: Optional[Tensor] = None


class StatRequest(NamedTuple):
    """Which optional statistics to compute, and how logits are transformed."""

    entropy: bool = False
    log_sum_p2: bool = False
    mean_logit: bool = False
    temperature: float = 1.0
    softcap: Optional[float] = None
    #: the ``is_top1`` metric
    top1: bool = False
