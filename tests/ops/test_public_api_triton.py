"""The public ops on backend="triton" (interpreter on CPU): dispatch, compaction and scatter around the kernels."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import pygpo
from reference import leaf, naive_token_stats, rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _data(shape=(3, 13), d=40, v=333, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=torch.float64) * 2
    w = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, v, shape, generator=g)
    y[torch.rand(shape, generator=g) < 0.5] = -100
    return h, w, b, y


@pytest.mark.parametrize("deterministic", [False, True])
def test_logprobs_all_outputs_leading_shape(deterministic):
    h, w, b, y = _data()
    up = {k: torch.randn(y.shape, dtype=torch.float64) for k in ("logprobs", "entropy", "lse", "log_sum_p2")}
    ref = naive_token_stats(leaf(h), leaf(w), y, leaf(b), temperature=0.8, softcap=5.0)
    ins = [leaf(t, torch.float32).to(DEVICE).detach().requires_grad_() for t in (h, w, b)]
    out = pygpo.fused_linear_logprobs(
        ins[0], ins[1], y.to(DEVICE), bias=ins[2], temperature=0.8, softcap=5.0, return_entropy=True,
        return_lse=True, return_log_sum_p2=True, backend="triton", deterministic=deterministic,
    )._asdict()
    for k in up:
        assert out[k].shape == y.shape and rel_err(out[k].cpu(), ref[k]) < 1e-5, k
    assert torch.all(out["logprobs"].cpu()[y == -100] == 0)
    rh, rw, rb = leaf(h), leaf(w), leaf(b)
    ref = naive_token_stats(rh, rw, y, rb, temperature=0.8, softcap=5.0)
    ref_g = torch.autograd.grad(sum((ref[k] * up[k]).sum() for k in up), (rh, rw, rb))
    our_g = torch.autograd.grad(sum((out[k].double().cpu() * up[k]).sum() for k in up), ins)
    for name, a, r in zip(("hidden", "weight", "bias"), our_g, ref_g):
        assert rel_err(a.cpu(), r) < 2e-5, name
    assert torch.count_nonzero(our_g[0].cpu()[y == -100]) == 0


def test_cross_entropy_label_smoothing_z_loss():
    h, w, b, y = _data(shape=(29,))
    rh, rw = leaf(h), leaf(w)
    logits = F.linear(rh, rw)
    ref = F.cross_entropy(logits, y, label_smoothing=0.1, reduction="sum")
    ref = ref + 1e-3 * (torch.logsumexp(logits, -1)[y != -100] ** 2).sum()
    oh, ow = (leaf(t, torch.float32).to(DEVICE).detach().requires_grad_() for t in (h, w))
    out = pygpo.fused_linear_cross_entropy(oh, ow, y.to(DEVICE), label_smoothing=0.1, z_loss=1e-3,
                                           reduction="sum", backend="triton")
    assert rel_err(out.cpu(), ref) < 1e-5
    for a, r in zip(torch.autograd.grad(out, (oh, ow)), torch.autograd.grad(ref, (rh, rw))):
        assert rel_err(a.cpu(), r) < 2e-5


def test_triton_and_torch_backends_agree_all_ignored():
    h, w, b, _ = _data()
    y = torch.full(h.shape[:-1], -100)
    hh = leaf(h, torch.float32)
    out = pygpo.fused_linear_logprobs(hh.to(DEVICE), w.float().to(DEVICE), y.to(DEVICE), backend="triton")
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert torch.count_nonzero(hh.grad) == 0
