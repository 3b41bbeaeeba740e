"""Bad scalar options and shapes raise clear errors before any compute; double backward raises clearly;
float64 inputs give float64 outputs everywhere the docs say so.

Second order: the fused ops' backwards are first-order only. ``create_graph=True`` still gives the
exact first-order gradient (compared with float64 autograd through materialised logits), and a second
backward through it raises an error that says so, instead of torch's in-place-modification error or
a silently constant gradient. ``retain_graph`` (two first-order backwards) is covered in
``test_kept_logits.py``.
"""

import importlib.util
import math

import numpy as np
import pytest
import torch

import pygpo
from pygpo.ops.policy_ref import fused_linear_kl
from reference import leaf, naive_policy_ref, naive_token_stats, rel_err

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_C = importlib.util.find_spec("pygpo._C") is not None
TWICE = "differentiate twice"


def _data(n=5, d=8, v=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


# ------------------------------------------------------------------ scalar options


BAD_SCALARS = [math.inf, -math.inf, math.nan, 0.0, -1.0]


@pytest.mark.parametrize("value", BAD_SCALARS)
@pytest.mark.parametrize("name", ["softcap", "temperature"])
def test_fused_ops_reject_non_finite_or_non_positive_softcap_and_temperature(name, value):
    h, w, y = _data()
    calls = [lambda **kw: pygpo.fused_linear_logprobs(h, w, y, **kw),
             lambda **kw: pygpo.fused_linear_cross_entropy(h, w, y, **kw),
             lambda **kw: fused_linear_kl(h, w, h, w, y, **kw)]
    for call in calls:
        with pytest.raises(ValueError, match=f"{name} must be a positive finite number"):
            call(**{name: value})


@pytest.mark.parametrize("value", BAD_SCALARS)
def test_selective_log_softmax_rejects_bad_temperature(value):
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        pygpo.selective_log_softmax(torch.randn(3, 4), torch.tensor([0, 1, 2]), temperature=value)


def test_finite_options_still_accepted():
    h, w, y = _data()
    out = pygpo.fused_linear_logprobs(h, w, y, softcap=np.float32(30.0), temperature=2)
    ref = naive_token_stats(h, w, y, softcap=30.0, temperature=2.0)["logprobs"]
    assert rel_err(out, ref) < 1e-5


# ------------------------------------------------------------------ shapes


def test_zero_width_hidden_is_rejected_naming_hidden_and_weight():
    y = torch.tensor([0, 1, 2, 3])
    for call in (lambda: pygpo.fused_linear_logprobs(torch.randn(4, 0), torch.randn(11, 0), y),
                 lambda: pygpo.fused_linear_cross_entropy(torch.randn(4, 0), torch.randn(11, 0), y)):
        with pytest.raises(ValueError, match=r"hidden and weight must have a hidden size D >= 1.*\(4, 0\).*\(11, 0\)"):
            call()
    h, w, _ = _data(n=4)
    with pytest.raises(ValueError, match="ref_hidden and ref_weight must have a hidden size D >= 1"):
        fused_linear_kl(h, w, torch.randn(4, 0), torch.randn(11, 0), y)


def test_selective_log_softmax_zero_dim_logits():
    with pytest.raises(ValueError, match="logits must have a vocabulary dimension"):
        pygpo.selective_log_softmax(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("max_tokens", [4.7, 4.0, True, "4"])
def test_pack_rejects_non_integer_max_tokens(max_tokens):
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        pygpo.prefix.pack([[1, 2]], [[[3], [4]]], max_tokens=max_tokens)


def test_pack_accepts_integer_types_for_max_tokens():
    for max_tokens in (4, np.int64(4)):
        assert pygpo.prefix.pack([[1, 2]], [[[3], [4]]], max_tokens=max_tokens).input_ids.tolist() == [[1, 2, 3, 4]]


# ------------------------------------------------------------------ dtypes


def test_float64_inputs_give_float64_outputs_and_the_dtype_error_says_so():
    h, w, y = _data(dtype=torch.float64)
    assert pygpo.fused_linear_logprobs(h, w, y, backend="torch").dtype == torch.float64
    ignored = torch.full_like(y, -100)  # no valid row: the same dtype as with valid rows
    assert pygpo.fused_linear_logprobs(h, w, ignored, backend="torch").dtype == torch.float64
    assert fused_linear_kl(h, w, h, w, ignored, return_entropy=True).entropy.dtype == torch.float64
    with pytest.raises(TypeError, match="float32, float16, bfloat16 \\(or float64"):
        pygpo.fused_linear_logprobs(h.int(), w.int(), y)


# ------------------------------------------------------------------ second order


def _logprobs_op(backend):
    if backend == "cuda":
        from pygpo.ops.backends import cuda_logprobs
        from pygpo.ops.token_stats import StatRequest

        return lambda h, w, y: cuda_logprobs.compute_token_stats(h, w, None, y, StatRequest()).logprobs
    return lambda h, w, y: pygpo.fused_linear_logprobs(h, w, y, backend=backend)


BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else []) + (["cuda"] if HAS_C else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_gives_first_order_then_a_clear_error(backend):
    h64, w64, y = _data()
    h = leaf(h64, torch.float32)
    out = _logprobs_op(backend)(h, w64.float(), y)
    g, = torch.autograd.grad(out.square().sum(), h, create_graph=True)
    ref_h = leaf(h64)
    ref, = torch.autograd.grad(naive_token_stats(ref_h, w64, y)["logprobs"].square().sum(), ref_h)
    assert rel_err(g, ref) < 2e-5
    with pytest.raises(RuntimeError, match=TWICE):
        torch.autograd.grad(g.sum(), h)
    # a linear upstream (constant upstream gradient) too: the gradient still depends on hidden
    g, = torch.autograd.grad(_logprobs_op(backend)(h, w64.float(), y).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match=TWICE):
        (g.square().sum() + h.sum()).backward()


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_create_graph_fused_linear_kl(backend):
    h64, w64, y = _data()
    h = leaf(h64, torch.float32)
    out = fused_linear_kl(h, w64.float(), h64.float() * 0.5, w64.float(), y, backend=backend)
    g, = torch.autograd.grad(out.kl.sum() + out.logprobs.sum(), h, create_graph=True)
    ref_h = leaf(h64)
    ref_out = naive_policy_ref(ref_h, w64, h64 * 0.5, w64, y)
    ref, = torch.autograd.grad(ref_out["kl"].sum() + ref_out["logprobs"].sum(), ref_h)
    assert rel_err(g, ref) < 2e-5
    with pytest.raises(RuntimeError, match=TWICE):
        torch.autograd.grad(g.sum(), h)


def test_create_graph_selective_log_softmax_and_cross_entropy():
    h64, w64, y = _data(dtype=torch.float64)
    logits = leaf(h64 @ w64.T)
    g, = torch.autograd.grad(pygpo.selective_log_softmax(logits, y).square().sum(), logits, create_graph=True)
    ref_logits = leaf(logits)
    ref, = torch.autograd.grad(ref_logits.log_softmax(-1).gather(1, y[:, None]).square().sum(), ref_logits)
    assert rel_err(g, ref) < 1e-12
    with pytest.raises(RuntimeError, match=TWICE):
        torch.autograd.grad(g.sum(), logits)
    h = leaf(h64)
    g, = torch.autograd.grad(pygpo.fused_linear_cross_entropy(h, w64, y), h, create_graph=True)
    with pytest.raises(RuntimeError, match=TWICE):
        torch.autograd.grad(g.sum(), h)


@pytest.mark.skipif(not HAS_C, reason="pygpo._C not built")
def test_create_graph_cuda_loss_head():
    from pygpo.ops.loss_head import HeadConfig, cuda_loss_head

    lp = leaf(-torch.rand(6, dtype=torch.float64) * 4)
    index = torch.tensor([0, 0, 1, 2, 3, 3])
    out = cuda_loss_head(lp, index, 2, None, None, None, HeadConfig("logistic", 0.1, 1.0, 0.0, 0.0, False))
    g, = torch.autograd.grad(out.loss, lp, create_graph=True)
    with pytest.raises(RuntimeError, match=TWICE):
        torch.autograd.grad(g.sum(), lp)
