"""Inputs on the wrong device, hyper-parameters that are not finite real numbers, and combined-loss
weights or keys that make no sense are refused before any compute, with errors naming the loss, the
argument and what is accepted; legitimate values (every registry default, every documented choice,
0-d tensors and numpy scalars) still pass, and reach the head as Python numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pygpo
from loss_cases import cases
from pygpo.losses import (
    HyperParameterError,
    InputShapeError,
    InputValueError,
    PreferenceLossError,
    get,
    names,
    preference_loss,
    validate,
)
from pygpo.losses.constraints import AnyValue, FloatSequence, Interval, OneOf
from pygpo.losses import HyperParameterTypeError
from pygpo.losses.validation import prepare, resolve_hparams

DT = torch.float64
B = 4


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(3)
    lp = -5.0 - 10.0 * torch.rand(B, 2, generator=g, dtype=DT)
    return lp, lp + torch.randn(B, 2, generator=g, dtype=DT)


def _margin(lp, rp):
    return (lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1])


def _dpo(lp, rp, beta=0.1):
    return -torch.nn.functional.logsigmoid(beta * _margin(lp, rp))


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _device_error(name: str) -> str:
    return rf"{name} is on device meta, policy_logps on cpu; every tensor input must be on policy_logps' device"


# ------------------------------------------------------------------ devices (item 1)

def test_reference_on_another_device(pair):
    lp, rp = pair
    with pytest.raises(InputShapeError, match=r"^dpo: " + _device_error("ref_logps")):
        preference_loss("dpo", lp, _meta(rp))


def test_lengths_on_another_device(pair):
    with pytest.raises(InputShapeError, match=r"^simpo: " + _device_error("input 'lengths'")):
        preference_loss("simpo", pair[0], lengths=torch.ones(B, 2, device="meta"))


def test_per_example_input_and_mask_on_another_device(pair):
    lp, rp = pair
    with pytest.raises(InputShapeError, match=r"^odpo: " + _device_error("input 'scores'")):
        preference_loss("odpo", lp, rp, scores=torch.ones(B, 2, device="meta"))
    c = cases("sparsepo")[0]
    for name in ("mask", "kl", "mu"):
        kwargs = dict(c.kwargs, **{name: _meta(c.kwargs[name])})
        with pytest.raises(InputShapeError, match=r"^sparsepo: " + _device_error(f"input '{name}'")):
            preference_loss("sparsepo", c.policy, c.ref, **kwargs)


def _tensor_inputs(key: str):
    """``(case, name)`` for every tensor input (and the reference) of the first case of ``key``."""
    spec = get(key)
    c = cases(key)[0]
    found = [("ref_logps", c.ref)] if c.ref is not None else []
    found += [(n, v) for n, v in c.kwargs.items() if isinstance(v, torch.Tensor) and n not in spec.defaults]
    return c, [n for n, _ in found]


@pytest.mark.parametrize("key", [k for k in names() if get(k).kind != "reducer"])
def test_every_tensor_input_of_every_head_must_share_the_policy_device(key):
    c, inputs = _tensor_inputs(key)
    for name in inputs:
        ref = _meta(c.ref) if name == "ref_logps" else c.ref
        kwargs = {n: _meta(v) if n == name else v for n, v in c.kwargs.items()}
        label = "ref_logps" if name == "ref_logps" else f"input '{name}'"
        with pytest.raises(InputShapeError, match=rf"^{key}: " + _device_error(label)):
            preference_loss(key, c.policy, ref, **kwargs)


def test_a_zero_dim_cpu_tensor_follows_the_policy_device():
    # a CPU scalar beside tensors of another device, as torch accepts it (here the policy is on meta)
    policy = torch.empty(B, 2, device="meta")
    prep = prepare(get("bco_pair"), policy, policy, lengths=None, hparams={}, inputs={"delta": torch.tensor(0.1)},
                   check_finite_values=False)
    assert prep.inputs["delta"].device.type == "meta"
    # a 0-d tensor on another device than the CPU, or a CPU tensor with dimensions, is refused
    with pytest.raises(InputShapeError, match=r"^bco_pair: " + _device_error("input 'delta'")):
        validate("bco_pair", torch.zeros(B, 2), torch.zeros(B, 2), delta=torch.tensor(0.1, device="meta"))
    with pytest.raises(InputShapeError, match=r"^odpo: input 'scores' is on device cpu, policy_logps on meta"):
        prepare(get("odpo"), policy, policy, lengths=None, hparams={}, inputs={"scores": torch.ones(B, 2)},
                check_finite_values=False)


def test_device_error_through_the_fused_module():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(4, 5, 6, generator=g), torch.randn(11, 6, generator=g)
    y = torch.randint(0, 11, (4, 5), generator=g)
    y[:, 0] = -100
    f = pygpo.FusedPreferenceLoss("odpo")
    with pytest.raises(InputShapeError, match=r"^odpo: " + _device_error("input 'scores'")):
        f(h, W, y, ref_logps=torch.zeros(2, 2), scores=torch.ones(2, 2, device="meta"))


# ------------------------------------------------------------------ hyper-parameters (item 3)

@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, np.float64(np.inf), torch.tensor(math.inf)])
def test_non_finite_hyper_parameter(pair, value):
    with pytest.raises(HyperParameterError, match=r"^dpo: hyper-parameter beta=.* is not finite; valid range: \(0, inf\)$"):
        preference_loss("dpo", *pair, beta=value)


def test_non_finite_value_of_an_unbounded_range(pair):
    with pytest.raises(HyperParameterError, match=r"^simpo: hyper-parameter gamma=inf is not finite; valid range: \(-inf, inf\)"):
        preference_loss("simpo", pair[0], lengths=torch.ones(B, 2), gamma=math.inf)


@pytest.mark.parametrize(
    "value,what",
    [("0.1", "type str"), (True, "type bool"), (np.bool_(True), "type bool"), (0.1 + 0j, "type complex"),
     (torch.tensor([0.1, 0.2]), r"tensor of shape \(2,\)"), (torch.tensor(True), "torch.bool tensor"),
     (torch.tensor(0.1, requires_grad=True), "requires grad"), (torch.tensor(0.1, device="meta"), "meta device"),
     (None, "is None")],
)
def test_hyper_parameter_of_the_wrong_type(pair, value, what):
    with pytest.raises(HyperParameterTypeError, match=rf"^dpo: hyper-parameter beta=.*{what}.*expected a .*real number.*; "
                                                      r"valid range: \(0, inf\)$") as exc:
        preference_loss("dpo", *pair, beta=value)
    assert isinstance(exc.value, TypeError) and isinstance(exc.value, PreferenceLossError)


def test_integral_hyper_parameter():
    spec = get("segments")
    with pytest.raises(HyperParameterError, match=r"^segments: hyper-parameter num_segments=2.5 is not an integer; "
                                                  r"valid range: an integer in \[1, inf\) or None"):
        resolve_hparams(spec, {"num_segments": 2.5})
    with pytest.raises(HyperParameterTypeError, match=r"num_segments=True has type bool; expected an integer"):
        resolve_hparams(spec, {"num_segments": True})
    with pytest.raises(HyperParameterError, match=r"num_segments=0 is out of range; valid range: an integer in \[1, inf\)"):
        resolve_hparams(spec, {"num_segments": 0})
    for given in (3, 3.0, np.int64(3), torch.tensor(3)):
        count = resolve_hparams(spec, {"num_segments": given})["num_segments"]
        assert count == 3 and type(count) is int


def test_choices_are_typed(pair):
    with pytest.raises(HyperParameterTypeError, match=r"^ipo: hyper-parameter length_normalize=1 has type int; expected bool; "
                                                      r"valid range: one of True, False"):
        preference_loss("ipo", *pair, length_normalize=1, lengths=torch.ones(B, 2))
    with pytest.raises(HyperParameterTypeError, match=r"^fdpo: hyper-parameter divergence=3 has type int; expected str"):
        preference_loss("fdpo", *pair, divergence=3)
    with pytest.raises(HyperParameterError, match=r"divergence='hellinger' is not one of the accepted values; valid range: one of") as exc:
        preference_loss("fdpo", *pair, divergence="hellinger")
    assert not isinstance(exc.value, TypeError)


def test_sequence_hyper_parameter(pair):
    m = torch.randn(B, 2, 2, dtype=DT)
    with pytest.raises(HyperParameterTypeError, match=r"^modpo: hyper-parameter w_rest='12' has type str; expected a sequence"):
        preference_loss("modpo", *pair, margin_rewards=m, w_rest="12")
    with pytest.raises(HyperParameterTypeError, match=r"w_rest=\[0.5, True\] has type bool"):
        preference_loss("modpo", *pair, margin_rewards=m, w_rest=[0.5, True])
    with pytest.raises(HyperParameterError, match=r"w_rest=\[0.5, nan\] has a non-finite entry; valid range: a sequence of finite"):
        preference_loss("modpo", *pair, margin_rewards=m, w_rest=[0.5, math.nan])
    assert resolve_hparams(get("modpo"), {"w_rest": torch.tensor([0.25, 0.5])})["w_rest"] == (0.25, 0.5)


def test_the_head_receives_python_numbers(pair):
    lp, rp = pair
    given = {"beta": torch.tensor(0.25, dtype=DT), "eps": np.float32(0.125)}
    prep = prepare(get("cdpo"), lp, rp, lengths=None, hparams=given, inputs={}, check_finite_values=True)
    assert prep.hparams == {"beta": 0.25, "eps": 0.125}
    assert all(type(v) is float for v in prep.hparams.values())
    out = preference_loss("dpo", lp, rp, beta=np.float32(0.25))
    torch.testing.assert_close(out.per_example, _dpo(lp, rp, 0.25))


@pytest.mark.parametrize("key", names())
def test_every_default_and_documented_choice_is_accepted(key):
    """The registry walked: defaults, the defaults given explicitly, every choice of a fixed set, and an
    interval's default as a 0-d tensor or numpy scalar all pass, unchanged in value and type."""
    spec = get(key)
    assert resolve_hparams(spec, {}) == dict(spec.defaults)
    explicit = resolve_hparams(spec, dict(spec.defaults))
    for name, default in spec.defaults.items():
        assert type(explicit[name]) is type(default), (key, name)
        rng = spec.ranges[name]
        assert isinstance(rng, (Interval, OneOf, AnyValue, FloatSequence))
        if isinstance(rng, OneOf):
            for choice in rng.values:
                assert resolve_hparams(spec, {name: choice})[name] == choice
        if isinstance(rng, Interval) and default is not None:
            for wrapped in (torch.tensor(default, dtype=DT), np.float64(default)):
                got = resolve_hparams(spec, {name: wrapped})[name]
                assert got == default and type(got) is type(default), (key, name, wrapped)


@pytest.mark.parametrize("key", names())
def test_no_interval_admits_infinity_and_errors_name_key_parameter_and_range(key):
    spec = get(key)
    for name, rng in spec.ranges.items():
        if not isinstance(rng, Interval):
            continue
        assert not rng.allow_inf  # no registered hyper-parameter has a meaning at +-inf
        for bad in (math.inf, -math.inf, math.nan):
            with pytest.raises(HyperParameterError) as exc:
                resolve_hparams(spec, {name: bad})
            msg = str(exc.value)
            assert msg.startswith(f"{key}: hyper-parameter {name}={bad!r} is not finite; valid range: "), msg
            assert msg.endswith(rng.describe()) and ("inf" in msg.rpartition("valid range: ")[2]) == (
                math.isinf(rng.lo) or math.isinf(rng.hi)), msg
        with pytest.raises(HyperParameterTypeError, match=rf"^{key}: hyper-parameter {name}='1' has type str"):
            resolve_hparams(spec, {name: "1"})


def test_an_interval_may_opt_in_to_infinity():
    rng = Interval(0.0, math.inf, lo_closed=False, allow_inf=True)
    assert rng.convert(math.inf) == math.inf and rng.describe() == "(0, inf]"
    assert not rng.check(math.nan) and not rng.check(-math.inf)
    assert not Interval(0.0, math.inf, hi_closed=False, allow_inf=True).check(math.inf)


def test_fused_module_checks_hyper_parameters_at_construction():
    with pytest.raises(HyperParameterError, match=r"^dpo: hyper-parameter beta=inf is not finite; valid range: \(0, inf\)"):
        pygpo.FusedPreferenceLoss("dpo", beta=math.inf)
    with pytest.raises(HyperParameterTypeError, match=r"^dpo: hyper-parameter beta='0.1' has type str"):
        pygpo.FusedPreferenceLoss("dpo+sft", **{"dpo.beta": "0.1"})
    with pytest.raises(HyperParameterError, match=r"^ld: hyper-parameter alpha=nan is not finite; valid range: \[0, 1\]"):
        pygpo.FusedPreferenceLoss("dpo", reducer="ld", reducer_args={"alpha": math.nan})
    with pytest.raises(HyperParameterError, match=r"BetaDPOLoss: hyper-parameter beta=inf is not finite"):
        pygpo.FusedPreferenceLoss("beta_dpo", beta=math.inf)  # the stateful head's own check


# ------------------------------------------------------------------ combined losses (item 10)

@pytest.mark.parametrize("weight,why", [(math.nan, "is not finite"), (math.inf, "is not finite"), (-0.5, "is out of range")])
def test_bad_loss_weight(pair, weight, why):
    with pytest.raises(HyperParameterError, match=rf"^loss weight dpo={weight!r} {why}; valid range: \[0, inf\)$"):
        preference_loss({"dpo": weight, "sft": 1.0}, *pair)
    with pytest.raises(HyperParameterError, match=rf"^loss weight ipo={weight!r} {why}"):
        preference_loss("dpo+ipo", *pair, loss_weights=[1.0, weight])
    with pytest.raises(HyperParameterError, match=rf"^loss weight dpo={weight!r} {why}"):
        preference_loss("dpo", *pair, loss_weights=[weight])


@pytest.mark.parametrize("weight", ["1", True])
def test_loss_weight_of_the_wrong_type(pair, weight):
    with pytest.raises(HyperParameterTypeError, match=rf"^loss weight dpo={weight!r} has type {type(weight).__name__}; "
                                                      r"expected a real number"):
        preference_loss(["dpo", "sft"], *pair, loss_weights=[weight, 1.0])


def test_zero_weight_logs_the_component_without_training_on_it(pair):
    lp, rp = pair
    out = preference_loss({"dpo": 0.0, "ipo": 2.0}, lp, rp, **{"ipo.length_normalize": False})
    ipo = (_margin(lp, rp) - 1 / (2 * 0.1)) ** 2  # IPO with its default beta (tau) = 0.1
    torch.testing.assert_close(out.per_example, 2.0 * ipo)
    torch.testing.assert_close(out.loss, 2.0 * ipo.mean())
    torch.testing.assert_close(out.metrics["loss/dpo"], _dpo(lp, rp).mean())


def test_all_weights_zero(pair):
    with pytest.raises(HyperParameterError, match=r"^every loss weight is 0 \(dpo=0, sft=0\): the loss would be 0 and "
                                                  r"train nothing; give at least one component a weight > 0$"):
        preference_loss({"dpo": 0.0, "sft": 0}, *pair)
    with pytest.raises(HyperParameterError, match=r"^every loss weight is 0 \(dpo=0\)"):
        preference_loss("dpo", *pair, loss_weights=[0.0])


@pytest.mark.parametrize(
    "name,weights,spelled,total",
    [("dpo+dpo", None, "'dpo', 'dpo'", "2"), (["dpo", "sigmoid"], [0.5, 0.25], "'dpo', 'sigmoid'", "0.75"),
     ({"sigmoid": 1.0, "dpo": 1.0, "sft": 1.0}, None, "'sigmoid', 'dpo'", "2")],
)
def test_a_key_repeated_in_a_combination(pair, name, weights, spelled, total):
    with pytest.raises(InputValueError, match=rf"^loss 'dpo' appears 2 times in the combination \({spelled}\); give each loss "
                                              rf"once and scale it with a weight: \{{'dpo': {total}\}}$"):
        preference_loss(name, *pair, loss_weights=weights)
    with pytest.raises(InputValueError, match="appears 2 times"):
        pygpo.FusedPreferenceLoss(name, loss_weights=weights)
