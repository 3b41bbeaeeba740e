"""Bad input to the public ops' less-travelled checks (each message names the argument and what was
expected), and the pairwise loss head's reference-scores path against float64 math written here."""

from __future__ import annotations

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
    for bad in (labels.float(), labels.bool()):
        with pytest.raises(TypeError, match=f"labels must be an integer tensor, got {bad.dtype}"):
            pygpo.selective_log_softmax(logits, bad)


def test_selective_log_softmax_shape_and_device(logits_labels):
    logits, labels = logits_labels
    with pytest.raises(ValueError, match=r"labels shape \(3, 3\) must equal logits' leading shape \(3, 4\)"):
        pygpo.selective_log_softmax(logits, labels[:, :3])
    with pytest.raises(ValueError, match="labels on meta and logits on cpu must share a device"):
        pygpo.selective_log_softmax(logits, labels.to("meta"))


@pytest.mark.parametrize("value", ["hot", [1.0]])
def test_temperature_that_is_not_a_number(logits_labels, value):
    with pytest.raises(ValueError, match=r"temperature must be a positive finite number, got "):
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
