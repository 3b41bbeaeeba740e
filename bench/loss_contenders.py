"""The DPO-loss benchmark's contenders: one sigmoid DPO loss from final hidden states per library.

Each computes ``-mean log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` over summed completion
log-probs (Rafailov et al., 2023, "Direct Preference Optimization", eq. 7), reference scoring included,
the way its library does it:

- ``pygpo``: ``pygpo.FusedPreferenceLoss("dpo", beta=beta)`` with its defaults (metrics on);
- ``pygpo_eager``: the same with ``eager_gradients=True`` (gradients computed in the forward, cuBLAS tiles for policy and reference); and two
  breakdown rows, ``pygpo_lean`` (no metrics, no finiteness check) and ``pygpo_ops`` (the bare ops);
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``ref_input``/``ref_weight``; ``compiled`` as chosen);
- ``trl``: TRL's DPOTrainer path from the hidden states on: the fused lm_head it patches into the model
  (``ChunkedLogProbFunction`` with the trainer's chunk size and outputs, valid rows only on Triton
  devices and all rows elsewhere, as ``add_fused_lm_head`` does), per-row sums, and the trainer's
  ``loss_type="sigmoid"`` formula (inline in ``DPOTrainer._compute_loss``, so written out here);
- ``naive``: ``F.linear``, float32 ``log_softmax``, gather, masked sums, the DPO formula.

A loss is a :data:`LossFn` ``(hidden, weight, labels, ref_hidden, ref_weight) -> scalar``;
:func:`loss_contenders` binds the reference tensors into :class:`bench.contenders.Contender` closures
``(hidden, weight, labels, ignore_index) -> loss`` for :mod:`bench.runner` (the upstream gradient is 1).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .contenders import Contender
from .loss_problem import LossProblem
from .runner import _failure

#: ``(hidden, weight, labels, ref_hidden, ref_weight) -> scalar loss``
LossFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
#: ``(hidden (2B, T, D), weight (V, D), labels (2B, T)) -> summed completion log-probs (2B,)``
SequenceLogps = Callable[[Tensor, Tensor, Tensor], Tensor]
OURS = "pygpo"
REFERENCE = "naive"  # the correctness step's reference (float64 at the small size)
CONTENDER_NAMES = ("naive", "pygpo", "pygpo_eager", "pygpo_lean", "pygpo_ops", "liger", "trl")
#: TRL's DPOTrainer asks its fused lm_head for these (the extra ones feed its logged metrics).
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def dpo_sigmoid(policy: Tensor, ref: Tensor, beta: float) -> Tensor:
    """``-mean log sigmoid(beta * (chosen log-ratio - rejected log-ratio))`` of rank-major ``(2B,)`` sums."""
    chosen, rejected = (policy - ref).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def _dpo_loss(policy_logps: SequenceLogps, ref_logps: SequenceLogps, beta: float) -> LossFn:
    """The DPO loss of ``policy_logps`` on the policy against ``ref_logps`` on the reference (under no_grad)."""

    def loss(h: Tensor, w: Tensor, labels: Tensor, ref_h: Tensor, ref_w: Tensor) -> Tensor:
        with torch.no_grad():
            ref = ref_logps(ref_h, ref_w, labels)
        return dpo_sigmoid(policy_logps(h, w, labels), ref, beta)

    return loss


def naive_loss(beta: float, ignore_index: int, compute_dtype: Optional[torch.dtype] = None) -> LossFn:
    """Eager torch over all rows, logits materialised; ``compute_dtype=torch.float64`` gives the reference."""

    def sequence_logps(h: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        if compute_dtype is not None:
            h, w = h.to(compute_dtype), w.to(compute_dtype)
        logits = F.linear(h, w)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (logp * (labels != ignore_index)).sum(-1)

    return _dpo_loss(sequence_logps, sequence_logps, beta)


def pygpo_loss(beta: float, ignore_index: int, **options) -> LossFn:
    """``pygpo.FusedPreferenceLoss("dpo", beta=beta, **options)``, reference passed as ``ref_hidden``/``ref_weight``."""
    import pygpo

    module = pygpo.FusedPreferenceLoss("dpo", beta=beta, ignore_index=ignore_index, **options)
    return lambda h, w, labels, ref_h, ref_w: module(h, w, labels, ref_hidden=ref_h, ref_weight=ref_w).loss


def pygpo_ops_loss(beta: float, ignore_index: int) -> LossFn:
    """The floor under the module: ``fused_linear_logprobs`` for the policy and, under no_grad, the
    reference, then row sums and the DPO formula; what the module adds on top is its overhead."""
    import pygpo

    def sequence_logps(h: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        return pygpo.fused_linear_logprobs(h, w, labels, ignore_index=ignore_index).sum(-1)

    return _dpo_loss(sequence_logps, sequence_logps, beta)


def liger_loss(beta: float, ignore_index: int, compiled: bool) -> LossFn:
    """Liger-Kernel's ``LigerFusedLinearDPOLoss`` with its defaults but ``compiled``."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    module = LigerFusedLinearDPOLoss(ignore_index=ignore_index, beta=beta, compiled=compiled)
    return lambda h, w, labels, ref_h, ref_w: module(w, h, labels, ref_input=ref_h, ref_weight=ref_w)[0]


def trl_loss(beta: float, ignore_index: int) -> LossFn:
    """TRL's fused lm_head (as ``add_fused_lm_head`` calls it) for policy and reference, then DPO sigmoid."""
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction, _use_triton

    def token_logps(h: Tensor, w: Tensor, labels: Tensor, outputs: tuple[str, ...]) -> Tensor:
        mask = labels != ignore_index
        compact = _use_triton(h.device)  # TRL scores only the valid rows on Triton devices
        rows = h[mask] if compact else h.reshape(-1, h.size(-1))
        targets = labels[mask] if compact else labels.clamp(min=0).reshape(-1)
        logps = _ChunkedLogProbFunction.apply(rows, w, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                              outputs)[0]
        if compact:
            return logps.new_zeros(mask.shape).masked_scatter(mask, logps)
        return logps.view(mask.shape).masked_fill(~mask, 0)

    return _dpo_loss(lambda h, w, labels: token_logps(h, w, labels, TRL_DPO_OUTPUTS).sum(-1),
                     lambda h, w, labels: token_logps(h, w, labels, ("log_probs",)).sum(-1), beta)


def _catalogue(problem: LossProblem, liger_compiled: bool) -> dict[str, tuple[Callable[[], LossFn], str, str]]:
    """``name -> (factory, module it needs, notes for the JSON)``."""
    b, ii = problem.beta, problem.ignore_index
    return {
        "naive": (lambda: naive_loss(b, ii), "torch",
                  "all rows through F.linear; (2B, T, V) logits and float32 log_softmax materialised, policy and reference"),
        "pygpo": (lambda: pygpo_loss(b, ii), "pygpo",
                  "pygpo.FusedPreferenceLoss('dpo', beta) defaults: backend='auto', compute_metrics=True, "
                  "check_finite=True; valid rows only; reference scored under no_grad in its own pass"),
        "pygpo_eager": (lambda: pygpo_loss(b, ii, eager_gradients=True), "pygpo",
                        "pygpo.FusedPreferenceLoss('dpo', beta, eager_gradients=True): gradients computed in the "
                        "forward from a kept logit tile per chunk of pairs (3 matmuls per policy row, not 4)"),
        "pygpo_lean": (lambda: pygpo_loss(b, ii, compute_metrics=False, check_finite=False), "pygpo",
                       "pygpo.FusedPreferenceLoss('dpo', beta, compute_metrics=False, check_finite=False): "
                       "the module without its metrics and finiteness check (a breakdown, not a target)"),
        "pygpo_ops": (lambda: pygpo_ops_loss(b, ii), "pygpo",
                      "pygpo.fused_linear_logprobs for policy and reference (no_grad), row sums, the DPO "
                      "formula: the bare ops under the module (a breakdown, not a target)"),
        "liger": (lambda: liger_loss(b, ii, liger_compiled), "liger_kernel.chunked_loss",
                  f"LigerFusedLinearDPOLoss(beta, compiled={liger_compiled}) defaults (chunk_size=1 pair, "
                  "loss_type='sigmoid'); all rows; gradients computed during the forward"),
        "trl": (lambda: trl_loss(b, ii), "trl.trainer.utils",
                f"TRL DPOTrainer lm_head path: _ChunkedLogProbFunction with outputs={TRL_DPO_OUTPUTS} (policy) and "
                "('log_probs',) (reference, no_grad), chunk _CHUNKED_LOGPROB_CHUNK_SIZE; valid rows only where TRL "
                "uses Triton (CUDA/XPU), all rows elsewhere; loss_type='sigmoid' formula; the trainer's metric "
                "reductions and .item() calls are not included"),
    }


def loss_contenders(
    problem: LossProblem, refs: tuple[Tensor, Tensor], *, only: Optional[list[str]] = None,
    liger_compiled: bool = True, reference: bool = False,
) -> tuple[list[Contender], dict[str, str]]:
    """Contenders bound to the reference tensors ``refs`` and ``{name: reason}`` for those that cannot run.

    ``reference=True`` puts the float64 naive loss first under the name ``naive`` (the runner's correctness
    reference) and renames the run-dtype naive ``naive_<dtype>``. ``naive`` always runs.
    """
    if only is not None and set(only) - set(CONTENDER_NAMES):
        raise ValueError(f"unknown contenders {sorted(set(only) - set(CONTENDER_NAMES))}; choose from {list(CONTENDER_NAMES)}")
    ref_h, ref_w = refs

    def bind(name: str, fn: LossFn, notes: str) -> Contender:
        return Contender(name, lambda h, w, labels, _ii: fn(h, w, labels, ref_h, ref_w), notes)

    ready, skipped = [], {}
    if reference:
        ready.append(bind(REFERENCE, naive_loss(problem.beta, problem.ignore_index, torch.float64), "float64 reference"))
    for name, (factory, module, notes) in _catalogue(problem, liger_compiled).items():
        if only is not None and name != "naive" and name not in only:
            continue
        try:
            fn = factory()
        except Exception as exc:  # noqa: BLE001 - a missing or broken package marks the contender unavailable
            skipped[name] = f"cannot set up {module}: {_failure(exc)}"
            continue
        ready.append(bind(f"naive_{problem.dtype}" if reference and name == "naive" else name, fn, notes))
    return ready, skipped
