"""Per-token scores of the valid tokens: policy log-probs, the reference's, the token KL and the metric terms.

One fused pass per model over the ``M`` valid rows (ignored rows cost no matmul work):

* policy only, or policy and a reference given as hidden states without a token-KL term: the policy's
  ``log p_theta(y_t)`` (differentiable) with, as metrics, the entropy and the mean logit, and
  ``log sum_v p_theta(v)^2`` when WPO asks for it, and whether each label is the top-1 token; the reference's ``log p_ref(y_t)`` in a second
  pass under ``no_grad`` (no backward work at all);
* a token-KL loss (TDPO, SparsePO, RRPO, PMPO) with reference hidden states: policy and reference tiles
  side by side in one pass (:func:`pygpo.fused_linear_kl`), ``KL(p_ref || p_theta)`` per token with its
  gradient ``p_theta - p_ref``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops.policy_ref import fused_linear_kl
from ..ops.token_rows import check_options, valid_row_stats
from ..ops.token_stats import StatRequest
from ..ops.validation import check_backend_name, check_ignore_index
from .layout import ResponseLayout


class ProjectionOptions(NamedTuple):
    """Options of the lm_head projection shared by policy and reference."""

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: Optional[float] = None
    backend: str = "auto"
    memory_budget: Optional[int] = None
    deterministic: Optional[bool] = None

    @classmethod
    def checked(cls, ignore_index: int, temperature: float, softcap: Optional[float], backend: str,
                memory_budget: Optional[int], deterministic: Optional[bool]) -> "ProjectionOptions":
        """The options after the checks the fused ops make on every call, each error naming its option
        (``temperature`` and ``softcap`` become floats)."""
        check_options(temperature, softcap, memory_budget, deterministic=deterministic)
        check_backend_name(backend)
        return cls(check_ignore_index(ignore_index), float(temperature), None if softcap is None else float(softcap),
                   backend, memory_budget, deterministic)


class TokenScores(NamedTuple):
    """Each ``(M,)`` float32 over the valid tokens (layout order), or ``None`` when not computed.

    ``logps`` and ``kl`` carry gradients to the policy; everything else is a constant.
    """

    logps: Tensor
    ref_logps: Optional[Tensor] = None
    kl: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None
    log_sum_p2: Optional[Tensor] = None
    is_top1: Optional[Tensor] = None


def _single_pass(hidden, weight, labels, bias, opts: ProjectionOptions, req: StatRequest, layout: ResponseLayout):
    # the layout's valid rows (labels checked with it) spare the pass its own device read
    return valid_row_stats(
        hidden, weight, labels, bias, ignore_index=opts.ignore_index, req=req, backend=opts.backend,
        memory_budget=opts.memory_budget, deterministic=opts.deterministic, rows=layout.rows(labels),
    ).stats


def _detached(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.detach()


def token_scores(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    layout: ResponseLayout,
    *,
    bias: Optional[Tensor],
    ref: Optional[tuple[Tensor, Tensor, Optional[Tensor]]],
    need_kl: bool,
    need_log_sum_p2: bool,
    metrics: bool,
    opts: ProjectionOptions,
) -> TokenScores:
    """Scores of the valid tokens of ``labels`` under the policy (and the reference ``(h, W, b)`` if given).

    Metric terms (entropy, mean logit) are computed when ``metrics``; they ride along in the same pass.
    """
    temp, cap = opts.temperature, opts.softcap
    if need_kl:
        if ref is None:
            raise ValueError("a token-KL loss needs the reference as hidden states (ref_hidden, ref_weight)")
        out = fused_linear_kl(
            hidden, weight, ref[0], ref[1], labels, bias=bias, ref_bias=ref[2], ignore_index=opts.ignore_index,
            temperature=temp, softcap=cap, backend=opts.backend, memory_budget=opts.memory_budget,
            deterministic=opts.deterministic, return_entropy=metrics, return_mean_logit=metrics,
        )
        p2 = None
        if need_log_sum_p2:
            with torch.no_grad():
                p2 = _single_pass(hidden, weight, labels, bias, opts,
                                  StatRequest(log_sum_p2=True, temperature=temp, softcap=cap), layout).log_sum_p2
        return TokenScores(
            layout.valid(out.logprobs), layout.valid(out.ref_logprobs), layout.valid(out.kl),
            layout.valid(out.entropy) if metrics else None,
            layout.valid(out.mean_logit) if metrics else None, p2,
        )

    req = StatRequest(entropy=metrics, log_sum_p2=need_log_sum_p2, mean_logit=metrics, top1=metrics,
                      temperature=temp, softcap=cap)
    stats = _single_pass(hidden, weight, labels, bias, opts, req, layout)
    ref_logps = None
    if ref is not None:
        with torch.no_grad():
            ref_logps = _single_pass(ref[0].detach(), ref[1].detach(), labels, None if ref[2] is None else ref[2].detach(),
                                     opts, StatRequest(temperature=temp, softcap=cap), layout).logprobs
    return TokenScores(
        stats.logprobs, ref_logps, None, _detached(stats.entropy), _detached(stats.mean_logit),
        _detached(stats.log_sum_p2), stats.is_top1,
    )
