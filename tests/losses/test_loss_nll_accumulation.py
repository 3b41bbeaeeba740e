"""``nll_mean_length``: a batch-token-mean NLL split over micro-batches (gradient accumulation, data
parallelism) sums to the token mean over all of them.

``NLL_mean(y_w) = -sum_b lp_w,b / sum_b |y_w,b|`` over every example of the optimizer step. Each
micro-batch's loss is weighted by its share of the step's examples; given the step's mean chosen length,
the weighted micro-batch losses and their gradients equal the whole step's, whatever the micro-batches'
own lengths. References are the formulas written out in float64, not the registry's heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pygpo.losses import preference_loss
from pygpo.losses.errors import InputShapeError, InputValueError

DT = torch.float64
B = 7
SPLITS = ((0, 1), (1, 4), (4, 7))  # micro-batches of 1, 3 and 3 examples


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (B, 2), generator=g).to(DT)  # chosen lengths differ between micro-batches
    policy = -lengths * (0.5 + torch.rand(B, 2, generator=g, dtype=DT))  # token sums, mean log-prob in (-1.5, -0.5)
    ref = policy + 0.3 * torch.randn(B, 2, generator=g, dtype=DT)
    gold_lengths = torch.randint(1, 30, (B,), generator=g).to(DT)
    gold = -gold_lengths * (0.5 + torch.rand(B, generator=g, dtype=DT))
    return policy, ref, lengths, gold, gold_lengths


def _nll(lp, lengths):
    return -lp.sum() / lengths.sum()


def _whole_step(key, policy, ref, lengths, gold, gold_lengths):
    """The step's loss from the formulas (LOSSES.md), all examples at once."""
    lp_w, lp_l = policy[:, 0], policy[:, 1]
    if key == "sft":
        return 0.6 * _nll(lp_w, lengths[:, 0])
    if key == "cpo":
        return F.softplus(-0.2 * (lp_w - lp_l)).mean() + 0.6 * _nll(lp_w, lengths[:, 0])
    if key == "orpo":
        m_w, m_l = lp_w / lengths[:, 0], lp_l / lengths[:, 1]
        log_odds = (m_w - m_l) - (torch.log(-torch.expm1(m_w)) - torch.log(-torch.expm1(m_l)))
        return _nll(lp_w, lengths[:, 0]) - 0.3 * F.logsigmoid(log_odds).mean()
    if key == "tpo_triple":
        return F.softplus(-0.2 * (lp_w - lp_l)).mean() + 0.6 * _nll(gold, gold_lengths)
    if key == "dpo+sft":
        u = 0.2 * ((lp_w - ref[:, 0]) - (lp_l - ref[:, 1]))
        return F.softplus(-u).mean() + 0.6 * _nll(lp_w, lengths[:, 0])
    raise ValueError(key)


HPARAMS = {"sft": dict(alpha=0.6), "cpo": dict(beta=0.2, alpha=0.6), "orpo": dict(lam=0.3),
           "tpo_triple": dict(beta=0.2, alpha=0.6), "dpo+sft": dict(beta=0.2)}


def _call(key, policy, ref, lengths, gold, gold_lengths, **kw):
    if key == "tpo_triple":
        return preference_loss(key, policy, None, gold_logps=gold, gold_lengths=gold_lengths, **HPARAMS[key], **kw)
    if key == "dpo+sft":
        return preference_loss(key, policy, ref, lengths=lengths, loss_weights=[1.0, 0.6], **HPARAMS[key], **kw)
    return preference_loss(key, policy, None, lengths=lengths, **HPARAMS[key], **kw)


@pytest.mark.parametrize("key", list(HPARAMS))
def test_micro_batches_sum_to_the_whole_steps_token_mean(key):
    policy, ref, lengths, gold, gold_lengths = _batch()
    nll_lengths = gold_lengths if key == "tpo_triple" else lengths[:, 0]
    mean_length = nll_lengths.mean()

    p_ref = policy.clone().requires_grad_()
    expected = _whole_step(key, p_ref, ref, lengths, gold, gold_lengths)
    (g_expected,) = torch.autograd.grad(expected, p_ref)

    p = policy.clone().requires_grad_()
    accumulated = sum(
        _call(key, p[a:b], ref[a:b], lengths[a:b], gold[a:b], gold_lengths[a:b], nll_mean_length=mean_length).loss
        * ((b - a) / B)
        for a, b in SPLITS)
    (g,) = torch.autograd.grad(accumulated, p)
    torch.testing.assert_close(accumulated, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_expected, rtol=1e-12, atol=1e-14)

    # each micro-batch's own token mean, weighted the same way, is a different (wrong) step loss here
    per_micro = sum(_call(key, policy[a:b], ref[a:b], lengths[a:b], gold[a:b], gold_lengths[a:b]).loss * ((b - a) / B)
                    for a, b in SPLITS)
    assert abs(float(per_micro) - float(expected.detach())) > 1e-4 * abs(float(expected.detach()))


@pytest.mark.parametrize("key", list(HPARAMS))
def test_the_default_is_the_batchs_own_mean_length(key):
    policy, ref, lengths, gold, gold_lengths = _batch(1)
    nll_lengths = gold_lengths if key == "tpo_triple" else lengths[:, 0]
    default = _call(key, policy, ref, lengths, gold, gold_lengths)
    given = _call(key, policy, ref, lengths, gold, gold_lengths, nll_mean_length=nll_lengths.mean())
    torch.testing.assert_close(default.loss, given.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(default.loss, _whole_step(key, policy, ref, lengths, gold, gold_lengths),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("value,error,match", [
    (0.0, InputValueError, "nll_mean_length must be a positive finite"),
    (-3.0, InputValueError, "nll_mean_length must be a positive finite"),
    (float("nan"), InputValueError, "nll_mean_length must be a positive finite"),
    (float("inf"), InputValueError, "nll_mean_length must be a positive finite"),
    (torch.ones(2, dtype=DT), InputShapeError, r"input 'nll_mean_length' has shape \(2,\), expected \(\)"),
])
def test_a_bad_mean_length_is_refused(value, error, match):
    policy, _, lengths, _, _ = _batch()
    with pytest.raises(error, match=match):
        preference_loss("cpo", policy, None, lengths=lengths, nll_mean_length=value, check_finite=False)


def test_only_losses_with_a_token_mean_nll_take_it():
    policy, ref, _, _, _ = _batch()
    with pytest.raises(Exception, match="unexpected keyword 'nll_mean_length'"):
        preference_loss("dpo", policy, ref, nll_mean_length=4.0)
