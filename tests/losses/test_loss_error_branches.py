"""Bad input to the loss registry's less-travelled paths: each error names the argument and what was
expected; and the feature paths beside them (tensor hyper-parameters, list inputs, explicit turn counts)
checked against float64 math written here."""

from __future__ import annotations

import math

import pytest
import torch

from pygpo.losses import (
    BCOLoss,
    BCOPairLoss,
    BetaDPOLoss,
    GroupRobustLoss,
    HyperParameterError,
    InputShapeError,
    InputValueError,
    MissingInputError,
    NonFiniteError,
    UnexpectedArgumentError,
    UnknownLossError,
    bmc_token_weights,
    dmpo_token_weights,
    get,
    preference_loss,
    reduce,
    reduce_pair,
    sampled_mask,
)
from pygpo.losses import HyperParameterTypeError

B, K, T = 4, 2, 5


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, K, generator=g, dtype=torch.float64), torch.randn(B, K, generator=g, dtype=torch.float64)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, K, T, generator=g), torch.ones(B, K, T, dtype=torch.bool)


def _dpo(lp, rp, beta=0.1):
    h = (lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1])
    return -torch.nn.functional.logsigmoid(beta * h)


# ---------------------------------------------------------------- names and weights (api.py)

def test_loss_weights_count_for_a_single_name(pair):
    with pytest.raises(HyperParameterError, match=r"loss_weights has 2 entries for 1 loss\(es\); valid: one weight per loss"):
        preference_loss("dpo", *pair, loss_weights=[1.0, 2.0])


def test_weights_in_mapping_and_loss_weights(pair):
    with pytest.raises(HyperParameterError, match="either in the name mapping or in loss_weights, not both"):
        preference_loss({"dpo": 1.0}, *pair, loss_weights=[1.0])


def test_loss_weights_count_for_a_list(pair):
    with pytest.raises(HyperParameterError, match=r"loss_weights has 1 entries for 2 loss\(es\)"):
        preference_loss(["dpo", "ipo"], *pair, loss_weights=[1.0])


@pytest.mark.parametrize("name", [[], {}], ids=["list", "mapping"])
def test_empty_name(pair, name):
    with pytest.raises(InputValueError, match=r"name is empty: give a loss key .*a list of keys or a \{key: weight\} mapping"):
        preference_loss(name, *pair)


def test_name_of_the_wrong_type(pair):
    with pytest.raises(TypeError, match=r"name must be a loss key \(str\), a sequence of keys .* got int"):
        preference_loss(3, *pair)
    with pytest.raises(TypeError, match="a loss name must be a string, got int"):
        get(3)


def test_dotted_keyword_targets_a_loss_outside_the_combination(pair):
    with pytest.raises(UnexpectedArgumentError, match=r"keyword 'simpo.beta' targets 'simpo', which is not part"):
        preference_loss("dpo+ipo", *pair, **{"simpo.beta": 0.1})


def test_combined_per_example_is_the_weighted_sum(pair):
    lp, rp = pair
    out = preference_loss({"dpo": 2.0, "ipo": 0.5}, lp, rp, **{"dpo.beta": 0.2, "ipo.length_normalize": False})
    h = (lp[:, 0] - rp[:, 0]) - (lp[:, 1] - rp[:, 1])
    ipo = (h - 1 / (2 * 0.1)) ** 2  # IPO's default beta (tau) = 0.1
    torch.testing.assert_close(out.per_example, 2.0 * _dpo(lp, rp, 0.2) + 0.5 * ipo)


def test_unknown_name_in_another_case_finds_the_key():
    with pytest.raises(UnknownLossError, match="closest names: 'simpo'"):
        get("SIMPO")


def test_spec_input_lookup_names_the_inputs():
    with pytest.raises(KeyError, match=r"dpo: no input 'nope'; its inputs: none"):
        get("dpo").input("nope")
    with pytest.raises(KeyError, match=r"odpo: no input 'nope'; its inputs: .*scores"):
        get("odpo").input("nope")


# ---------------------------------------------------------------- hyper-parameters (constraints.py, ...)

def test_hyper_parameter_that_is_not_a_number(pair):
    with pytest.raises(HyperParameterTypeError,
                       match=r"dpo: hyper-parameter beta='high' has type str; expected a real number; valid range: \(0, inf\)"):
        preference_loss("dpo", *pair, beta="high")


def test_zero_dim_tensor_hyper_parameter_is_a_number(pair):
    lp, rp = pair
    out = preference_loss("dpo", lp, rp, beta=torch.tensor(0.3))
    torch.testing.assert_close(out.per_example, _dpo(lp, rp, 0.3))


def test_sequence_hyper_parameter_that_is_not_a_sequence(pair):
    with pytest.raises(HyperParameterTypeError,
                       match=r"modpo: hyper-parameter w_rest=5 has type int; expected a sequence .*; valid range: a sequence"):
        preference_loss("modpo", *pair, margin_rewards=torch.randn(B, K), w_rest=5)


def test_modpo_weights_per_objective(pair):
    with pytest.raises(HyperParameterError, match=r"w_rest has 2 entries but margin_rewards has 1 objective"):
        preference_loss("modpo", *pair, margin_rewards=torch.randn(B, K), w_rest=[0.5, 0.5])


def test_group_sizes_per_group():
    with pytest.raises(HyperParameterError, match="GroupRobustLoss: group_sizes must hold 2 positive counts"):
        GroupRobustLoss(2, group_sizes=[1, 2, 3])


def test_stateful_losses_show_their_options():
    assert repr(BetaDPOLoss(beta=0.2)) == "BetaDPOLoss(beta=0.2, rho=0.2, a=0.6, decay=0.9, sync=True)"
    assert repr(BCOPairLoss(sync=False)) == "BCOPairLoss(beta=0.1, running_mean=True, sync=False)"
    assert repr(BCOLoss()) == "BCOLoss(beta=0.1, running_mean=True, sync=True)"
    assert repr(GroupRobustLoss(3)) == "GroupRobustLoss(num_groups=3, beta=0.1, eta_a=0.01, C=0.0, sync=True)"


# ---------------------------------------------------------------- per-example inputs (validation.py)

def test_scores_that_are_not_float_tensors(pair):
    lp, rp = pair
    with pytest.raises(InputShapeError, match="dpo: policy_logps must be a tensor, got list"):
        preference_loss("dpo", lp.tolist(), rp)
    with pytest.raises(InputShapeError, match="dpo: policy_logps must be a float tensor, got torch.int64"):
        preference_loss("dpo", lp.long(), rp)
    with pytest.raises(InputShapeError, match="dpo: ref_logps must be a float tensor of policy_logps' shape, got torch.int64"):
        preference_loss("dpo", lp, rp.long())


def test_empty_batch():
    with pytest.raises(InputShapeError, match=r"dpo: policy_logps has shape \(0, 2\), an empty batch \(B=0\)"):
        preference_loss("dpo", torch.zeros(0, 2), torch.zeros(0, 2))


def test_list_input_is_a_tensor(pair):
    lp, rp = pair
    lengths = [[3, 4], [5, 6], [2, 2], [7, 1]]
    got = preference_loss("sigmoid_norm", lp, rp, lengths=lengths)
    want = preference_loss("sigmoid_norm", lp, rp, lengths=torch.tensor(lengths))
    torch.testing.assert_close(got.per_example, want.per_example)


def test_input_that_is_not_a_tensor(pair):
    with pytest.raises(InputShapeError, match="sigmoid_norm: input 'lengths' must be a tensor, got str"):
        preference_loss("sigmoid_norm", *pair, lengths="abc")


def test_input_dtypes(pair):
    with pytest.raises(InputShapeError, match="odpo: input 'scores' must be a float tensor, got torch.complex64"):
        preference_loss("odpo", *pair, scores=torch.ones(B, K, dtype=torch.complex64))
    with pytest.raises(InputShapeError, match="group_robust: input 'groups' must be an integer tensor, got torch.float32"):
        preference_loss("group_robust", *pair, groups=torch.zeros(B), num_groups=2)


def test_group_weights_range_and_count(pair):
    groups = torch.zeros(B, dtype=torch.long)
    with pytest.raises(InputValueError, match="group_robust: group_weights must be >= 0$"):
        preference_loss("group_robust", *pair, groups=groups, group_weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(InputShapeError, match="group_robust: group_weights has 3 entries, num_groups=2"):
        preference_loss("group_robust", *pair, groups=groups, group_weights=torch.ones(3), num_groups=2)


def test_non_finite_scalar_input(pair):
    with pytest.raises(NonFiniteError, match=r"beta_dpo: input 'm0' is not finite \(nan\)"):
        preference_loss("beta_dpo", *pair, m0=torch.tensor(math.nan), sm=torch.tensor(1.0))


def test_non_finite_completion_token(tokens):
    tl, mask = tokens
    policy = tl.clone()
    policy[2, 1, 3] = math.nan
    kl = torch.zeros(B, K, T)
    with pytest.raises(NonFiniteError, match="tdpo1: non-finite value in policy_logps at example 2"):
        preference_loss("tdpo1", policy, torch.zeros(B, K, T), kl=kl, mask=mask)
    mask = mask.clone()
    mask[2, 1, 3] = False  # the NaN is padding now: not checked, not used
    out = preference_loss("tdpo1", policy, torch.zeros(B, K, T), kl=kl, mask=mask)
    assert torch.isfinite(out.loss)


def test_tdpo_kl_of_the_scores_shape(pair):
    with pytest.raises(InputShapeError, match=r"tdpo1: kl must have the shape of the scores \(\(4, 2\)\), got \(4, 2, 5\)"):
        preference_loss("tdpo1", *pair, kl=torch.zeros(B, K, T))


def test_beta_dpo_degenerate_spread_draws_uniformly(pair):
    """An EMA spread so small that the Gaussian weights overflow falls back to a uniform draw: the same
    subset as sm=0 (no spread) with the same generator."""
    lp, rp = pair

    def selected(sm):
        g = torch.Generator().manual_seed(5)
        out = preference_loss("beta_dpo", lp, rp, m0=torch.tensor(0.0, dtype=torch.float64),
                              sm=torch.tensor(sm, dtype=torch.float64), generator=g)
        return out.metrics["selected"]

    tiny = selected(1e-200)  # sm**2 underflows to 0: weights -inf or nan
    assert int(tiny.sum()) == math.floor((1 - 0.2) * B)
    assert torch.equal(tiny, selected(0.0))


# ---------------------------------------------------------------- reducers (reducers.py)

def test_reducer_shapes(tokens):
    tl, mask = tokens
    with pytest.raises(InputShapeError, match=r"ld reducer: token_logps must have shape \(B, K, T\), got \(4, 5\)"):
        reduce("ld", tl[:, 0], mask[:, 0])
    with pytest.raises(InputShapeError, match=r"sampled reducer: mask must have shape \(B, K, T\), got \(4, 5\)"):
        reduce("sampled", tl[:, 0], mask[:, 0])
    with pytest.raises(InputShapeError, match=r"sampled reducer: mask must have shape \(B, K, T\), got \(4, 5\)"):
        sampled_mask(mask[:, 0])
    with pytest.raises(InputShapeError, match=r"weights must have the per-token values' shape \(4, 2, 5\), got \(4, 2\)"):
        reduce("weighted", tl, mask, weights=torch.ones(B, K))
    with pytest.raises(InputShapeError, match=r"ref_token_logps must have policy_token_logps' shape \(4, 2, 5\), got \(4, 2, 3\)"):
        reduce_pair("sum", tl, tl[..., :3], mask)


def test_reducer_missing_inputs(tokens):
    tl, _ = tokens
    with pytest.raises(MissingInputError, match=r"reducer 'sum' needs mask= \(bool, the per-token values' shape \(4, 2, 5\)\)"):
        reduce("sum", tl)
    with pytest.raises(MissingInputError, match=r"reducer 'segments' needs segment_ids= \(integer"):
        reduce("segments", tl)


def test_segment_ids(tokens):
    tl, _ = tokens
    with pytest.raises(InputShapeError, match=r"segment_ids must have the per-token values' shape \(4, 2, 5\), got \(4, 2\)"):
        reduce("segments", tl, segment_ids=torch.zeros(B, K, dtype=torch.long))
    with pytest.raises(InputShapeError, match="segment_ids must be an integer tensor, got torch.float32"):
        reduce("segments", tl, segment_ids=torch.zeros(B, K, T))
    with pytest.raises(InputValueError, match="segment_ids contain an id >= num_segments=2"):
        reduce("segments", tl, segment_ids=torch.full((B, K, T), 3), num_segments=2)


# ---------------------------------------------------------------- token weights (token_weights.py)

def test_token_weight_options(tokens):
    tl, mask = tokens
    with pytest.raises(ValueError, match=r"bmc_token_weights: delta=0.0 must be > 0"):
        bmc_token_weights(tl, mask, delta=0.0)
    with pytest.raises(ValueError, match=r"dmpo_token_weights: gamma=1.5 must be in \(0, 1\]"):
        dmpo_token_weights(torch.zeros(2, 3, dtype=torch.long), gamma=1.5)


@pytest.mark.parametrize("gamma", [0.7, 1.0])
@pytest.mark.parametrize("per_row", [False, True])
def test_dmpo_weights_with_explicit_turn_counts(gamma, per_row):
    turns = torch.tensor([[0, 0, 1, -1, 2], [0, 1, 1, 1, -1]])
    num_turns = [4, 5] if per_row else 4
    w = dmpo_token_weights(turns, gamma=gamma, num_turns=torch.tensor(num_turns) if per_row else num_turns)
    want = []
    for r, row in enumerate(turns.tolist()):
        n = num_turns[r] if per_row else num_turns
        want.append([0.0 if j < 0 else ((n - j) / n if gamma == 1.0 else gamma**j * (1 - gamma ** (n - j)) / (1 - gamma**n))
                     for j in row])
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("aliases", [("dpo",), ("sigmoid_dpo_twice", "sigmoid_dpo_twice")])
def test_refused_alias_leaves_nothing_registered(aliases):
    from pygpo.losses import names
    from pygpo.losses.registry import register

    before = list(names())
    deco = register("audit_only_head", section=0, kind="pairwise", paper="-", formula="-",
                    aliases=aliases)
    with pytest.raises(ValueError, match=r"audit_only_head: alias '(dpo|sigmoid_dpo_twice)' registered twice"):
        deco(lambda *a, **k: None)
    assert list(names()) == before and "audit_only_head" not in names()
    with pytest.raises(UnknownLossError):
        get("audit_only_head")
