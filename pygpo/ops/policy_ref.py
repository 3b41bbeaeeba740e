"""``fused_linear_kl``: policy and reference log-probs and the per-token ``KL(p_ref || p_theta)`` in one pass."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

from torch import Tensor

from .dispatch import load_backend
from .policy_ref_stats import PolicyRefStats
from .token_rows import check_options, empty_outputs, gather_rows, resolve_run, scatter_rows, select_rows
from .token_stats import StatRequest
from .validation import check_flags, check_linear_inputs, check_reference_inputs


class PolicyRefLogProbs(NamedTuple):
    """Outputs of :func:`fused_linear_kl`, each float32 (float64 for float64 inputs on the torch backend) of the
    labels' shape, 0.0 at ignored tokens.

    ``logprobs`` and ``kl`` are differentiable w.r.t. the policy's ``hidden``, ``weight`` and ``bias``;
    ``ref_logprobs`` is a constant (``requires_grad`` is False).
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    kl: Tensor


class PolicyRefOutputs(NamedTuple):
    """Outputs of :func:`fused_linear_kl` when ``return_entropy`` or ``return_mean_logit`` is set.

    Every present field is float32 (float64 for float64 inputs on the torch backend) of the labels' shape,
    0.0 at ignored tokens. ``logprobs``, ``ref_logprobs`` and ``kl`` are those of :class:`PolicyRefLogProbs`.
    ``entropy`` (the policy's ``-sum_v p_v log p_v``) and ``mean_logit`` (the policy's ``(1/V) sum_v z_v``) are metrics: they carry
    no gradient (``requires_grad`` is False) and are ``None`` unless requested.
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    kl: Tensor
    entropy: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None


def fused_linear_kl(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
    memory_budget: Optional[int] = None,
    deterministic: Optional[bool] = None,
    return_entropy: bool = False,
    return_mean_logit: bool = False,
) -> Union[PolicyRefLogProbs, PolicyRefOutputs]:
    r"""Per-token policy and reference log-probs of ``labels`` and ``KL(p_ref || p_theta)`` over the vocabulary.

    With ``z = T(hidden @ weight.T + bias)``, ``z_r = T(ref_hidden @ ref_weight.T + ref_bias)``,
    ``T(r) = softcap * tanh(r / softcap) / temperature``, ``p_theta = softmax(z)`` and ``p_ref = softmax(z_r)``:

    .. math::
        \mathrm{logprob} = \log p_{\theta, y},\qquad \mathrm{ref\_logprob} = \log p_{\mathrm{ref}, y},\qquad
        \mathrm{kl} = \sum_v p_{\mathrm{ref}, v} (\log p_{\mathrm{ref}, v} - \log p_{\theta, v})

    Neither model's ``(N, V)`` logits are held: both are walked tile by tile in one pass and recomputed
    in the backward (derivation and numerics in :mod:`pygpo.ops.policy_ref_stats`). This is the
    token-level KL of TDPO, SparsePO and RRPO.

    The reference is treated as a constant: ``ref_logprobs`` carries no gradient, and ``ref_hidden``,
    ``ref_weight`` and ``ref_bias`` never receive one, even if they require grad (no graph is built
    through them; there is no need for ``torch.no_grad()`` around the reference model's lm_head).
    Gradients reach ``hidden``, ``weight`` and ``bias``: ``d logprob / dz = onehot(y) - p_theta`` and
    ``d kl / dz = p_theta - p_ref``.

    On request the same pass also gives two metrics of the policy (definitions as in
    :mod:`pygpo.ops.token_stats`): the entropy ``-sum_v p_theta,v log p_theta,v`` and the mean logit
    ``(1/V) sum_v z_v``. They are detached (no gradient flows through them) and cost nothing when not
    requested.

    Args:
        hidden: ``(..., D)`` policy hidden states, float32, float16 or bfloat16 (float64 too: the torch
            backend then computes in float64).
        weight: ``(V, D)`` policy lm_head weight, same dtype and device as ``hidden``.
        ref_hidden: ``(..., D_ref)`` reference hidden states, hidden's leading shape and dtype
            (``D_ref`` may differ from ``D``).
        ref_weight: ``(V, D_ref)`` reference lm_head weight, same ``V`` as ``weight``.
        labels: ``(...)`` integer, values in ``[0, V)`` or ``ignore_index``.
        bias, ref_bias: optional ``(V,)`` biases of the two heads.
        ignore_index: label value whose rows give 0.0 and zero gradient, and cost no matmul work.
        temperature: positive divisor applied after the softcap, to both models.
        softcap: optional positive ``c`` of ``c * tanh(raw / c)``, applied to both models.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`pygpo.ops.dispatch`).
        memory_budget: bytes the torch backend may spend on the two logit tiles together; the triton
            backend's deterministic backward spends it on its ``rows x V`` dRaw buffer.
        deterministic: Triton backward without atomics, bitwise reproducible. ``None`` (default) means
            ``True``: on an H100 it ran 9x faster than the fused atomic backward (``False``), which
            remains for runs that cannot spare the ``rows x V`` buffer (see :mod:`pygpo.ops.dispatch`).
        return_entropy: also return the policy's entropy per token (a metric, no gradient).
        return_mean_logit: also return the policy's mean logit per token (a metric, no gradient).

    Returns:
        :class:`PolicyRefLogProbs` ``(logprobs, ref_logprobs, kl)``, each float32 of the labels' shape
        (float64 for float64 inputs on the torch backend);
        with ``return_entropy`` or ``return_mean_logit``, :class:`PolicyRefOutputs` ``(logprobs,
        ref_logprobs, kl, entropy, mean_logit)``, the fields not requested ``None``.
        The KL is non-negative up to rounding (it may be about ``-1e-7`` where the models agree).
    """
    check_options(temperature, softcap, memory_budget, deterministic=deterministic)
    check_flags(return_entropy=return_entropy, return_mean_logit=return_mean_logit)
    num_valid = check_linear_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    check_reference_inputs(ref_hidden, ref_weight, ref_bias, hidden=hidden, weight=weight)
    name, deterministic = resolve_run(backend, hidden.device, deterministic, op="policy_ref")
    req = StatRequest(entropy=return_entropy, mean_logit=return_mean_logit, temperature=temperature,
                      softcap=softcap)

    rows, y = select_rows(labels, ignore_index, num_valid)
    h = gather_rows(hidden, rows)
    # detach(): the reference is a constant, so no graph is recorded through its gather either
    h_ref = gather_rows(ref_hidden.detach(), rows)
    w_ref = ref_weight.detach()
    b_ref = None if ref_bias is None else ref_bias.detach()
    if rows.index.numel() == 0:
        logprobs, ref_logprobs, kl = empty_outputs((True, True, True), h, weight, bias)
        empty = logprobs.detach()  # detached metrics of zero rows
        stats = PolicyRefStats(logprobs, ref_logprobs.detach(), kl, empty if return_entropy else None,
                               empty if return_mean_logit else None)
    else:
        impl = load_backend(name, "policy_ref")
        stats = impl.compute_policy_ref(
            h.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            h_ref.contiguous(), w_ref.contiguous(), None if b_ref is None else b_ref.contiguous(), y, req,
            memory_budget=memory_budget, deterministic=deterministic,
        )
    out = [None if x is None else scatter_rows(x, rows) for x in stats]
    if not (return_entropy or return_mean_logit):
        return PolicyRefLogProbs(*out[:3])
    return PolicyRefOutputs(*out)
