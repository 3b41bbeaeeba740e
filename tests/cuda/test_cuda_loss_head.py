"""fused_pairwise_loss_head: torch implementation and the cuda kernels' host twin against the registry.

``pygpo.preference_loss`` (the loss registry, written from LOSSES.md) on per-response scores reduced
in float64 is the independent reference: per-pair losses, the mean, and gradients w.r.t. the
per-token log-probs must agree for dpo, cdpo, robust, hinge, ipo (both normalisations), dpo_shift and
simpo. The cuda path runs on CPU tensors through its host twin (``csrc/host_twin.cpp``), in float64.
"""

import importlib.util

import pytest
import torch

import pygpo
from pygpo.ops.loss_head import HeadConfig, cuda_loss_head, fused_pairwise_loss_head, torch_loss_head

HAS_C = importlib.util.find_spec("pygpo._C") is not None
IMPLS = [pytest.param(torch_loss_head, id="torch"),
         pytest.param(cuda_loss_head, id="cuda_twin",
                      marks=pytest.mark.skipif(not HAS_C, reason="pygpo._C not built"))]

# (our head and options, registry name and hyper-parameters, uses a reference)
CASES = [
    (dict(head="logistic", beta=0.3), "dpo", dict(beta=0.3), True),
    (dict(head="smoothed", beta=0.3, eps=0.2), "cdpo", dict(beta=0.3, eps=0.2), True),
    (dict(head="robust", beta=0.3, eps=0.2), "robust", dict(beta=0.3, eps=0.2), True),
    (dict(head="hinge", beta=0.3), "hinge", dict(beta=0.3), True),
    (dict(head="ipo", beta=0.3, length_normalize=True), "ipo", dict(beta=0.3, length_normalize=True), True),
    (dict(head="ipo", beta=0.3), "ipo", dict(beta=0.3, length_normalize=False), True),
    (dict(head="logistic", beta=0.3, b=0.8), "dpo_shift", dict(beta=0.3, lam=0.8), True),
    (dict(head="smoothed", beta=2.0, margin=0.5, eps=0.1, length_normalize=True), "simpo",
     dict(beta=2.0, gamma=0.5, eps=0.1), False),
]


def _batch(pairs, *, seed=0, dtype=torch.float64, max_len=9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (2 * pairs,), generator=g)
    index = torch.repeat_interleave(torch.arange(2 * pairs), lengths)
    t = index.numel()
    lp = -torch.rand(t, generator=g, dtype=torch.float64).to(dtype) * 4
    rp = -torch.rand(t, generator=g, dtype=torch.float64).to(dtype) * 4
    return lp, rp, index, lengths


def _per_response(x, index, pairs):
    return torch.zeros(2 * pairs, dtype=torch.float64).index_add(0, index, x.double()).view(pairs, 2)


def _cfg(opts):
    return HeadConfig(opts["head"], opts.get("beta", 0.1), opts.get("b", 1.0), opts.get("margin", 0.0),
                      opts.get("eps", 0.0), opts.get("length_normalize", False))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ours,name,hparams,with_ref", CASES)
@pytest.mark.parametrize("pairs", [1, 7])
def test_matches_registry_in_float64(impl, ours, name, hparams, with_ref, pairs):
    lp, rp, index, lengths = _batch(pairs, seed=pairs)
    lp_ours, lp_reg = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    out = impl(lp_ours, index, pairs, rp if with_ref else None, None, None, _cfg(ours))
    policy = _per_response(lp_reg, index, pairs)
    kw = dict(hparams)
    if name in ("ipo", "simpo"):
        kw["lengths"] = lengths.view(pairs, 2).double()
    ref = pygpo.preference_loss(name, policy, _per_response(rp, index, pairs) if with_ref else None, **kw)
    torch.testing.assert_close(out.per_example, ref.per_example, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(pairs, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g_ours, = torch.autograd.grad(out.loss + (out.per_example * upstream).sum(), lp_ours)
    g_ref, = torch.autograd.grad(ref.loss + (ref.per_example * upstream).sum(), lp_reg)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_weights_reference_gradients_and_ref_scores(impl):
    """Weighted reducer with a per-response reference-score cache, against the formula in float64."""
    pairs = 4
    lp, rp, index, lengths = _batch(pairs, seed=3)
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    cache = torch.randn(pairs, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    cfg = HeadConfig("smoothed", 0.7, 0.9, 0.25, 0.1, True)
    ins = [t.clone().requires_grad_(True) for t in (lp, rp, cache)]
    out = impl(ins[0], index, pairs, ins[1], w, ins[2], cfg)
    ref_ins = [t.clone().requires_grad_(True) for t in (lp, rp, cache)]
    sums = torch.zeros(2 * pairs, dtype=torch.float64).index_add(0, index, w * (ref_ins[0] - ref_ins[1]))
    u = (sums / lengths.double()).view(pairs, 2) - ref_ins[2]
    z = 0.7 * (u[:, 0] - 0.9 * u[:, 1]) - 0.25
    ls = lambda x: torch.log1p(torch.exp(-x))  # noqa: E731  (small |z| here: the plain formula is exact)
    per = 0.9 * ls(z) + 0.1 * ls(-z)
    torch.testing.assert_close(out.per_example, per, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.scores, u.detach(), rtol=1e-12, atol=1e-12)
    for g, r in zip(torch.autograd.grad(out.loss, ins), torch.autograd.grad(per.mean(), ref_ins)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not HAS_C, reason="pygpo._C not built")
def test_twin_float32_close_to_float64_and_empty_response_scores_zero():
    pairs = 6
    lp, rp, index, _ = _batch(pairs, seed=8, max_len=40)
    keep = index != 3  # response 3 (pair 1, rejected) has no tokens
    lp, rp, index = lp[keep], rp[keep], index[keep]
    cfg = HeadConfig("logistic", 0.1, 1.0, 0.0, 0.0, False)
    out64 = cuda_loss_head(lp, index, pairs, rp, None, None, cfg)
    out32 = cuda_loss_head(lp.float(), index, pairs, rp.float(), None, None, cfg)
    assert out64.scores[1, 1] == 0
    torch.testing.assert_close(out32.per_example.double(), out64.per_example, rtol=1e-5, atol=1e-6)


def test_public_function_validates_before_compute():
    lp, rp, index, _ = _batch(3)
    with pytest.raises(ValueError, match="non-decreasing"):
        fused_pairwise_loss_head(lp, index.flip(0), 3)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        fused_pairwise_loss_head(lp, index + 1, 3)
    with pytest.raises(ValueError, match="head must be one of"):
        fused_pairwise_loss_head(lp, index, 3, head="sigmoid")
    with pytest.raises(ValueError, match=r"eps must lie in \[0, 0.5\)"):
        fused_pairwise_loss_head(lp, index, 3, head="robust", eps=0.5)
    with pytest.raises(ValueError, match="beta must be a positive"):
        fused_pairwise_loss_head(lp, index, 3, beta=0.0)
    with pytest.raises(ValueError, match="ref_logps must match logps"):
        fused_pairwise_loss_head(lp, index, 3, ref_logps=rp.float())
    with pytest.raises(ValueError, match="num_pairs"):
        fused_pairwise_loss_head(lp, index, 0)
    with pytest.raises(ValueError, match=r"logps must be a \(T,\) float32 or float64"):
        fused_pairwise_loss_head(lp.half(), index, 3)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])  # triton has no head kernel: torch runs
def test_public_function_on_cpu(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lp, rp, index, _ = _batch(5)
    out = fused_pairwise_loss_head(lp, index, 5, ref_logps=rp, beta=0.2, backend=backend)
    ref = pygpo.preference_loss("dpo", _per_response(lp, index, 5), _per_response(rp, index, 5), beta=0.2)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
