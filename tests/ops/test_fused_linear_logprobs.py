"""fused_linear_logprobs on the torch backend against the float64 naive reference."""

import pytest
import torch

import pygpo
from reference import STAT_OUTPUTS, assert_no_worse_than_baseline, leaf, naive_token_stats, rel_err, run_with_grads

SHAPES = [(37, 48, 1001), (1, 8, 5), (64, 16, 50)]


def _make(n, d, v, *, ignore_frac=0.5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    upstream = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in STAT_OUTPUTS}
    return hidden, weight, bias, labels, upstream


def _ours(labels, **kw):
    def fn(h, w, b):
        out = pygpo.fused_linear_logprobs(
            h, w, labels, bias=b, return_entropy=True, return_lse=True, return_log_sum_p2=True, backend="torch", **kw
        )
        return out._asdict()

    return fn


def _ref(labels, **kw):
    return lambda h, w, b: naive_token_stats(h, w, labels, b, **kw)


@pytest.mark.parametrize("n,d,v", SHAPES)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.5])
@pytest.mark.parametrize("memory_budget", [None, 3000])  # 3000 bytes forces vocabulary tiles and online rescaling
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 4.0)])
def test_fp32_matches_float64_reference(n, d, v, ignore_frac, memory_budget, temperature, softcap):
    hidden, weight, bias, labels, upstream = _make(n, d, v, ignore_frac=ignore_frac, scale=3.0)
    kw = dict(temperature=temperature, softcap=softcap)
    ref_out, ref_grads = run_with_grads(_ref(labels, **kw), [leaf(hidden), leaf(weight), leaf(bias)], upstream)
    ins = [leaf(hidden, torch.float32), leaf(weight, torch.float32), leaf(bias, torch.float32)]
    out, grads = run_with_grads(_ours(labels, memory_budget=memory_budget, **kw), ins, upstream)
    for k in STAT_OUTPUTS:
        assert out[k].dtype == torch.float32 and out[k].shape == labels.shape
        assert rel_err(out[k], ref_out[k]) < 2e-6, k
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < 1e-5, name


def test_leading_shape_and_ignored_rows_are_zero():
    hidden, weight, bias, labels, _ = _make(24, 16, 70)
    h3, y3 = leaf(hidden.float().reshape(2, 3, 4, 16)), labels.reshape(2, 3, 4)
    out = pygpo.fused_linear_logprobs(h3, weight.float(), y3, bias=bias.float(), backend="torch")
    assert out.shape == (2, 3, 4)
    ref = naive_token_stats(hidden, weight, labels, bias)["logprobs"].reshape(2, 3, 4)
    assert rel_err(out, ref) < 2e-6
    assert torch.all(out[y3 == -100] == 0)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.all(h3.grad[y3 == -100] == 0)
    assert torch.any(h3.grad[y3 != -100] != 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_plain_torch(dtype):
    """Error vs float64 must not exceed twice that of the same computation done by plain torch in ``dtype``."""
    hidden, weight, bias, labels, upstream = _make(37, 48, 1001, scale=2.0)
    upstream = {"logprobs": upstream["logprobs"], "entropy": upstream["entropy"]}
    ref_out, ref_grads = run_with_grads(_ref(labels), [leaf(hidden), leaf(weight), leaf(bias)], upstream)
    low = [leaf(hidden, dtype), leaf(weight, dtype), leaf(bias, dtype)]
    base_out, base_grads = run_with_grads(_ref(labels, dtype=dtype), low, upstream)
    low = [leaf(hidden, dtype), leaf(weight, dtype), leaf(bias, dtype)]
    out, grads = run_with_grads(_ours(labels), low, upstream)
    assert all(out[k].dtype == torch.float32 for k in upstream) and all(g.dtype == dtype for g in grads)
    assert_no_worse_than_baseline(upstream, (out, grads), (base_out, base_grads), (ref_out, ref_grads))


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.6, softcap=3.0, memory_budget=2000)])
def test_gradcheck_float64(options):
    hidden, weight, bias, labels, _ = _make(7, 5, 13, ignore_frac=0.3)
    memory_budget = options.pop("memory_budget", None)

    def fn(h, w, b):
        out = pygpo.fused_linear_logprobs(
            h, w, labels, bias=b, return_entropy=True, return_lse=True, return_log_sum_p2=True,
            backend="torch", memory_budget=memory_budget, **options,
        )
        return tuple(out)

    assert torch.autograd.gradcheck(fn, (leaf(hidden), leaf(weight), leaf(bias)), eps=1e-6, atol=1e-6)


def test_plain_call_returns_tensor_and_matches_selected_outputs():
    hidden, weight, _, labels, _ = _make(37, 48, 1001)
    h, w = hidden.float(), weight.float()
    plain = pygpo.fused_linear_logprobs(h, w, labels, backend="torch")
    assert isinstance(plain, torch.Tensor)
    only_lse = pygpo.fused_linear_logprobs(h, w, labels, return_lse=True, backend="torch")
    assert isinstance(only_lse, pygpo.LogProbs) and only_lse.entropy is None and only_lse.log_sum_p2 is None
    assert torch.equal(only_lse.logprobs, plain)
    assert rel_err(only_lse.lse, naive_token_stats(hidden, weight, labels)["lse"]) < 2e-6


def test_gradient_flows_only_through_requested_outputs():
    """An entropy that is returned but not used contributes nothing (materialize_grads off)."""
    hidden, weight, _, labels, upstream = _make(37, 48, 101)
    h, w = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    out = pygpo.fused_linear_logprobs(h, w, labels, return_entropy=True, backend="torch")
    g_h, g_w = torch.autograd.grad((out.logprobs * upstream["logprobs"].float()).sum(), (h, w))
    rh, rw = leaf(hidden), leaf(weight)
    ref = naive_token_stats(rh, rw, labels)["logprobs"]
    r_h, r_w = torch.autograd.grad((ref * upstream["logprobs"]).sum(), (rh, rw))
    assert rel_err(g_h, r_h) < 1e-5 and rel_err(g_w, r_w) < 1e-5
