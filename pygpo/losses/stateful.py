"""Stateful losses: the state LOSSES.md keeps across steps, as ``torch.nn.Module`` buffers.

``state_dict()`` / ``load_state_dict()`` save and restore it with a checkpoint; ``.train()`` /
``.eval()`` switch updating on and off (state is updated only in training mode).

- :class:`BCOPairLoss`, :class:`BCOLoss`: ``delta`` = running mean of every ``beta * u`` seen in
  training, updated with the current batch before it is used.
- :class:`BetaDPOLoss`: EMA (decay 0.9) of the mean ``M0`` and std ``sM`` of the margins ``h``,
  updated with the current batch before use (as the beta-DPO authors' code), zero-initialised.
- :class:`GroupRobustLoss`: group weights ``a_g <- normalize(a_g exp(eta_a (L_g + C / sqrt(N_g))))``
  after each step, from the detached mean loss ``L_g`` and count ``N_g`` of each group in the batch
  (groups absent from the batch keep their weight before normalisation).

Distributed: with ``sync=True`` (default) and an initialised ``torch.distributed`` process group,
batch statistics (sums, sums of squares, counts) are all-reduced before the update, so every rank
holds the same state. Gradient accumulation: each call is a batch; call ``.eval()`` for micro-batches
that must not update the state, or accept one update per micro-batch.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .api import PreferenceLossOutput, preference_loss, validate
from .constraints import POSITIVE, Interval
from .errors import HyperParameterError
from .registry import attach_stateful


def _all_reduce_sum(t: Tensor, sync: bool) -> Tensor:
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _check(name: str, value: float, constraint: Any, owner: str) -> None:
    from .validation import convert_value

    convert_value(constraint, value, f"{owner}: hyper-parameter {name}")


class _RunningMean(nn.Module):
    """Running mean of scalars, as two float64 buffers (``mean``, ``count``)."""

    def __init__(self, *, beta: float, running_mean: bool, sync: bool, owner: str):
        super().__init__()
        _check("beta", beta, POSITIVE, owner)
        self.beta = float(beta)
        self.running_mean = bool(running_mean)
        self.sync = bool(sync)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def _update(self, rewards: Tensor) -> None:
        with torch.no_grad():
            stats = torch.stack([rewards.detach().double().sum(), torch.tensor(float(rewards.numel()), dtype=torch.float64, device=rewards.device)])
            stats = _all_reduce_sum(stats.to(self.mean.device), self.sync)
            total = self.count + stats[1]
            self.mean.copy_((self.mean * self.count + stats[0]) / total)
            self.count.copy_(total)

    def delta(self) -> Tensor:
        return self.mean.clone() if self.running_mean else torch.zeros((), dtype=torch.float64)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, running_mean={self.running_mean}, sync={self.sync}"


class BCOPairLoss(_RunningMean):
    """``bco_pair`` with ``delta`` = running mean of ``beta * u`` over chosen and rejected responses."""

    def __init__(self, *, beta: float = 0.1, running_mean: bool = True, sync: bool = True):
        super().__init__(beta=beta, running_mean=running_mean, sync=sync, owner="BCOPairLoss")

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, *, check_finite: bool = True) -> PreferenceLossOutput:
        validate("bco_pair", policy_logps, ref_logps, beta=self.beta, check_finite=check_finite)
        if self.training and self.running_mean:
            self._update(self.beta * (policy_logps.detach() - ref_logps.detach()))
        delta = self.delta().to(policy_logps.device)
        return preference_loss("bco_pair", policy_logps, ref_logps, beta=self.beta, delta=delta, check_finite=False)


class BCOLoss(_RunningMean):
    """Unpaired ``bco`` with ``delta`` = running mean of ``beta * u`` over all responses."""

    def __init__(self, *, beta: float = 0.1, running_mean: bool = True, sync: bool = True):
        super().__init__(beta=beta, running_mean=running_mean, sync=sync, owner="BCOLoss")

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, *, labels: Tensor, check_finite: bool = True) -> PreferenceLossOutput:
        validate("bco", policy_logps, ref_logps, beta=self.beta, labels=labels, check_finite=check_finite)
        if self.training and self.running_mean:
            self._update(self.beta * (policy_logps.detach() - ref_logps.detach()))
        delta = self.delta().to(policy_logps.device)
        return preference_loss("bco", policy_logps, ref_logps, beta=self.beta, labels=labels, delta=delta, check_finite=False)


class BetaDPOLoss(nn.Module):
    """``beta_dpo`` with the EMA statistics ``M0``, ``sM`` of the margins as buffers."""

    def __init__(
        self,
        *,
        beta: float = 0.1,
        rho: float = 0.2,
        a: float = 0.6,
        decay: float = 0.9,
        sync: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        _check("beta", beta, POSITIVE, "BetaDPOLoss")
        _check("rho", rho, Interval(0.0, 1.0, hi_closed=False), "BetaDPOLoss")
        _check("a", a, Interval(0.0, math.inf), "BetaDPOLoss")
        _check("decay", decay, Interval(0.0, 1.0, hi_closed=False), "BetaDPOLoss")
        self.beta, self.rho, self.a, self.decay, self.sync = float(beta), float(rho), float(a), float(decay), bool(sync)
        self.generator = generator
        self.register_buffer("m0", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sm", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _update(self, h: Tensor) -> None:
        with torch.no_grad():
            h = h.detach().double()
            n = float(h.numel())
            stats = torch.stack([h.sum(), (h * h).sum(), torch.tensor(n, dtype=torch.float64, device=h.device)])
            stats = _all_reduce_sum(stats.to(self.m0.device), self.sync)
            mean = stats[0] / stats[2]
            var = (stats[1] - stats[2] * mean * mean) / (stats[2] - 1) if float(stats[2]) > 1 else torch.zeros_like(mean)
            std = var.clamp(min=0).sqrt()
            self.m0.mul_(self.decay).add_((1 - self.decay) * mean)
            self.sm.mul_(self.decay).add_((1 - self.decay) * std)
            self.steps.add_(1)

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, *, check_finite: bool = True) -> PreferenceLossOutput:
        kw = dict(beta=self.beta, rho=self.rho, a=self.a)
        validate("beta_dpo", policy_logps, ref_logps, check_finite=check_finite, **kw)
        if self.training:
            u = policy_logps.detach() - ref_logps.detach()
            self._update(u[:, 0] - u[:, 1])
        dev = policy_logps.device
        return preference_loss(
            "beta_dpo", policy_logps, ref_logps, m0=self.m0.to(dev), sm=self.sm.to(dev), generator=self.generator, check_finite=False, **kw
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, rho={self.rho}, a={self.a}, decay={self.decay}, sync={self.sync}"


class GroupRobustLoss(nn.Module):
    """``group_robust`` with the group weights ``a_g`` as a buffer, updated after each training step.

    ``group_sizes`` (optional, length G) fixes ``N_g`` to dataset group sizes; by default ``N_g`` is the
    group's count in the (all-reduced) batch.
    """

    def __init__(
        self,
        num_groups: int,
        *,
        beta: float = 0.1,
        eta_a: float = 0.01,
        C: float = 0.0,
        group_sizes: Optional[Sequence[float]] = None,
        sync: bool = True,
    ):
        super().__init__()
        if not isinstance(num_groups, int) or num_groups < 1:
            raise HyperParameterError(f"GroupRobustLoss: num_groups={num_groups!r} is out of range; valid range: an int >= 1")
        _check("beta", beta, POSITIVE, "GroupRobustLoss")
        _check("eta_a", eta_a, Interval(0.0, math.inf), "GroupRobustLoss")
        _check("C", C, Interval(0.0, math.inf), "GroupRobustLoss")
        self.num_groups, self.beta, self.eta_a, self.C, self.sync = num_groups, float(beta), float(eta_a), float(C), bool(sync)
        self.register_buffer("weights", torch.full((num_groups,), 1.0 / num_groups, dtype=torch.float64))
        sizes = torch.zeros(0, dtype=torch.float64) if group_sizes is None else torch.as_tensor(group_sizes, dtype=torch.float64)
        if group_sizes is not None and (sizes.shape != (num_groups,) or bool((sizes <= 0).any())):
            raise HyperParameterError(f"GroupRobustLoss: group_sizes must hold {num_groups} positive counts")
        self.register_buffer("group_sizes", sizes)

    def _update(self, group_sums: Tensor, counts: Tensor) -> None:
        with torch.no_grad():
            stats = _all_reduce_sum(torch.cat([group_sums.double(), counts.double()]).to(self.weights.device), self.sync)
            sums, n = stats[: self.num_groups], stats[self.num_groups :]
            present = n > 0
            mean_loss = torch.where(present, sums / n.clamp(min=1), torch.zeros_like(sums))
            sizes = self.group_sizes if self.group_sizes.numel() else n.clamp(min=1)
            step = torch.where(present, self.eta_a * (mean_loss + self.C / sizes.sqrt()), torch.zeros_like(sums))
            w = self.weights * torch.exp(step - step.max())
            self.weights.copy_(w / w.sum())

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, *, groups: Tensor, check_finite: bool = True) -> PreferenceLossOutput:
        kw = dict(beta=self.beta, num_groups=self.num_groups, groups=groups)
        out = preference_loss(
            "group_robust", policy_logps, ref_logps, group_weights=self.weights.to(policy_logps.device), check_finite=check_finite, **kw
        )
        if self.training:
            counts = out.metrics["group_counts"]
            self._update(out.metrics["group_losses"] * counts, counts)
        return out

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, beta={self.beta}, eta_a={self.eta_a}, C={self.C}, sync={self.sync}"


attach_stateful("bco_pair", BCOPairLoss)
attach_stateful("bco", BCOLoss)
attach_stateful("beta_dpo", BetaDPOLoss)
attach_stateful("group_robust", GroupRobustLoss)
