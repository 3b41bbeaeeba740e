"""Bad input to the public ops' less-travelled checks (each message names the argument and what was
expected), and the pairwise loss head's reference-scores path against float64 math written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pygpo
from pygpo.ops.loss_head import fused_pairwise_loss_head


@pytest.fixture
def logits_labels():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 7, generator=g), torch.randint(0, 7, (3, 4), generator=g)


def test_selective_log_softmax_dtypes(logits_labels):
    logits, labels = logits_labels
    with pytest.raises(TypeError, match="logits must be floating point, got torch.int64"):
        pygpo.selective_log_softmax(logits.long(), labels)
    for bad in (labels.float(), labels.bool(), labels.to(torch.complex64)):
        with pytest.raises(TypeError, match=rf"labels must be an integer tensor \(e.g. torch.long\), got {bad.dtype}"):
            pygpo.selective_log_softmax(logits, bad)


def test_selective_log_softmax_empty_vocabulary(logits_labels):
    with pytest.raises(ValueError, match=r"logits must have a vocabulary of V >= 1 entries .* got shape \(3, 4, 0\)"):
        pygpo.selective_log_softmax(torch.zeros(3, 4, 0), torch.full((3, 4), -100))


def test_selective_log_softmax_shape_and_device(logits_labels):
    logits, labels = logits_labels
    with pytest.raises(ValueError, match=r"labels shape \(3, 3\) must equal logits' leading shape \(3, 4\)"):
        pygpo.selective_log_softmax(logits, labels[:, :3])
    with pytest.raises(ValueError, match="labels on meta and logits on cpu must share a device"):
        pygpo.selective_log_softmax(logits, labels.to("meta"))


@pytest.mark.parametrize("value", ["hot", "1", [1.0], True, torch.tensor(0.5), None])
def test_temperature_that_is_not_a_number(logits_labels, value):
    with pytest.raises(TypeError, match=r"temperature must be a real number \(int or float\), got "):
        pygpo.selective_log_softmax(*logits_labels, temperature=value)


def test_zero_dim_hidden():
    w = torch.randn(7, 5)
    with pytest.raises(ValueError, match=r"hidden must have shape \(\.\.\., D\) with at least one dimension, got a 0-d tensor"):
        pygpo.fused_linear_logprobs(torch.tensor(1.0), w, torch.tensor(1))


@pytest.fixture
def head_batch():
    g = torch.Generator().manual_seed(1)
    logps = torch.randn(7, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # 2 pairs: responses 0..3
    return logps, index


def test_loss_head_response_index(head_batch):
    logps, index = head_batch
    with pytest.raises(ValueError, match=r"response_index must be a \(T,\) = \(7,\) integer tensor, got \(7,\) torch.float32"):
        fused_pairwise_loss_head(logps, index.float(), 2)
    with pytest.raises(ValueError, match=r"response_index must be a \(T,\) = \(7,\) integer tensor, got \(6,\) torch.int64"):
        fused_pairwise_loss_head(logps, index[:6], 2)


def test_loss_head_ref_scores(head_batch):
    logps, index = head_batch
    with pytest.raises(TypeError, match="ref_scores must be a torch.Tensor, got list"):
        fused_pairwise_loss_head(logps, index, 2, ref_scores=[[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match=r"ref_scores must be \(2, 2\) torch.float64, got \(2, 3\) torch.float64"):
        fused_pairwise_loss_head(logps, index, 2, ref_scores=torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ref_scores must be \(2, 2\) torch.float64, got \(2, 2\) torch.float32"):
        fused_pairwise_loss_head(logps, index, 2, ref_scores=torch.zeros(2, 2))


def test_loss_head_smoothed_eps(head_batch):
    with pytest.raises(ValueError, match=r"eps must lie in \[0, 0.5\] for head='smoothed', got 0.7"):
        fused_pairwise_loss_head(*head_batch, 2, head="smoothed", eps=0.7)


def test_loss_head_with_reference_scores_matches_float64_dpo(head_batch):
    logps, index = head_batch
    logps = logps.clone().requires_grad_()
    ref_scores = torch.tensor([[-1.0, 0.5], [2.0, -0.25]], dtype=torch.float64, requires_grad=True)
    out = fused_pairwise_loss_head(logps, index, 2, ref_scores=ref_scores, beta=0.3, backend="torch")
    sums = torch.stack([logps[index == r].sum() for r in range(4)]).view(2, 2)
    u = sums - ref_scores
    want = -F.logsigmoid(0.3 * (u[:, 0] - u[:, 1]))
    torch.testing.assert_close(out.per_example, want)
    torch.testing.assert_close(out.scores, u.detach())
    got = torch.autograd.grad(out.loss, (logps, ref_scores))
    torch.testing.assert_close(got, torch.autograd.grad(want.mean(), (logps, ref_scores)))


# ------------------------------------------------------------------ option types of the fused ops


def _linear(n=5, d=8, v=11):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randint(0, v, (n,), generator=g)


def _all_ops():
    """Each public op that takes ``ignore_index`` and the shared options, on small valid inputs."""
    h, w, y = _linear()
    logits = torch.randn(5, 11)
    return {
        "fused_linear_logprobs": lambda **kw: pygpo.fused_linear_logprobs(h, w, y, **kw),
        "fused_linear_cross_entropy": lambda **kw: pygpo.fused_linear_cross_entropy(h, w, y, **kw),
        "fused_linear_kl": lambda **kw: pygpo.fused_linear_kl(h, w, h, w, y, **kw),
        "selective_log_softmax": lambda **kw: pygpo.selective_log_softmax(logits, y, **kw),
    }


@pytest.mark.parametrize("op", list(_all_ops()))
@pytest.mark.parametrize("value", [None, 3.5, True, "-100", torch.tensor(-100)])
def test_ignore_index_must_be_an_int(op, value):
    with pytest.raises(TypeError, match=r"ignore_index must be an int label value \(e.g. -100\), got "):
        _all_ops()[op](ignore_index=value)


@pytest.mark.parametrize("op", ["fused_linear_logprobs", "fused_linear_cross_entropy", "fused_linear_kl"])
@pytest.mark.parametrize("name,value,exc,match", [
    ("temperature", "1", TypeError, r"temperature must be a real number \(int or float\), got str '1'"),
    ("temperature", True, TypeError, "temperature must be a real number"),
    ("softcap", "30", TypeError, "softcap must be a real number"),
    ("deterministic", "no", TypeError, "deterministic must be a bool, got str 'no'"),
    ("deterministic", 1, TypeError, "deterministic must be a bool, got int 1"),
    ("memory_budget", True, TypeError, "memory_budget must be a positive int number of bytes or None, got bool True"),
    ("memory_budget", 1e9, TypeError, "memory_budget must be a positive int number of bytes or None, got float"),
    ("memory_budget", -5, ValueError, "memory_budget must be a positive int number of bytes or None, got -5"),
])
def test_shared_options_name_the_option(op, name, value, exc, match):
    with pytest.raises(exc, match=match):
        _all_ops()[op](**{name: value})


@pytest.mark.parametrize("call,name", [
    (lambda h, w, y, v: pygpo.fused_linear_logprobs(h, w, y, return_entropy=v), "return_entropy"),
    (lambda h, w, y, v: pygpo.fused_linear_logprobs(h, w, y, return_lse=v), "return_lse"),
    (lambda h, w, y, v: pygpo.fused_linear_logprobs(h, w, y, return_log_sum_p2=v), "return_log_sum_p2"),
    (lambda h, w, y, v: pygpo.fused_linear_kl(h, w, h, w, y, return_mean_logit=v), "return_mean_logit"),
])
def test_boolean_outputs_must_be_bool(call, name):
    with pytest.raises(TypeError, match=f"{name} must be a bool, got str 'yes'"):
        call(*_linear(), "yes")


@pytest.mark.parametrize("kw,exc,match", [
    (dict(label_smoothing="a"), TypeError, r"label_smoothing must be a real number \(int or float\), got str 'a'"),
    (dict(label_smoothing=None), TypeError, "label_smoothing must be a real number"),
    (dict(z_loss=None), TypeError, r"z_loss must be a real number \(int or float\), got NoneType None"),
    (dict(z_loss=True), TypeError, "z_loss must be a real number"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be a finite number, got inf"),
    (dict(z_loss=-1), ValueError, "z_loss must be >= 0, got -1.0"),
])
def test_cross_entropy_options_name_the_option(kw, exc, match):
    with pytest.raises(exc, match=match):
        pygpo.fused_linear_cross_entropy(*_linear(), **kw)


def test_numpy_and_int_options_are_accepted():
    """Real numbers of any kind (NumPy scalars, ints) keep working, against float64 log-softmax."""
    h, w, y = _linear()
    y[0] = -1
    out = pygpo.fused_linear_logprobs(h, w, y, ignore_index=np.int64(-1), temperature=np.float32(0.5), softcap=30,
                                      memory_budget=np.int64(1 << 20), deterministic=True)
    z = 30 * torch.tanh((h.double() @ w.double().T) / 30) / 0.5
    want = torch.log_softmax(z, -1).gather(1, y.clamp(min=0)[:, None])[:, 0].masked_fill(y == -1, 0.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    ce = pygpo.fused_linear_cross_entropy(h, w, y, ignore_index=-1, label_smoothing=0, z_loss=np.float64(0.0))
    want_ce = F.cross_entropy(h.double() @ w.double().T, y, ignore_index=-1)
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ loss head options and data


@pytest.mark.parametrize("kw,exc,match", [
    (dict(margin=math.nan), ValueError, "margin must be a finite number, got nan"),
    (dict(b=math.nan), ValueError, "b must be a finite number, got nan"),
    (dict(b=math.inf), ValueError, "b must be a finite number, got inf"),
    (dict(margin="0.5"), TypeError, r"margin must be a real number \(int or float\), got str"),
    (dict(beta="0.1"), TypeError, "beta must be a real number"),
    (dict(beta=True), TypeError, "beta must be a real number"),
    (dict(length_normalize="yes"), TypeError, "length_normalize must be a bool, got str 'yes'"),
    (dict(check_index=1), TypeError, "check_index must be a bool, got int 1"),
    (dict(head="logistic", eps=5.0), ValueError,
     r"eps=5.0 has no effect with head='logistic': only \('smoothed', 'robust'\) read it; leave eps at 0"),
    (dict(head="hinge", eps=0.1), ValueError, "eps=0.1 has no effect with head='hinge'"),
    (dict(head="ipo", eps=0.1), ValueError, "eps=0.1 has no effect with head='ipo'"),
    (dict(head="smoothed", eps=math.nan), ValueError, "eps must be a finite number, got nan"),
])
def test_loss_head_options(head_batch, kw, exc, match):
    with pytest.raises(exc, match=match):
        fused_pairwise_loss_head(*head_batch, 2, **kw)


def test_loss_head_token_weights_must_be_finite(head_batch):
    logps, index = head_batch
    for bad in (math.nan, math.inf):
        weights = torch.ones_like(logps)
        weights[3] = bad
        with pytest.raises(ValueError, match=r"token_weights must be finite, found 1 nan or infinite value\(s\)"):
            fused_pairwise_loss_head(logps, index, 2, token_weights=weights)


def test_loss_head_num_pairs_must_match_the_index(head_batch):
    logps, index = head_batch  # responses 0..3: 2 pairs
    with pytest.raises(ValueError, match=r"num_pairs=3, but response_index's largest value 3 is in pair 1: it names 2"):
        fused_pairwise_loss_head(logps, index, 3)
    with pytest.raises(ValueError, match=r"response_index is empty \(no tokens\), so it names no pair, but num_pairs=2"):
        fused_pairwise_loss_head(logps[:0], index[:0], 2)


def test_loss_head_response_without_tokens_inside_the_index_scores_zero(head_batch):
    """A response with no tokens before the last pair stays allowed (it scores 0), against float64 DPO."""
    logps, index = head_batch
    keep = index != 1  # response 1 (pair 0, rejected) loses its tokens
    out = fused_pairwise_loss_head(logps[keep], index[keep], 2, beta=0.5, backend="torch")
    sums = torch.stack([logps[keep][index[keep] == r].sum() for r in range(4)]).view(2, 2)
    assert sums[0, 1] == 0
    torch.testing.assert_close(out.per_example, -F.logsigmoid(0.5 * (sums[:, 0] - sums[:, 1])))
