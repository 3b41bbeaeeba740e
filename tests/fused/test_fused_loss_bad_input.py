"""FusedPreferenceLoss refuses bad input with an error naming what is wrong, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import pygpo
from pygpo.fused import ReferenceInputError, ResponseIndexError
from pygpo.losses import HyperParameterError, UnknownLossError

from fused_reference import rows_problem

B, K = 3, 2


@pytest.fixture
def p():
    return rows_problem(B, K, seed=0)


def _ref(p):
    return dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)


def test_response_index_of_the_wrong_shape(p):
    with pytest.raises(ResponseIndexError, match=r"one entry per row of labels, shape \(6,\)"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, torch.arange(5), **_ref(p))


def test_response_index_out_of_range_or_repeated(p):
    with pytest.raises(ResponseIndexError, match=r"must lie in \[0, 6\)"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, torch.arange(1, 7), **_ref(p))
    with pytest.raises(ResponseIndexError, match="exactly once"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, torch.tensor([0, 1, 2, 3, 4, 4]), **_ref(p))
    with pytest.raises(TypeError, match="response_index must be an integer tensor"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, torch.arange(6.0), **_ref(p))


def test_odd_number_of_rows_for_pairs(p):
    with pytest.raises(ResponseIndexError, match="not a multiple of responses_per_example=2"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden[:5], p.weight, p.labels[:5], ref_hidden=p.ref_hidden[:5],
                                         ref_weight=p.ref_weight)


def test_response_without_any_target_token(p):
    labels = p.labels.clone()
    labels[4] = -100  # row 4 = rank 1 (rejected) of example 1
    with pytest.raises(ResponseIndexError, match="response 1 of example 1 has no target token"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, labels, **_ref(p))


def test_token_rows_need_a_response_index(p):
    valid = p.labels != -100
    with pytest.raises(ResponseIndexError, match="need response_index"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden[valid], p.weight, p.labels[valid],
                                         ref_hidden=p.ref_hidden[valid], ref_weight=p.ref_weight)


def test_reference_given_in_two_forms(p):
    with pytest.raises(ReferenceInputError, match="several forms at once"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, **_ref(p), ref_logps=torch.zeros(B, K))


def test_reference_missing_or_unusable(p):
    with pytest.raises(ReferenceInputError, match="needs a reference"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels)
    with pytest.raises(ReferenceInputError, match="reference-free"):
        pygpo.FusedPreferenceLoss("simpo")(p.hidden, p.weight, p.labels, **_ref(p))
    with pytest.raises(ReferenceInputError, match="without ref_hidden"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, ref_weight=p.ref_weight)
    with pytest.raises(ReferenceInputError, match="ref_hidden needs ref_weight"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden)
    with pytest.raises(ReferenceInputError, match="token KL over the vocabulary"):
        pygpo.FusedPreferenceLoss("tdpo1")(p.hidden, p.weight, p.labels, ref_logps=torch.zeros(B, K))
    with pytest.raises(ReferenceInputError, match=r"must have shape \(3, 2\)"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, ref_logps=torch.zeros(B, 3))
    with pytest.raises(ReferenceInputError, match="needs per-token reference log-probs"):
        pygpo.FusedPreferenceLoss("dpo", reducer="ld")(p.hidden, p.weight, p.labels, ref_logps=torch.zeros(B, K))
    with pytest.raises(ReferenceInputError, match="ref_token_logps must have the labels' shape"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, ref_token_logps=torch.zeros(7))


def test_labels_shape_and_missing_inputs(p):
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels[:, :-1], **_ref(p))
    with pytest.raises(pygpo.losses.MissingInputError, match="ties"):
        pygpo.FusedPreferenceLoss("todo")(p.hidden, p.weight, p.labels, **_ref(p))
    with pytest.raises(ValueError, match="unexpected input"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, **_ref(p), ties=torch.zeros(B, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs token_weights"):
        pygpo.FusedPreferenceLoss("dpo", reducer="weighted")(p.hidden, p.weight, p.labels, **_ref(p))


def test_constructor_checks(p):
    with pytest.raises(UnknownLossError):
        pygpo.FusedPreferenceLoss("dpoo")
    with pytest.raises(HyperParameterError, match="beta"):
        pygpo.FusedPreferenceLoss("dpo", beta=-1.0)
    with pytest.raises(ValueError, match="unexpected hyper-parameter 'gamma'"):
        pygpo.FusedPreferenceLoss("dpo", gamma=0.5)
    with pytest.raises(ValueError, match="is a reducer"):
        pygpo.FusedPreferenceLoss("mean")
    with pytest.raises(ValueError, match="reducer must be one of"):
        pygpo.FusedPreferenceLoss("dpo", reducer="median")
    with pytest.raises(ValueError, match="cannot be combined"):
        pygpo.FusedPreferenceLoss("sparsepo+sft")


def test_nothing_runs_before_the_checks(p, monkeypatch):
    """A bad reference is refused before the policy's fused pass (no kernel call)."""
    import pygpo.fused.scores as scores

    def boom(*a, **k):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(scores, "valid_row_stats", boom)
    monkeypatch.setattr(scores, "fused_linear_kl", boom)
    with pytest.raises(ReferenceInputError):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, **_ref(p), ref_logps=torch.zeros(B, K))


def test_missing_and_unknown_inputs_fail_before_any_kernel(p, monkeypatch):
    import pygpo.fused.scores as scores

    monkeypatch.setattr(scores, "valid_row_stats", lambda *a, **k: pytest.fail("a kernel ran before validation"))
    with pytest.raises(pygpo.losses.MissingInputError, match="'ties'"):
        pygpo.FusedPreferenceLoss("todo")(p.hidden, p.weight, p.labels, **_ref(p))
    with pytest.raises(pygpo.losses.MissingInputError, match="'preference_labels'"):
        pygpo.FusedPreferenceLoss("kto")(p.hidden, p.weight, p.labels, **_ref(p), z0=torch.tensor(0.0))
    with pytest.raises(ValueError, match="unexpected input"):
        pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, **_ref(p), ties=torch.zeros(B, dtype=torch.bool))
