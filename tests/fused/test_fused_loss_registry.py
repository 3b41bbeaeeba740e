"""Every registry key through FusedPreferenceLoss, against materialised float64 logits + the registry head.

The reference computes the per-token log-probs, the token KL, ``log sum p^2``, lengths and masks from
full logits with loops over rows (tests/fused/fused_reference.py); only the head (tested on its own in
tests/losses) is shared. Values and gradients w.r.t. hidden states and lm_head weight must agree.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import pygpo
from pygpo.losses import get, names, preference_loss

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "losses"))
from fused_reference import reference_scores, rows_problem  # noqa: E402
from loss_cases import cases  # noqa: E402

AUTO = {"lengths", "mask", "kl", "log_sum_p2"}
HEADS = [k for k in names() if get(k).kind != "reducer"]


def _shape_of(case) -> tuple[int, int, bool]:
    """(B, K, per-token head) of a loss case."""
    pol = case.policy
    if pol.dim() == 1:
        return pol.shape[0], 1, False
    if pol.dim() == 3:
        return pol.shape[0], 2, True
    return pol.shape[0], pol.shape[1], False


def _token_inputs(spec, case, labels, sc, g):
    """Per-token caller inputs (SparsePO's mu/md, RRPO's segment_ids) as labels-shaped tensors, and their (B,K,T) form."""
    given, dense = {}, {}
    for name in ("mu", "md", "segment_ids"):
        if name not in case.kwargs:
            continue
        if name == "segment_ids":
            per_label = torch.randint(-1, 3, labels.shape, generator=g)
        else:
            per_label = torch.rand(labels.shape, generator=g, dtype=torch.float64)
        given[name] = per_label
        from fused_reference import per_response_tokens

        fill = -1 if name == "segment_ids" else 0.0
        d = per_response_tokens(per_label.double(), labels, sc["mask"].shape[0], sc["mask"].shape[1], fill=fill)
        dense[name] = d.long() if name == "segment_ids" else d
    return given, dense


def _reference_loss(key, spec, case, p, sc, hparams, inputs, dense_inputs, token_head):
    mask = sc["mask"]
    zero = torch.zeros((), dtype=torch.float64)
    seq = lambda x: torch.where(mask, x, zero).sum(-1)  # noqa: E731
    k = mask.shape[1]
    one = (lambda x: x[:, 0]) if k == 1 else (lambda x: x)  # noqa: E731
    policy = sc["lp"] if token_head else one(seq(sc["lp"]))
    ref = sc["rlp"] if token_head else one(seq(sc["rlp"]))
    auto = {}
    if "lengths" in spec.input_names:
        auto["lengths"] = one(mask.sum(-1).double())
    if "mask" in spec.input_names:
        auto["mask"] = mask
    if "kl" in spec.input_names:
        auto["kl"] = sc["kl"] if token_head else one(seq(sc["kl"]))
    if "log_sum_p2" in spec.input_names:
        auto["log_sum_p2"] = one(seq(sc["lsp2"]))
    auto.update(inputs)
    auto.update(dense_inputs)
    use_ref = ref if spec.reference != "none" else None
    return preference_loss(key, policy, use_ref, **hparams, **auto)


@pytest.mark.parametrize("key", HEADS)
def test_every_head_matches_materialised_reference(key):
    spec = get(key)
    case = cases(key)[0]
    b, k, token_head = _shape_of(case)
    p = rows_problem(b, k, seed=len(key))
    g = torch.Generator().manual_seed(7)
    hparams = {n: v for n, v in case.kwargs.items() if n in spec.defaults}
    inputs = {n: v for n, v in case.kwargs.items() if n not in spec.defaults and n not in AUTO and n not in ("mu", "md", "segment_ids")}

    h_ref = p.hidden.clone().requires_grad_(True)
    w_ref = p.weight.clone().requires_grad_(True)
    sc = reference_scores(type(p)(h_ref, w_ref, p.labels, p.ref_hidden, p.ref_weight, b, k))
    given_tok, dense_tok = _token_inputs(spec, case, p.labels, sc, g)
    seeded = "generator" in spec.input_names  # a random draw inside the head: the same seed for both calls
    if seeded:
        inputs["generator"] = torch.Generator().manual_seed(3)
    expected = _reference_loss(key, spec, case, p, sc, hparams, inputs, dense_tok, token_head)
    if seeded:
        inputs["generator"] = torch.Generator().manual_seed(3)

    h = p.hidden.clone().requires_grad_(True)
    w = p.weight.clone().requires_grad_(True)
    needs_ref = spec.reference != "none" or "kl" in spec.input_names
    ref_kw = dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight) if needs_ref else {}
    loss_fn = pygpo.FusedPreferenceLoss(key, stateful=False, **hparams)
    if "labels" in inputs:  # the unpaired heads' desirable flags; the token labels take that name here
        inputs["preference_labels"] = inputs.pop("labels")
    out = loss_fn(h, w, p.labels, responses_per_example=k, **ref_kw, **inputs, **given_tok)

    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out.per_example, expected.per_example, rtol=1e-9, atol=1e-11)
    for name in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        if name in expected.metrics:
            torch.testing.assert_close(out.metrics[name], expected.metrics[name], rtol=1e-9, atol=1e-11)
    if not expected.loss.requires_grad:
        return
    torch.autograd.backward(out.loss)
    torch.autograd.backward(expected.loss)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-10)
