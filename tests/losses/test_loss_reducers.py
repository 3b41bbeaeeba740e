"""Section 1 (reducers) and the token-weight helpers, against loop-based float64 references."""

from __future__ import annotations

import pytest
import torch

from pygpo.losses import (
    InputShapeError,
    InputValueError,
    bmc_token_weights,
    dmpo_token_weights,
    preference_loss,
    reduce,
    reduce_pair,
    sampled_mask,
    suffix_mask,
    tgdpo_token_weights,
)

B, K, T = 4, 2, 9


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -3 * torch.rand(B, K, T, generator=g, dtype=torch.float64)
    rp = lp + 0.3 * torch.randn(B, K, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, K, T, generator=g) < 0.7
    mask[..., 0] = True
    mask[0, 1, :] = False
    mask[0, 1, 3] = True  # a one-token response
    return lp, rp, mask


def loop_sum(x, m, w=None):
    out = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for b in range(x.shape[0]):
        for k in range(x.shape[1]):
            for t in range(x.shape[2]):
                if m[b, k, t]:
                    out[b, k] += x[b, k, t] * (1.0 if w is None else w[b, k, t])
    return out


def test_sum_and_mean():
    lp, _, m = data()
    torch.testing.assert_close(reduce("sum", lp, m), loop_sum(lp, m))
    torch.testing.assert_close(reduce("mean", lp, m), loop_sum(lp, m) / m.sum(-1))


def test_mean_needs_a_token():
    lp, _, m = data()
    m = m.clone()
    m[1, 0] = False
    with pytest.raises(InputValueError, match="no completion token"):
        reduce("mean", lp, m)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld(alpha):
    lp, _, m = data()
    out = reduce("ld", lp, m, alpha=alpha)
    exp = torch.zeros(B, K, dtype=torch.float64)
    for b in range(B):
        lp_len = min(int(m[b, 0].sum()), int(m[b, 1].sum()))
        for k in range(K):
            pos = 0
            for t in range(T):
                if m[b, k, t]:
                    pos += 1
                    exp[b, k] += lp[b, k, t] * (1.0 if pos <= lp_len else alpha)
    torch.testing.assert_close(out, exp)
    if alpha == 1.0:
        torch.testing.assert_close(out, reduce("sum", lp, m))


def test_ld_alpha_range():
    lp, _, m = data()
    with pytest.raises(Exception, match="alpha"):
        reduce("ld", lp, m, alpha=1.5)


def test_sampled_subset_properties():
    lp, rp, m = data()
    sub = sampled_mask(m, seed=3)
    assert torch.all(sub <= m)
    n = m.sum(-1)
    s = n.min(dim=1).values
    assert torch.equal(sub.sum(-1), s.unsqueeze(1).expand(B, K))
    shorter = n == s.unsqueeze(1)
    assert torch.equal(sub[shorter], m[shorter])  # the shorter response keeps all its tokens
    assert torch.equal(sampled_mask(m, seed=3), sub)  # seeded
    a, b = reduce_pair("sampled", lp, rp, m, seed=3)
    torch.testing.assert_close(a, loop_sum(lp, sub))
    torch.testing.assert_close(b, loop_sum(rp, sub))  # same subset for the reference
    torch.testing.assert_close(reduce("sampled", lp, m, seed=3), a)


def test_sampled_is_uniform_over_positions():
    m = torch.zeros(1, 2, 6, dtype=torch.bool)
    m[0, 0, :2] = True
    m[0, 1, :] = True
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    n = 1500
    for _ in range(n):
        counts += sampled_mask(m, generator=g)[0, 1].float()
    p = 2 / 6  # each position of the longer response is kept with probability S/|y| = 2/6
    assert torch.all((counts / n - p).abs() < 4 * (p * (1 - p) / n) ** 0.5)


def test_weighted_is_detached():
    lp, _, m = data()
    w = torch.rand(B, K, T, dtype=torch.float64, requires_grad=True)
    x = lp.clone().requires_grad_(True)
    out = reduce("weighted", x, m, weights=w)
    torch.testing.assert_close(out, loop_sum(lp, m, w.detach()))
    out.sum().backward()
    assert w.grad is None
    torch.testing.assert_close(x.grad, w.detach() * m)


def test_segments():
    lp, _, m = data()
    seg = torch.randint(-1, 3, (B, K, T), generator=torch.Generator().manual_seed(1))
    out = reduce("segments", lp, segment_ids=seg)
    exp = torch.zeros(B, K, 3, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            for t in range(T):
                if seg[b, k, t] >= 0:
                    exp[b, k, seg[b, k, t]] += lp[b, k, t]
    torch.testing.assert_close(out, exp)
    assert reduce("segments", lp, segment_ids=seg, num_segments=5).shape == (B, K, 5)


def test_reducers_upcast_bf16():
    lp, _, m = data()
    out = reduce("sum", lp.to(torch.bfloat16), m)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loop_sum(lp.to(torch.bfloat16).double(), m).float())


def test_reducer_shape_errors():
    lp, _, m = data()
    with pytest.raises(InputShapeError):
        reduce("sum", lp, m[..., :-1])
    with pytest.raises(InputValueError, match="reducer"):
        preference_loss("mean", lp[..., 0], lp[..., 0])
    with pytest.raises(InputValueError, match="not a reducer"):
        reduce("dpo", lp, m)


@pytest.mark.parametrize("name", ["sum", "mean", "ld", "weighted", "segments", "sampled"])
def test_reducer_gradcheck(name):
    lp, _, m = data()
    x = lp[:2].clone().requires_grad_(True)
    mm = m[:2]
    kw = {
        "ld": dict(alpha=0.4),
        "weighted": dict(weights=torch.rand(2, K, T, dtype=torch.float64)),
        "segments": dict(segment_ids=torch.randint(-1, 3, (2, K, T))),
        "sampled": dict(seed=5),
    }.get(name, {})
    if name == "segments":
        assert torch.autograd.gradcheck(lambda t: reduce(name, t, **kw), (x,))
    else:
        assert torch.autograd.gradcheck(lambda t: reduce(name, t, mm, **kw), (x,))


# ---- token weights ------------------------------------------------------------------------------


def test_bmc_weights():
    lp, _, m = data()
    diff = torch.rand(B, K, T) < 0.5
    w = bmc_token_weights(lp, diff, delta=3.0)
    exp = 1 + diff.double() * torch.minimum(1 / torch.exp(lp), torch.full_like(lp, 3.0))
    torch.testing.assert_close(w, exp)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_dmpo_weights(gamma):
    turn = torch.tensor([[0, 0, 1, 1, 2, -1]])
    w = dmpo_token_weights(turn, gamma=gamma)
    Tn = 3
    exp = []
    for j in turn[0].tolist():
        if j < 0:
            exp.append(0.0)
        elif gamma == 1.0:
            exp.append((Tn - j) / Tn)
        else:
            exp.append(gamma**j * (1 - gamma ** (Tn - j)) / (1 - gamma**Tn))
    torch.testing.assert_close(w, torch.tensor([exp], dtype=torch.float64))


def test_suffix_mask():
    m = torch.tensor([[False, True, True, False, True, True]])
    out = suffix_mask(m, torch.tensor([2]))
    assert out.tolist() == [[False, False, False, False, True, True]]


def test_tgdpo_weights_and_loss():
    lp, rp, m = data()
    guide = rp + 0.2 * torch.randn_like(rp)
    w = tgdpo_token_weights(guide, rp, beta=0.1, a=0.5)
    rh = guide - rp
    torch.testing.assert_close(w[:, 0], 0.1 * (1 + 0.5 * 0.1 * rh[:, 0]))
    torch.testing.assert_close(w[:, 1], 0.1 * (1 - 0.5 * 0.1 * rh[:, 1]))
    # ls(U_w - U_l) with U = sum_t w_t (lp_t - rp_t): the weighted reducer + dpo with beta = 1
    U = reduce("weighted", lp - rp, m, weights=w)
    out = preference_loss("dpo", U, torch.zeros_like(U), beta=1.0)
    Uw, Ul = loop_sum(lp - rp, m, w)[:, 0], loop_sum(lp - rp, m, w)[:, 1]
    torch.testing.assert_close(out.per_example, torch.log1p(torch.exp(-(Uw - Ul))))
