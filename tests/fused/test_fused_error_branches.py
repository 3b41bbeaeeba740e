"""FusedPreferenceLoss: the less-travelled bad-input checks (each message names the argument and what
was expected), and two feature paths beside them checked against float64 math written here."""

from __future__ import annotations

import pytest
import torch

import pygpo
from pygpo.fused import ReferenceInputError, ResponseIndexError
from pygpo.prefix import pack

from fused_reference import rows_problem

B, K, D, V = 3, 2, 12, 37
F = pygpo.FusedPreferenceLoss


@pytest.fixture(scope="module")
def p():
    return rows_problem(B, K, seed=0)


def _ref(p):
    return dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)


@pytest.fixture(scope="module")
def token_rows(p):
    """The rows problem as token rows ``(N, D)`` with the response id of each row."""
    valid = p.labels != -100
    rid = torch.arange(B * K)[:, None].expand_as(p.labels)[valid]
    return p.hidden[valid], p.labels[valid], rid, p.ref_hidden[valid]


@pytest.fixture(scope="module")
def prefix():
    batch = pack([[1, 2], [3, 4, 5]], [[[6, 7], [8]], [[9], [10, 11]]], max_tokens=16)
    g = torch.Generator().manual_seed(3)
    return batch, torch.randn(1, batch.input_ids.shape[1], D, generator=g), torch.randn(V, D, generator=g)


# ---------------------------------------------------------------- construction

def test_stateful_head_refuses_unknown_options():
    with pytest.raises(ValueError, match=r"unexpected option\(s\) 'gamma' for BetaDPOLoss; valid: a, beta, decay"):
        F("beta_dpo", gamma=1.0)


def test_eager_gradients_refuse_an_sft_term_under_a_shaping_reducer():
    with pytest.raises(ValueError, match=r"eager_gradients=True cannot run 'rpo_sum' with reducer='mean' \(its SFT term"):
        F("rpo_sum", reducer="mean", eager_gradients=True)


def test_repr_shows_the_configuration():
    assert repr(F("dpo", beta=0.2)) == "FusedPreferenceLoss(loss='dpo', reducer='sum', hparams={'beta': 0.2})"


# ---------------------------------------------------------------- hidden, labels, counts

def test_hidden_and_labels_types(p):
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor, got ndarray"):
        F("dpo")(p.hidden.numpy(), p.weight, p.labels, **_ref(p))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor, got ndarray"):
        F("dpo")(p.hidden, p.weight, p.labels.numpy(), **_ref(p))
    with pytest.raises(ValueError, match=r"labels are required \(or pass batch= for a PrefixBatch\)"):
        F("dpo")(p.hidden, p.weight, None, **_ref(p))
    with pytest.raises(ValueError, match=r"hidden must be \(R, T, D\) rows or \(N, D\) token rows, got shape \(1, 6, 9, 12\)"):
        F("dpo")(p.hidden[None], p.weight, p.labels[None], **_ref(p))


@pytest.mark.parametrize("bad", [0, True, 2.0])
def test_num_examples_must_be_a_positive_int(p, bad):
    with pytest.raises(ValueError, match=f"num_examples must be a positive int, got {bad!r}"):
        F("dpo")(p.hidden, p.weight, p.labels, num_examples=bad, **_ref(p))


def test_multi_response_loss_needs_k(p):
    with pytest.raises(ValueError, match=r"multi-response losses need responses_per_example=K \(or a PrefixBatch\)"):
        F("mpo")(p.hidden, p.weight, p.labels, rewards=torch.randn(B, K), **_ref(p))


def test_token_weights_only_with_the_weighted_reducer(p):
    with pytest.raises(ValueError, match=r"token_weights are used by reducer='weighted' only \(reducer is 'sum'\)"):
        F("dpo")(p.hidden, p.weight, p.labels, token_weights=torch.ones(p.labels.shape), **_ref(p))


def test_segment_ids_must_be_integers(p):
    with pytest.raises(ValueError, match="segment_ids must be an integer tensor, got torch.float32"):
        F("dpo", reducer="segments")(p.hidden, p.weight, p.labels, segment_ids=torch.zeros(p.labels.shape), **_ref(p))


# ---------------------------------------------------------------- response index (token rows)

def test_token_rows_response_index(p, token_rows):
    h, labels, rid, ref_h = token_rows
    ref = dict(ref_hidden=ref_h, ref_weight=p.ref_weight)
    with pytest.raises(TypeError, match="response_index must be an integer torch.Tensor, got list"):
        F("dpo")(h, p.weight, labels, rid.tolist(), **ref)
    with pytest.raises(ResponseIndexError, match=r"response_index must have the labels' shape \(24,\), got \(23,\)"):
        F("dpo")(h, p.weight, labels, rid[:-1], **ref)
    negative = rid.clone()
    negative[0] = -1
    with pytest.raises(ResponseIndexError, match="response_index is negative at a scored token"):
        F("dpo")(h, p.weight, labels, negative, **ref)


# ---------------------------------------------------------------- prefix batch

def test_prefix_batch_arguments(prefix):
    batch, hidden, weight = prefix
    n = batch.target_index.numel()
    with pytest.raises(ResponseIndexError, match=r"give either batch= \(a PrefixBatch\) or response_index, not both"):
        F("simpo")(hidden, weight, batch.target_labels, torch.zeros(n, dtype=torch.long), batch=batch)
    with pytest.raises(ResponseIndexError, match=rf"labels must have one entry per target of the PrefixBatch, shape \({n},\), got \({n - 1},\)"):
        F("simpo")(hidden, weight, batch.target_labels[:-1], batch=batch)
    with pytest.raises(ResponseIndexError, match="responses_per_example=1, but the batch has 2"):
        F("simpo")(hidden, weight, batch=batch, responses_per_example=1)


# ---------------------------------------------------------------- reference

def test_reference_hidden_must_be_tensors(p):
    with pytest.raises(ReferenceInputError, match="ref_hidden and ref_weight must be torch.Tensors"):
        F("dpo")(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden.numpy(), ref_weight=p.ref_weight)


def test_reference_free_token_kl_loss_needs_the_reference_hidden_states(p):
    preference = torch.tensor([True, False, True, True, False, True])
    with pytest.raises(ValueError, match=r"a token-KL loss needs the reference as hidden states \(ref_hidden, ref_weight\)"):
        F("pmpo")(p.hidden, p.weight, p.labels, preference_labels=preference)


# ---------------------------------------------------------------- feature paths

def test_token_kl_and_log_sum_p2_together_match_each_alone(p):
    """tdpo1 + wpo needs the token KL and log sum p^2: the second comes from its own pass beside the KL
    pass, and must give what wpo alone (a single pass) gives."""
    both = F("tdpo1+wpo")(p.hidden, p.weight, p.labels, **_ref(p)).loss
    alone = F("tdpo1")(p.hidden, p.weight, p.labels, **_ref(p)).loss + F("wpo")(p.hidden, p.weight, p.labels, **_ref(p)).loss
    torch.testing.assert_close(both, alone)


def test_multi_response_batch_with_a_varying_k_masks_the_missing_responses():
    """Example 0 has 3 responses, example 1 has 2: mpo gets ``valid`` marking the missing one, and the
    loss equals mpo on float64 per-response sums with that mask."""
    batch = pack([[1, 2], [3, 4, 5]], [[[6, 7], [8], [9]], [[9], [10, 11]]], max_tokens=32)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, batch.input_ids.shape[1], D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, -5.0, 0.0]], dtype=torch.float64)
    out = F("mpo")(hidden, weight, batch=batch, rewards=rewards, ref_logps=ref)

    rows = hidden.reshape(-1, D)[batch.target_index]
    token = torch.log_softmax(rows @ weight.T, dim=-1).gather(1, batch.target_labels[:, None]).squeeze(1)
    sums = torch.zeros(batch.num_responses, dtype=torch.float64).index_add(0, batch.target_response, token)
    policy = torch.zeros(2, 3, dtype=torch.float64)
    policy[0] = sums[:3]
    policy[1, :2] = sums[3:]
    valid = torch.tensor([[True, True, True], [True, True, False]])
    want = pygpo.losses.preference_loss("mpo", policy, ref, rewards=rewards, valid=valid)
    torch.testing.assert_close(out.loss, want.loss)
