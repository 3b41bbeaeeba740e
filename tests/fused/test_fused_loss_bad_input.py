"""FusedPreferenceLoss refuses bad input with an error naming what is wrong, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pygpo
from pygpo.fused import ReferenceInputError, ResponseIndexError
from pygpo.losses import HyperParameterError, UnknownLossError
from pygpo.prefix import pack

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


# ------------------------------------------------------------------ checked before any projection runs


class MatmulCount(TorchDispatchMode):
    """Counts the matrix products torch runs (every fused pass projects hidden states onto the vocabulary
    with one): zero products before an error means no pass ran."""

    PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                torch.ops.aten.baddbmm.default}

    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.products += func in self.PRODUCTS
        return func(*args, **(kwargs or {}))


def _refused_before_any_product(call, exc, match):
    with MatmulCount() as count, pytest.raises(exc, match=match):
        call()
    assert count.products == 0


def test_the_product_count_sees_a_fused_pass(p):
    """The counter this file relies on does see the fused passes of a valid call."""
    with MatmulCount() as count:
        pygpo.FusedPreferenceLoss("dpo", backend="torch")(p.hidden, p.weight, p.labels, **_ref(p))
    assert count.products > 0


@pytest.mark.parametrize("change,exc,match", [
    (dict(ref_bias=torch.zeros(3, dtype=torch.float64)), ValueError, r"ref_bias must have shape \(V,\) = \(37,\), got \(3,\)"),
    (dict(ref_bias=torch.zeros(37, dtype=torch.float32)), TypeError,
     "ref_bias dtype torch.float32 must match ref_hidden dtype torch.float64"),
    (dict(ref_hidden="int"), TypeError, "ref_hidden must be a floating-point tensor"),
    (dict(ref_hidden="meta"), ValueError, "all tensors must be on one device, got hidden on cpu, ref_hidden on meta"),
    (dict(ref_weight="float32"), TypeError, "ref_weight dtype torch.float32 must match ref_hidden dtype torch.float64"),
])
@pytest.mark.parametrize("loss", ["dpo", "tdpo1"])  # a pass of its own / one pass with the policy (token KL)
def test_reference_projection_errors_name_the_reference(p, change, exc, match, loss):
    ref = _ref(p)
    if change.get("ref_hidden") == "int":
        ref = dict(ref_hidden=p.ref_hidden.long(), ref_weight=p.ref_weight.long())
    elif change.get("ref_hidden") == "meta":
        ref["ref_hidden"] = p.ref_hidden.to("meta")
    elif change.get("ref_weight") == "float32":
        ref["ref_weight"] = p.ref_weight.float()
    else:
        ref.update(change)
    fn = pygpo.FusedPreferenceLoss(loss, backend="torch")
    _refused_before_any_product(lambda: fn(p.hidden, p.weight, p.labels, **ref), exc, match)


def test_reference_in_another_dtype_runs_in_its_own_pass_only(p):
    """A float32 reference beside a float64 policy is scored in a pass of its own (allowed), but the token-KL
    pass reads both models together and refuses it."""
    ref = dict(ref_hidden=p.ref_hidden.float(), ref_weight=p.ref_weight.float())
    out = pygpo.FusedPreferenceLoss("dpo", backend="torch")(p.hidden, p.weight, p.labels, **ref)
    want = pygpo.FusedPreferenceLoss("dpo", backend="torch")(
        p.hidden, p.weight, p.labels, ref_hidden=ref["ref_hidden"].double(), ref_weight=ref["ref_weight"].double())
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    _refused_before_any_product(
        lambda: pygpo.FusedPreferenceLoss("tdpo1", backend="torch")(p.hidden, p.weight, p.labels, **ref),
        TypeError, "ref_hidden dtype torch.float32 must match hidden dtype torch.float64")


def test_prefix_batch_with_more_responses_than_the_loss_takes():
    batch = pack([[1, 2]], [[[3], [4], [5]]])  # K = 3
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(1, 5, 8, generator=g), torch.randn(12, 8, generator=g)
    fn = pygpo.FusedPreferenceLoss("dpo", backend="torch")
    _refused_before_any_product(lambda: fn(hidden, weight, batch=batch, ref_logps=torch.zeros(1, 3)),
                                ResponseIndexError, r"loss 'dpo' takes 2 response\(s\) per example, but the PrefixBatch has 3")
    kto = pygpo.FusedPreferenceLoss("kto", backend="torch", stateful=False)
    _refused_before_any_product(
        lambda: kto(hidden, weight, batch=batch, ref_logps=torch.zeros(1, 3), preference_labels=torch.ones(1, dtype=torch.bool),
                    z0=torch.tensor(0.0)),
        ResponseIndexError, r"loss 'kto' takes 1 response\(s\) per example, but the PrefixBatch has 3")
    # a multi-response head takes any K
    out = pygpo.FusedPreferenceLoss("plackett_luce", backend="torch")(hidden, weight, batch=batch,
                                                                      ref_logps=torch.zeros(1, 3))
    assert out.policy_logps.shape == (1, 3)


def test_rows_with_more_responses_than_the_loss_takes():
    p3 = rows_problem(2, 3, seed=1)
    _refused_before_any_product(
        lambda: pygpo.FusedPreferenceLoss("dpo", backend="torch")(
            p3.hidden, p3.weight, p3.labels, responses_per_example=3, ref_hidden=p3.ref_hidden, ref_weight=p3.ref_weight),
        ResponseIndexError, r"loss 'dpo' takes 2 response\(s\) per example, but responses_per_example is 3")


def test_reference_rows_of_a_prefix_batch_are_named():
    batch = pack([[1, 2, 3], [4]], [[[5, 6], [7]], [[8], [9, 10]]])  # B=2, S=6
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 6, 8, generator=g), torch.randn(12, 8, generator=g)
    fn = pygpo.FusedPreferenceLoss("dpo", backend="torch")
    _refused_before_any_product(lambda: fn(hidden, weight, batch=batch, ref_hidden=torch.randn(2, 7, 8), ref_weight=weight),
                                ValueError, "layout does not match ref_hidden: .* but ref_hidden has shape \\(2, 7, 8\\)")


@pytest.mark.parametrize("kw,exc,match", [
    (dict(temperature=0), ValueError, "temperature must be a positive finite number, got 0"),
    (dict(temperature="x"), TypeError, r"temperature must be a real number \(int or float\), got str 'x'"),
    (dict(softcap=-5), ValueError, "softcap must be a positive finite number, got -5"),
    (dict(backend="foo"), ValueError, r"backend must be one of \('auto', 'torch', 'triton', 'cuda'\), got 'foo'"),
    (dict(memory_budget=-5), ValueError, "memory_budget must be a positive int number of bytes or None, got -5"),
    (dict(memory_budget=True), TypeError, "memory_budget must be a positive int number of bytes or None, got bool"),
    (dict(ignore_index=None), TypeError, r"ignore_index must be an int label value \(e.g. -100\), got NoneType None"),
    (dict(ignore_index=-1.0), TypeError, "ignore_index must be an int label value"),
    (dict(deterministic="no"), TypeError, "deterministic must be a bool, got str 'no'"),
    (dict(compute_metrics="yes"), TypeError, "compute_metrics must be a bool, got str 'yes'"),
    (dict(check_finite=0), TypeError, "check_finite must be a bool, got int 0"),
    (dict(eager_gradients=None), TypeError, "eager_gradients must be a bool, got NoneType None"),
])
def test_constructor_checks_projection_options(kw, exc, match):
    with pytest.raises(exc, match=match):
        pygpo.FusedPreferenceLoss("dpo", **kw)
