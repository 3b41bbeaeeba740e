"""The ``is_top1`` statistic (TRL's token accuracy): 1.0 exactly where the label is the argmax of the logits."""

from __future__ import annotations

import pytest
import torch

from pygpo.ops.token_rows import valid_row_stats
from pygpo.ops.token_stats import StatRequest

N, D, V = 37, 48, 1001


def _problem(softcap, temperature):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5
    z = h.double() @ w.double().T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    best = z.argmax(-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::2] = best[::2]  # half the rows have their argmax as the label
    labels[5] = -100
    return h, w, labels, (labels == best).float()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("softcap,temperature,budget", [(None, 1.0, None), (5.0, 0.7, 3000)])
def test_is_top1_matches_float64_argmax(backend, softcap, temperature, budget):
    if backend == "triton":
        pytest.importorskip("triton")
    h, w, labels, expected = _problem(softcap, temperature)
    req = StatRequest(top1=True, temperature=temperature, softcap=softcap)
    rows = valid_row_stats(h, w, labels, None, ignore_index=-100, req=req, backend=backend,
                           memory_budget=budget, deterministic=None)
    valid = labels != -100
    assert rows.stats.is_top1 is not None and not rows.stats.is_top1.requires_grad
    torch.testing.assert_close(rows.stats.is_top1, expected[valid])
    assert 0 < float(rows.stats.is_top1.sum()) < int(valid.sum())


def test_is_top1_costs_nothing_when_not_requested():
    h, w, labels, _ = _problem(None, 1.0)
    rows = valid_row_stats(h, w, labels, None, ignore_index=-100, req=StatRequest(), backend="torch",
                           memory_budget=None, deterministic=None)
    assert rows.stats.is_top1 is None


@pytest.mark.parametrize("softcap,temperature,budget", [(None, 1.0, None), (5.0, 0.7, 3000)])
def test_cuda_backend_is_top1_on_its_host_twin(softcap, temperature, budget):
    """The cuda backend's epilogue, run on the CPU by its host twin (budget 3000 merges vocabulary tiles)."""
    pytest.importorskip("pygpo._C", reason="pygpo._C not built")
    from pygpo.ops.backends import cuda_logprobs

    h, w, labels, expected = _problem(softcap, temperature)
    valid = labels != -100
    req = StatRequest(top1=True, temperature=temperature, softcap=softcap)
    hv = h[valid].requires_grad_()
    stats = cuda_logprobs.compute_token_stats(hv, w, None, labels[valid], req, memory_budget=budget)
    assert stats.is_top1 is not None and not stats.is_top1.requires_grad
    torch.testing.assert_close(stats.is_top1, expected[valid])
    assert 0 < float(stats.is_top1.sum()) < int(valid.sum())
    # a metric: the log-probs still differentiate, and is_top1 adds nothing to the gradient
    g, = torch.autograd.grad(stats.logprobs.sum(), hv)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
