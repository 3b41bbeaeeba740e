"""Bad input is rejected before anything is computed, with messages that name the problem."""

from __future__ import annotations

import pytest
import torch

from loss_cases import cases
from pygpo.losses import (
    HyperParameterError,
    InputShapeError,
    InputValueError,
    MissingInputError,
    NonFiniteError,
    PreferenceLossError,
    UnexpectedArgumentError,
    UnknownLossError,
    get,
    preference_loss,
)


@pytest.fixture
def pair():
    c = cases("dpo")[0]
    return c.policy, c.ref


def test_unknown_name_lists_closest(pair):
    lp, rp = pair
    with pytest.raises(UnknownLossError) as exc:
        preference_loss("dpoo", lp, rp)
    msg = str(exc.value)
    assert "'dpoo'" in msg and "'dpo'" in msg
    with pytest.raises(UnknownLossError, match="'simpo'"):
        get("simpoo")
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, ValueError)
    assert "dpo" in exc.value.close


@pytest.mark.parametrize(
    "key,missing,kwargs",
    [
        ("todo", "ties", {}),
        ("odpo", "scores", {}),
        ("reward_aware", "rewards", {}),
        ("mappo", "rewards", {}),
        ("sppo", "win_probs", {}),
        ("inpo", "prev_ref_logps", {}),
        ("sigmoid_norm", "lengths", {}),
        ("kto", "kl_logps", {"labels": torch.ones(5, dtype=torch.bool)}),
        ("tdpo1", "kl", {}),
    ],
)
def test_missing_input_is_named(pair, key, missing, kwargs):
    lp, rp = pair
    if key == "kto":
        lp, rp = lp[:, 0], rp[:, 0]
    with pytest.raises(MissingInputError, match=missing):
        preference_loss(key, lp, rp, **kwargs)


def test_missing_reference(pair):
    with pytest.raises(MissingInputError, match="ref_logps"):
        preference_loss("dpo", pair[0])


def test_reference_given_to_reference_free_loss(pair):
    with pytest.raises(InputShapeError, match="reference-free"):
        preference_loss("simpo", pair[0], pair[1], lengths=torch.ones_like(pair[0]))


def test_ipo_needs_lengths_when_normalising(pair):
    with pytest.raises(MissingInputError, match="lengths"):
        preference_loss("ipo", *pair)


@pytest.mark.parametrize(
    "key,kwargs,param,valid",
    [
        ("dpo", {"beta": 0.0}, "beta", "(0, inf)"),
        ("dpo", {"beta": -1.0}, "beta", "(0, inf)"),
        ("cdpo", {"eps": 0.7}, "eps", "[0, 0.5]"),
        ("robust", {"eps": 0.5}, "eps", "[0, 0.5)"),
        ("exo", {"eps": 0.0}, "eps", "(0, 1)"),
        ("todo", {"theta": 0.0, "ties": torch.zeros(5, dtype=torch.bool)}, "theta", "(-inf, 0)"),
        ("dpo_shift", {"lam": 0.0}, "lam", "(0, 1]"),
        ("fdpo", {"divergence": "alpha", "alpha": 1.0}, "alpha", "(0, 1)"),
        ("fdpo", {"divergence": "hellinger"}, "divergence", "one of"),
        ("reward_aware", {"mode": "l2", "rewards": torch.zeros(5, 2)}, "mode", "one of"),
        ("ipo", {"length_normalize": 1, "lengths": torch.ones(5, 2)}, "length_normalize", "True, False"),
    ],
)
def test_hyperparameter_out_of_range(pair, key, kwargs, param, valid):
    with pytest.raises(HyperParameterError) as exc:
        preference_loss(key, *pair, **kwargs)
    msg = str(exc.value)
    assert f"{param}=" in msg and valid in msg


def test_nan_beta_rejected(pair):
    with pytest.raises(HyperParameterError, match="beta"):
        preference_loss("dpo", *pair, beta=float("nan"))


def test_unexpected_keyword_lists_valid_ones(pair):
    with pytest.raises(UnexpectedArgumentError, match="beta"):
        preference_loss("dpo", *pair, gamma=0.1)


@pytest.mark.parametrize(
    "shape_p,shape_r",
    [((5, 3), (5, 3)), ((5,), (5,)), ((5, 2), (4, 2)), ((5, 2, 1), (5, 2, 1))],
)
def test_pair_shapes(shape_p, shape_r):
    with pytest.raises(InputShapeError):
        preference_loss("dpo", torch.zeros(shape_p), torch.zeros(shape_r))


def test_input_shape_must_follow_batch(pair):
    with pytest.raises(InputShapeError, match="lengths"):
        preference_loss("sigmoid_norm", *pair, lengths=torch.ones(4, 2))
    with pytest.raises(InputShapeError, match="ties"):
        preference_loss("todo", *pair, ties=torch.zeros(5, 2, dtype=torch.bool))


def test_multi_response_shapes():
    p = torch.zeros(3, 4)
    with pytest.raises(InputShapeError, match="rewards"):
        preference_loss("mpo", p, p, rewards=torch.zeros(3, 5))
    with pytest.raises(InputValueError, match="at least 2 valid"):
        preference_loss("mpo", p, p, rewards=torch.zeros(3, 4), valid=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]))


def test_token_inputs_must_agree():
    c = cases("tdpo1")[0]
    with pytest.raises(InputShapeError, match="kl"):
        preference_loss("tdpo1", c.policy, c.ref, kl=c.kwargs["kl"][..., :-1], mask=c.kwargs["mask"])
    with pytest.raises(MissingInputError, match="mask"):
        preference_loss("tdpo1", c.policy, c.ref, kl=c.kwargs["kl"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_names_example(pair, bad):
    lp, rp = pair
    lp = lp.clone()
    lp[3, 1] = bad
    with pytest.raises(NonFiniteError, match="policy_logps at example 3"):
        preference_loss("dpo", lp, rp)
    out = preference_loss("dpo", lp, rp, check_finite=False)  # opt-out: computed as given
    expected = torch.log1p(torch.exp(-0.1 * ((lp[3, 0] - rp[3, 0]) - (lp[3, 1] - rp[3, 1]))))
    torch.testing.assert_close(out.per_example[3], expected, equal_nan=True)


def test_non_finite_input(pair):
    r = torch.rand(5, 2)
    r[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'rewards' at example 1"):
        preference_loss("reward_aware", *pair, rewards=r)


def test_domain_checks(pair):
    lp, rp = pair
    s = torch.tensor([[2.0, 1.0], [1.0, 1.0], [3.0, 0.5], [2.0, 1.0], [2.0, 1.0]])
    with pytest.raises(InputValueError, match="example 1"):
        preference_loss("odpo", lp, rp, scores=s)
    s2 = s.clone()
    s2[1] = torch.tensor([1.0, -0.5])
    preference_loss("odpo", lp, rp, scores=s2)  # diff offset: only s_w > s_l needed
    with pytest.raises(InputValueError, match="example 1"):
        preference_loss("odpo", lp, rp, scores=s2, offset="ratio")
    with pytest.raises(InputValueError, match=r"\[0, 1\]"):
        preference_loss("mappo", lp, rp, rewards=torch.full((5, 2), 2.0))
    with pytest.raises(InputValueError, match="lengths"):
        preference_loss("sigmoid_norm", lp, rp, lengths=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]]))
    with pytest.raises(InputValueError, match="boolean"):
        preference_loss("todo", lp, rp, ties=torch.tensor([0, 1, 2, 0, 0]))


def test_all_errors_are_value_errors():
    for cls in (HyperParameterError, InputShapeError, InputValueError, MissingInputError, NonFiniteError, UnknownLossError):
        assert issubclass(cls, PreferenceLossError) and issubclass(cls, ValueError)


def test_validation_before_compute(monkeypatch, pair):
    import dataclasses

    from pygpo.losses import registry

    called = []

    def spy(*args, **kwargs):
        called.append(1)
        raise RuntimeError("head ran")

    monkeypatch.setitem(registry._REGISTRY, "dpo", dataclasses.replace(get("dpo"), fn=spy))
    lp = pair[0].clone()
    lp[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        preference_loss("dpo", lp, pair[1])
    with pytest.raises(HyperParameterError):
        preference_loss("dpo", *pair, beta=0.0)
    with pytest.raises(InputShapeError):
        preference_loss("dpo", pair[0][:, :1], pair[1][:, :1])
    assert not called
    with pytest.raises(RuntimeError, match="head ran"):
        preference_loss("dpo", *pair)
    assert called


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_upcast(pair, dtype):
    lp, rp = (x.to(dtype) for x in pair)
    out = preference_loss("dpo", lp, rp, beta=0.3)
    assert out.loss.dtype == torch.float32 and out.per_example.dtype == torch.float32
    exact = preference_loss("dpo", lp.double(), rp.double(), beta=0.3)
    torch.testing.assert_close(out.per_example.double(), exact.per_example, rtol=1e-6, atol=1e-7)


def test_float32_kept_float64_kept(pair):
    lp, rp = pair
    assert preference_loss("dpo", lp.float(), rp.float()).loss.dtype == torch.float32
    assert preference_loss("dpo", lp, rp).loss.dtype == torch.float64
    assert preference_loss("dpo", lp.float(), rp).loss.dtype == torch.float64


def test_inputs_follow_the_scores_dtype(pair):
    lp, rp = (x.float() for x in pair)
    out = preference_loss("reward_aware", lp, rp, rewards=torch.rand(5, 2, dtype=torch.float64))
    assert out.loss.dtype == torch.float32
