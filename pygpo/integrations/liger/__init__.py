"""Liger-Kernel-compatible chunked preference losses, computed by pygpo's fused ops and loss registry.

Existing code switches by import::

    # from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from pygpo.integrations.liger import LigerFusedLinearDPOLoss

    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = LigerFusedLinearDPOLoss(beta=0.1)(
        lm_head.weight, hidden, target, ref_input=ref_hidden, ref_weight=ref_lm_head.weight)

The modules :class:`LigerFusedLinearDPOLoss`, :class:`LigerFusedLinearORPOLoss`,
:class:`LigerFusedLinearCPOLoss`, :class:`LigerFusedLinearSimPOLoss` and :class:`LigerFusedLinearKTOLoss`
take the constructor and ``forward`` arguments of Liger-Kernel's (0.8.5) classes of the same names, in
the same order with the same defaults, and return the same structure. The functional forms
``liger_fused_linear_dpo``, ``..._orpo``, ``..._cpo``, ``..._simpo`` and ``..._kto`` take the
positional arguments of Liger's ``LigerFusedLinear*Function.apply`` (as ``liger_kernel.chunked_loss.
functional`` exposes them). pygpo's own options (``backend``, ``memory_budget``, ``deterministic``,
see :func:`pygpo.fused_linear_logprobs`) are keyword-only and come after Liger's arguments.

Layout and conventions (Liger's):

* Paired losses: ``_input (2B, T, D)`` stacks the ``B`` chosen rows over the ``B`` rejected rows,
  ``target (2B, T)`` holds the next-token labels already shifted (``ignore_index`` where no loss is
  taken), ``weight (V, D)``, ``bias (V,)``. KTO: ``_input (N, T, D)``, ``target (N, T)`` and
  ``preference_labels (N,)`` bool (True: desirable).
* Sequence score ``s`` of a row: the sum of its tokens' log-probs, or their mean when
  ``average_log_prob`` (always the mean for ORPO and SimPO).
* ``nll_loss``: ``-sum log p / count`` over every chosen token of the batch (a token mean over the
  batch, the registry's ``NLL_mean(y_w)``), on ``nll_target``'s chosen half when ORPO is given one;
  0 when ``compute_nll_loss=False``. The loss is ``alpha * nll_loss + preference term``.
* ``chosen_logits_mean``: the sum of the logits of every position of the chosen rows, ignored ones
  included, over ``B * T * V`` (KTO: the plain sums over the desirable / undesirable rows).
* Rewards: ``beta * (s - s_ref)`` per example (``s_ref = 0`` without a reference); KTO returns their
  sums over the desirable and the undesirable rows.
* Every auxiliary output is detached; gradients flow from the loss into ``_input``, ``weight`` and
  ``bias``, never into the reference tensors.

The preference term comes from :func:`pygpo.preference_loss` (LOSSES.md):

==========================  ==============================================================
Liger                       registry key (hyper-parameters)
==========================  ==============================================================
DPO ``sigmoid``             ``dpo`` (``label_smoothing`` unused, as in Liger)
DPO ``hinge``               ``hinge``
DPO ``exo_pair``            ``exo`` (``eps = label_smoothing``)
DPO ``nca_pair``            ``nca``
DPO ``robust``              ``robust`` (``eps = label_smoothing``)
DPO ``bco_pair``            ``bco_pair`` (``delta = 0``)
DPO ``sppo_hard``           ``sppo_hard``
DPO ``apo_zero``            ``apo_zero``
DPO ``apo_down``            ``apo_down``
DPO ``discopop``            ``discopop`` (``tau = discopop_tau``)
ORPO                        ``orpo`` (``lam = beta``)
CPO                         ``cpo`` (``eps = label_smoothing``; its NLL term is added here)
SimPO                       ``simpo`` (``eps = label_smoothing``)
KTO                         ``kto`` (``labels = preference_labels``, ``z0 = kl`` or 0)
==========================  ==============================================================

Papers: DPO (Rafailov et al., 2023), ORPO (Hong et al., 2024), CPO (Xu et al., 2024), SimPO (Meng
et al., 2024), KTO (Ethayarajh et al., 2024); the DPO variants' papers are cited in LOSSES.md.

Where the numbers or behaviour differ from Liger-Kernel 0.8.5:

* ``compiled`` and ``chunk_size`` are accepted and stored but change nothing: the fused ops never hold
  the ``(2B, T, V)`` logits, whatever the batch, and tile by ``memory_budget`` instead.
* The logits means and sums use linearity, ``sum_v (h . W_v + b_v) = h . sum_v W_v + sum_v b_v``
  (accumulated in float32), so no logits are formed for them; they equal Liger's up to summation order.
* Float64 inputs give float64 log-probs, loss and outputs (Liger rounds them to float32).
* A row without any valid token, where scores are averaged, is an error naming the row (Liger returns
  NaN); with ``compute_nll_loss=False`` the NLL output is exactly 0 even when every chosen token is
  ignored (Liger divides 0 by 0 and the loss becomes NaN).
* ORPO's ``log(1 - exp(m))`` is computed stably (agrees with Liger's ``log1p(-exp(m))`` to rounding).
* KTO's ``kl`` is a number, a one-element tensor, or an ``(N,)`` tensor of per-row reference points, as
  Liger documents it. Liger applies an ``(N,)`` tensor per row only when one chunk holds the whole batch
  (``chunk_size >= N``; at smaller chunks it adds the whole tensor to every chunk's log-ratios); here it is
  per row whatever ``chunk_size`` says.
* The reference may have its own ``D_ref`` and dtype, as in Liger; hyper-parameters are checked
  against the registry's ranges when the module is built (e.g. ``beta > 0``).
"""

from .functional import (
    liger_fused_linear_cpo,
    liger_fused_linear_dpo,
    liger_fused_linear_kto,
    liger_fused_linear_orpo,
    liger_fused_linear_simpo,
)
from .modules import (
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearKTOLoss,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOLoss,
)

__all__ = [
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearKTOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOLoss",
    "liger_fused_linear_cpo",
    "liger_fused_linear_dpo",
    "liger_fused_linear_kto",
    "liger_fused_linear_orpo",
    "liger_fused_linear_simpo",
]
