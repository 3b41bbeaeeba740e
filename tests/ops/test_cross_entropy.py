"""fused_linear_cross_entropy equals F.cross_entropy(F.linear(...)); selective_log_softmax equals log_softmax+gather."""

import pytest
import torch
import torch.nn.functional as F

import pygpo
from reference import leaf, naive_logits, rel_err


def _data(n=37, d=48, v=1001, ignore_frac=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, b, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("memory_budget", [None, 3000])
def test_matches_torch_cross_entropy(reduction, label_smoothing, memory_budget):
    h, w, b, y = _data()
    hr, wr, br = leaf(h), leaf(w), leaf(b)
    ref = F.cross_entropy(F.linear(hr, wr, br), y, reduction=reduction, label_smoothing=label_smoothing)
    ho, wo, bo = leaf(h, torch.float32), leaf(w, torch.float32), leaf(b, torch.float32)
    out = pygpo.fused_linear_cross_entropy(
        ho, wo, y, bias=bo, reduction=reduction, label_smoothing=label_smoothing, backend="torch",
        memory_budget=memory_budget,
    )
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 2e-6
    up = torch.randn(ref.shape, dtype=torch.float64)
    ref_g = torch.autograd.grad((ref * up).sum(), (hr, wr, br))
    our_g = torch.autograd.grad((out.double() * up).sum(), (ho, wo, bo))
    for name, a, r in zip(("hidden", "weight", "bias"), our_g, ref_g):
        assert rel_err(a, r) < 1e-5, name


def test_z_loss_and_softcap():
    h, w, b, y = _data()
    cap, zl = 3.0, 1e-2
    hr, wr = leaf(h), leaf(w)
    z = naive_logits(hr, wr, softcap=cap)
    valid = y != -100
    ref = F.cross_entropy(z, y, reduction="sum") + zl * (torch.logsumexp(z, -1)[valid] ** 2).sum()
    ref = ref / valid.sum()
    ho, wo = leaf(h, torch.float32), leaf(w, torch.float32)
    out = pygpo.fused_linear_cross_entropy(ho, wo, y, z_loss=zl, softcap=cap, backend="torch")
    assert rel_err(out, ref) < 2e-6
    ref_g = torch.autograd.grad(ref, (hr, wr))
    our_g = torch.autograd.grad(out, (ho, wo))
    assert rel_err(our_g[0], ref_g[0]) < 1e-5 and rel_err(our_g[1], ref_g[1]) < 1e-5


def test_all_ignored_mean_is_zero_with_zero_gradient():
    h, w, _, y = _data(ignore_frac=1.1)
    ho, wo = leaf(h, torch.float32), leaf(w, torch.float32)
    out = pygpo.fused_linear_cross_entropy(ho, wo, y, backend="torch")
    assert out.item() == 0.0
    out.backward()
    assert torch.count_nonzero(ho.grad) == 0 and torch.count_nonzero(wo.grad) == 0


@pytest.mark.parametrize("bad,match", [
    (dict(reduction="avg"), "reduction"), (dict(label_smoothing=1.5), "label_smoothing"), (dict(z_loss=-1.0), "z_loss"),
])
def test_bad_options(bad, match):
    h, w, _, y = _data()
    with pytest.raises(ValueError, match=match):
        pygpo.fused_linear_cross_entropy(h.float(), w.float(), y, **bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_selective_log_softmax(dtype, temperature):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 41, 1001, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 1001, (3, 41), generator=g)
    labels[0, :7] = -100
    ref_in = leaf(logits)
    ref = torch.log_softmax(ref_in / temperature, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref = torch.where(labels != -100, ref, 0.0)
    ours_in = leaf(logits, dtype)
    out = pygpo.selective_log_softmax(ours_in, labels, temperature=temperature)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    # bf16: the inputs are rounded; compare with the reference on the same rounded logits
    if dtype == torch.bfloat16:
        ref_in = leaf(logits.to(dtype), torch.float64)
        ref = torch.log_softmax(ref_in / temperature, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        ref = torch.where(labels != -100, ref, 0.0)
        tol = 2e-6
    assert rel_err(out, ref) < tol
    up = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), ref_in)
    (g_out,) = torch.autograd.grad((out.double() * up).sum(), ours_in)
    assert g_out.dtype == dtype
    assert rel_err(g_out, g_ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.count_nonzero(g_out[0, :7]) == 0
