"""Token weights named by papers, for the ``weighted`` reducer (all detached).

- BMC (Bridging and Modeling Correlations in Pairwise Data for DPO):
  ``w_t = 1 + m_t * min(1 / p_theta(y_t), delta)``, ``m_t`` marks tokens that differ between y_w and y_l.
- DMPO (Direct Multi-Turn Preference Optimization):
  ``w_t = gamma^j (1 - gamma^(T-j)) / (1 - gamma^T)`` for the turn ``j`` (0-based) containing t, T turns;
  ``gamma = 1`` gives ``(T - j) / T``.
- SDPO / MCTS-DPO / Step-DPO: 0/1 masks over a segment of the chosen response, from the divergence
  point onwards (:func:`suffix_mask`).
- TGDPO (Token-level reward Guidance for DPO): chosen ``w_t = beta (1 + a beta rh_t)``, rejected
  ``w_t = beta (1 - a beta rh_t)``, ``rh_t = log pi_hat(y_t) - rp_t`` from a third frozen model, a=0.5.
  The loss is then ``ls(U_w - U_l)``, ``U = sum_t w_t (lp_t - rp_t)`` (beta inside the weights): reduce
  the per-token log-ratios with the ``weighted`` reducer and call ``dpo`` with ``beta=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bmc_token_weights(token_logps: Tensor, diff_mask: Tensor, *, delta: float) -> Tensor:
    """BMC weights ``1 + m_t min(exp(-lp_t), delta)`` (detached)."""
    if delta <= 0:
        raise ValueError(f"bmc_token_weights: delta={delta} must be > 0")
    with torch.no_grad():
        inv_p = torch.exp(-token_logps.float() if token_logps.dtype != torch.float64 else -token_logps)
        return 1.0 + diff_mask.to(inv_p.dtype) * torch.clamp(inv_p, max=delta)


def dmpo_token_weights(turn_ids: Tensor, *, gamma: float, num_turns: int | Tensor | None = None) -> Tensor:
    """DMPO turn discount per token (float64); ``turn_ids`` holds the 0-based turn of each token (-1: none).

    ``num_turns`` (T) defaults to ``max(turn_ids) + 1`` per sequence (last dimension).
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"dmpo_token_weights: gamma={gamma} must be in (0, 1]")
    with torch.no_grad():
        j = turn_ids.clamp(min=0).double()
        if num_turns is None:
            t = (turn_ids.max(dim=-1, keepdim=True).values + 1).clamp(min=1).double()
        else:
            t = torch.as_tensor(num_turns, dtype=torch.float64, device=turn_ids.device)
            if t.dim() > 0:
                t = t.unsqueeze(-1)
        if gamma == 1.0:
            w = (t - j) / t
        else:
            w = gamma**j * (1 - gamma ** (t - j)) / (1 - gamma**t)
        return torch.where(turn_ids >= 0, w, torch.zeros_like(w))


def suffix_mask(mask: Tensor, start: Tensor) -> Tensor:
    """0/1 mask of the completion tokens at completion position >= ``start`` (0-based, per row).

    ``mask`` is ``(..., T)``, ``start`` has the leading shape. SDPO / Step-DPO segment masks.
    """
    pos = mask.long().cumsum(dim=-1) - 1
    return mask.bool() & (pos >= start.unsqueeze(-1))


def tgdpo_token_weights(guide_token_logps: Tensor, ref_token_logps: Tensor, *, beta: float, a: float = 0.5) -> Tensor:
    """TGDPO weights for ``(B, 2, T)`` inputs: ``beta (1 +/- a beta rh_t)``, ``+`` chosen, ``-`` rejected."""
    with torch.no_grad():
        rh = (guide_token_logps - ref_token_logps).to(torch.float64 if guide_token_logps.dtype == torch.float64 else torch.float32)
        sign = torch.tensor([1.0, -1.0], dtype=rh.dtype, device=rh.device).view(1, 2, *([1] * (rh.dim() - 2)))
        return beta * (1 + sign * a * beta * rh)
