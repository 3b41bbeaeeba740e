"""Training metrics named as TRL names them.

For a pairwise loss (chosen w, rejected l) with implicit rewards ``r_w, r_l`` (``beta * (lp - rp)``,
or ``beta * lp`` for a reference-free loss, or the head's own reward where it defines one):

- ``rewards/chosen``  = mean_B r_w
- ``rewards/rejected`` = mean_B r_l
- ``rewards/margins`` = mean_B (r_w - r_l)
- ``rewards/accuracies`` = mean_B 1[r_w > r_l]
- ``logps/chosen``, ``logps/rejected`` = mean_B of the policy scores given

Values are detached 0-d tensors (no host sync); ``float(v)`` logs them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def pair_metrics(rewards: tuple[Tensor, Tensor], logps: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """The six TRL pair metrics from per-example rewards and policy scores (one fused reduction)."""
    with torch.no_grad():
        r_w, r_l = (r.detach() for r in rewards)
        lp_w, lp_l = (x.detach().to(r_w.dtype) for x in logps)
        means = torch.stack([r_w, r_l, lp_w, lp_l, (r_w > r_l).to(r_w.dtype)]).mean(dim=1)
        chosen, rejected, logp_w, logp_l, acc = means.unbind()
        return {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": acc,
            "logps/chosen": logp_w,
            "logps/rejected": logp_l,
        }


def detach_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Detach every tensor in a metrics dict."""
    return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in metrics.items()}
