"""Input forms the fused loss must read exactly or refuse: per-token reference shapes, token rows whose
last example has no target token, the reference's projection shapes, stateful hyper-parameters, and
the seeded SamPO draw."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pygpo
from pygpo.fused import ReferenceInputError, ResponseIndexError

from fused_reference import DT, per_response_tokens, reference_scores, rows_problem, token_logp_rows

B, K = 4, 2


@pytest.fixture
def p():
    return rows_problem(B, K, seed=0)


def _no_kernel(monkeypatch):
    import pygpo.fused.scores as scores

    def boom(*a, **k):
        raise AssertionError("a kernel ran before validation")

    monkeypatch.setattr(scores, "valid_row_stats", boom)
    monkeypatch.setattr(scores, "fused_linear_kl", boom)


def test_per_token_reference_of_another_layout_is_refused_even_with_the_labels_numel(p, monkeypatch):
    sc = reference_scores(p)
    dense = sc["rlp"]  # (B, K, Tmax): completion order
    labels_t = p.labels.shape[1]
    assert dense.shape[-1] < labels_t
    padded = torch.zeros(B, K, labels_t, dtype=DT)
    padded[..., : dense.shape[-1]] = dense
    assert padded.numel() == p.labels.numel()
    _no_kernel(monkeypatch)
    fn = pygpo.FusedPreferenceLoss("dpo")
    for bad in (padded, padded.reshape(p.labels.shape[1], -1)):
        with pytest.raises(ReferenceInputError, match=r"ref_token_logps must have the labels' shape \(8, 9\) or \(4, 2, "):
            fn(p.hidden, p.weight, p.labels, ref_token_logps=bad)
    with pytest.raises(ValueError, match=r"token_weights must have the labels' shape"):
        pygpo.FusedPreferenceLoss("dpo", reducer="weighted")(p.hidden, p.weight, p.labels, ref_token_logps=dense,
                                                             token_weights=padded)


def test_per_token_reference_in_either_exact_form_gives_the_float64_dpo(p):
    sc = reference_scores(p)
    rlp_rows, _ = token_logp_rows(p.ref_hidden, p.ref_weight, p.labels)
    seq = lambda x: torch.where(sc["mask"], x, torch.zeros((), dtype=DT)).sum(-1)  # noqa: E731
    u = seq(sc["lp"]) - seq(sc["rlp"])
    expected = -F.logsigmoid(0.1 * (u[:, 0] - u[:, 1])).mean()
    fn = pygpo.FusedPreferenceLoss("dpo")
    for ref in (sc["rlp"], torch.where(p.labels != -100, rlp_rows, torch.zeros((), dtype=DT))):
        out = fn(p.hidden, p.weight, p.labels, ref_token_logps=ref)
        torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-9, atol=1e-11)


def _token_rows(p):
    """Token rows of the rank-major problem and each row's response id ``b * K + k``."""
    ids = torch.tensor([(r % B) * K + r // B for r in range(B * K)])[:, None].expand_as(p.labels).reshape(-1)
    return p.hidden.reshape(-1, p.hidden.shape[-1]), p.labels.reshape(-1).clone(), ids, p.ref_hidden.reshape(-1, p.hidden.shape[-1])


def test_token_rows_whose_last_example_has_no_target_token_raise(p, monkeypatch):
    h, labels, ids, rh = _token_rows(p)
    labels[ids >= (B - 1) * K] = -100  # the last example: neither response has a completion token
    _no_kernel(monkeypatch)
    fn = pygpo.FusedPreferenceLoss("dpo")
    with pytest.raises(ResponseIndexError, match=r"response 7 \(example 3, rank 1\).*no target token"):
        fn(h, p.weight, labels, ids, ref_hidden=rh, ref_weight=p.ref_weight)
    padded = torch.where(labels == -100, torch.full_like(ids, -1), ids)  # padding rows marked -1 ...
    with pytest.raises(ResponseIndexError, match="response 0 of example 3 has no target token"):
        fn(h, p.weight, labels, padded, num_examples=B, ref_hidden=rh, ref_weight=p.ref_weight)  # ... B stated


def test_token_rows_with_a_stated_batch_size_match_the_rows_form(p):
    h, labels, ids, rh = _token_rows(p)
    fn = pygpo.FusedPreferenceLoss("dpo")
    rows = fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight, num_examples=B)
    tokens = fn(h, p.weight, labels, torch.where(labels == -100, torch.full_like(ids, -1), ids), num_examples=B,
                ref_hidden=rh, ref_weight=p.ref_weight)
    torch.testing.assert_close(tokens.loss, rows.loss, rtol=1e-12, atol=1e-13)
    with pytest.raises(ResponseIndexError, match="num_examples=3, but 8 rows of 2 responses make 4 examples"):
        fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight, num_examples=3)
    with pytest.raises(ResponseIndexError, match="beyond 3 examples"):
        fn(h, p.weight, labels, ids, num_examples=3, ref_hidden=rh, ref_weight=p.ref_weight)


def test_reference_projection_shapes_are_checked_before_the_policy_pass(p, monkeypatch):
    _no_kernel(monkeypatch)
    fn = pygpo.FusedPreferenceLoss("dpo")
    with pytest.raises(ReferenceInputError, match=r"ref_weight must be \(V, D_ref\) with the policy's vocabulary size V=37"):
        fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight[:30])
    with pytest.raises(ReferenceInputError, match=r"ref_hidden must have hidden's leading shape \(8, 9\)"):
        fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden[:, :6], ref_weight=p.ref_weight)
    with pytest.raises(ReferenceInputError, match="ref_hidden's last dimension"):
        fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden[..., :5], ref_weight=p.ref_weight)


def test_stateful_head_without_its_required_hyper_parameter():
    with pytest.raises(ValueError, match="group_robust: missing hyper-parameter.*'num_groups'"):
        pygpo.FusedPreferenceLoss("group_robust")
    assert pygpo.FusedPreferenceLoss("group_robust", num_groups=2).state_loss is not None


def _sampled_losses(p, calls, **reducer_args):
    fn = pygpo.FusedPreferenceLoss("dpo", reducer="sampled", reducer_args=reducer_args)
    return [float(fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight).loss)
            for _ in range(calls)]


def test_a_seed_seeds_the_sampled_draw_once():
    """Each call draws a new SamPO subset; the sequence of subsets repeats with the same seed."""
    p = rows_problem(B, K, seed=5, t=14)
    first = _sampled_losses(p, 4, seed=0)
    assert len(set(first)) > 1
    assert _sampled_losses(p, 4, seed=0) == first
    g = torch.Generator().manual_seed(0)
    assert _sampled_losses(p, 4, generator=g) == first  # the same as a generator seeded once by the caller
