"""The fused ops under ``torch.autocast``: forward and backward in the backend's own precision, the same
numbers as without autocast (a backward outside the autocast region differentiates the forward's logits)."""

from __future__ import annotations

import pytest
import torch

import pygpo


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(37, 48, generator=g)
    w = torch.randn(1001, 48, generator=g) * 0.3
    b = torch.randn(1001, generator=g)
    y = torch.randint(0, 1001, (37,), generator=g)
    y[::3] = -100
    up = torch.randn(37, generator=g)
    return h, w, b, y, up


def _run(h, w, b, y, up, backend, autocast, **kw):
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = pygpo.fused_linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], backend=backend, **kw)
    (out * up).sum().backward()  # outside the autocast region, as a training step's backward usually is
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("budget", [None, 1 << 14], ids=["kept", "recomputed"])
def test_autocast_changes_nothing_and_matches_float64(backend, budget):
    h, w, b, y, up = _problem()
    plain, plain_grads = _run(h, w, b, y, up, backend, False, memory_budget=budget)
    under, under_grads = _run(h, w, b, y, up, backend, True, memory_budget=budget)
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    for got, want in zip(under_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    # float64 reference: autocast's bf16 matmuls would be off by ~1e-2 here
    ref = [t.double().requires_grad_() for t in (h, w, b)]
    logp = torch.log_softmax(ref[0] @ ref[1].T + ref[2], -1)
    valid = y != -100
    lp = torch.where(valid, logp.gather(1, y.clamp(min=0)[:, None])[:, 0], torch.zeros((), dtype=torch.float64))
    (lp * up.double()).sum().backward()
    torch.testing.assert_close(under.double(), lp.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(under_grads, (t.grad for t in ref)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_fused_linear_kl_under_autocast_matches_plain():
    h, w, b, y, up = _problem(1)
    g = torch.Generator().manual_seed(2)
    rh, rw = torch.randn(37, 48, generator=g), torch.randn(1001, 48, generator=g) * 0.3

    def run(autocast):
        hh = h.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = pygpo.fused_linear_kl(hh, w, rh, rw, y, backend="torch")
        (out.kl * up).sum().backward()
        return out.kl.detach(), hh.grad

    (kl0, g0), (kl1, g1) = run(False), run(True)
    torch.testing.assert_close(kl1, kl0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
