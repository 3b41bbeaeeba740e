"""Independent float64 references for the fused ops: logits are materialised, nothing is clever.

Written from the definitions in pygpo/ops/token_stats.py, not from any backend's code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_logits(hidden, weight, bias=None, *, temperature=1.0, softcap=None, dtype=torch.float64):
    raw = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if softcap is not None:
        raw = softcap * torch.tanh(raw / softcap)
    return raw / temperature


def naive_token_stats(hidden, weight, labels, bias=None, *, ignore_index=-100, temperature=1.0, softcap=None,
                      dtype=torch.float64):
    """Dict of per-token logprobs, entropy, lse, log_sum_p2, mean_logit; 0.0 at ignored tokens.

    Differentiable w.r.t. hidden, weight and bias (all upcast to ``dtype``).
    """
    z = naive_logits(hidden, weight, bias, temperature=temperature, softcap=softcap, dtype=dtype)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    values = {
        "logprobs": log_p.gather(-1, safe[..., None])[..., 0],
        "entropy": -(p * log_p).sum(-1),
        "lse": torch.logsumexp(z, dim=-1),
        "log_sum_p2": torch.log((p * p).sum(-1)),
        "mean_logit": z.mean(-1),
    }
    return {k: torch.where(valid, v, torch.zeros((), dtype=v.dtype)) for k, v in values.items()}


def naive_policy_ref(hidden, weight, ref_hidden, ref_weight, labels, bias=None, ref_bias=None, *,
                     ignore_index=-100, temperature=1.0, softcap=None, dtype=torch.float64):
    """Per-token logprobs, ref_logprobs and KL(p_ref || p_theta) from full logits in ``dtype``; 0 at ignored tokens.

    Differentiable w.r.t. the policy's tensors; the reference's are detached (a constant).
    """
    kw = dict(temperature=temperature, softcap=softcap, dtype=dtype)
    log_p = torch.log_softmax(naive_logits(hidden, weight, bias, **kw), dim=-1)
    ref_b = None if ref_bias is None else ref_bias.detach()
    log_q = torch.log_softmax(naive_logits(ref_hidden.detach(), ref_weight.detach(), ref_b, **kw), dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()[..., None]
    values = {
        "logprobs": log_p.gather(-1, safe)[..., 0],
        "ref_logprobs": log_q.gather(-1, safe)[..., 0],
        "kl": (log_q.exp() * (log_q - log_p)).sum(-1),
    }
    return {k: torch.where(valid, v, torch.zeros((), dtype=v.dtype)) for k, v in values.items()}


def leaf(x, dtype=None):
    """A fresh leaf copy of ``x`` (optionally cast) that requires grad."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def rel_err(actual, expected) -> float:
    """Max absolute error scaled by the reference's largest magnitude (0 for two empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.detach().double().abs().max().clamp_min(1e-12)
    return float((actual.detach().double() - expected.detach().double()).abs().max() / scale)


STAT_OUTPUTS = ("logprobs", "entropy", "lse", "log_sum_p2")


def run_with_grads(fn, inputs, upstream):
    """Call ``fn(*inputs)`` -> dict of outputs; backprop ``sum_k <out_k, upstream_k>``; return outputs, grads."""
    outs = fn(*inputs)
    total = sum((outs[k].double() * upstream[k]).sum() for k in upstream)
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(total, wrt)
    return outs, grads


def assert_no_worse_than_baseline(keys, got, base, ref) -> None:
    """Low-precision tolerance (DESIGN.md): each output ``k`` of ``keys`` and each gradient (of hidden,
    weight, bias) is within twice the error of ``base`` (the same computation by plain torch in the low
    dtype) plus ``1e-6``, both measured by :func:`rel_err` against the float64 ``ref``.

    ``got``, ``base``, ``ref``: ``(outputs dict, gradients sequence)`` pairs.
    """
    (out, grads), (base_out, base_grads), (ref_out, ref_grads) = got, base, ref
    for k in keys:
        assert rel_err(out[k], ref_out[k]) <= 2 * rel_err(base_out[k], ref_out[k]) + 1e-6, k
    for name, g, b, r in zip(("hidden", "weight", "bias"), grads, base_grads, ref_grads):
        assert rel_err(g, r) <= 2 * rel_err(b, r) + 1e-6, name
