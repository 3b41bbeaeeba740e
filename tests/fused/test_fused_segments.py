"""reducer="segments" through FusedPreferenceLoss: segment i of each response pairs with segment i of the
others (LOSSES.md section 1: per-segment sums ``sum_{t in seg i} lp_t``), each aligned pair one row of the
head, against a float64 computation with loops over examples, segments and tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pygpo

from fused_reference import DT, per_response_tokens, reference_scores, rows_problem

B, K, N_SEG = 4, 2, 3


def _problem(seed):
    p = rows_problem(B, K, seed=seed, t=12)
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(-1, N_SEG, p.labels.shape, generator=g)
    seg[p.labels == -100] = 7  # ignored positions may hold anything
    for row in range(B * K):  # every response has a token in segment 0, so every example has a row
        seg[row, int((p.labels[row] != -100).nonzero()[0])] = 0
    return p, seg


def _float64_rows(p, seg, sc):
    """``[(b, i, lp (K,), rp (K,), counts (K,))]`` for every segment all responses of b have tokens in."""
    ids = per_response_tokens(seg.double(), p.labels, B, K, fill=-1.0).long()
    rows = []
    for b in range(B):
        for i in range(N_SEG):
            lp, rp, n = [], [], []
            for k in range(K):
                toks = [t for t in range(ids.shape[-1]) if sc["mask"][b, k, t] and int(ids[b, k, t]) == i]
                lp.append(sum((sc["lp"][b, k, t] for t in toks), torch.zeros((), dtype=DT)))
                rp.append(sum((sc["rlp"][b, k, t] for t in toks), torch.zeros((), dtype=DT)))
                n.append(len(toks))
            if min(n) > 0:
                rows.append((b, i, torch.stack(lp), torch.stack(rp), torch.tensor(n, dtype=DT)))
    return rows


@pytest.mark.parametrize("form", ["labels", "dense"])
def test_dpo_on_aligned_segments(form):
    p, seg = _problem(1)
    h_ref, w_ref = p.hidden.clone().requires_grad_(True), p.weight.clone().requires_grad_(True)
    sc = reference_scores(type(p)(h_ref, w_ref, p.labels, p.ref_hidden, p.ref_weight, B, K))
    rows = _float64_rows(p, seg, sc)
    assert 0 < len(rows) < B * N_SEG  # some segments are missing from a response
    per_row = torch.stack([-F.logsigmoid(0.3 * ((lp[0] - rp[0]) - (lp[1] - rp[1]))) for _, _, lp, rp, _ in rows])
    expected = per_row.mean()
    per_example = torch.stack([per_row[[j for j, r in enumerate(rows) if r[0] == b]].mean() for b in range(B)])

    ids = seg if form == "labels" else per_response_tokens(seg.double(), p.labels, B, K, fill=-1.0).long()
    h, w = p.hidden.clone().requires_grad_(True), p.weight.clone().requires_grad_(True)
    fn = pygpo.FusedPreferenceLoss("dpo", beta=0.3, reducer="segments", reducer_args={"num_segments": N_SEG})
    out = fn(h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight, segment_ids=ids)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out.per_example, per_example, rtol=1e-9, atol=1e-11)
    assert out.policy_logps.shape == (B, K, N_SEG)
    for b, i, lp, rp, _ in rows:
        torch.testing.assert_close(out.policy_logps[b, :, i], lp, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.ref_logps[b, :, i], rp.detach(), rtol=1e-9, atol=1e-11)
    torch.autograd.backward(out.loss)
    torch.autograd.backward(expected)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-10)


def test_length_normalising_head_gets_segment_token_counts():
    p, seg = _problem(2)
    sc = reference_scores(p)
    rows = _float64_rows(p, seg, sc)
    z = torch.stack([2.0 * (lp[0] / n[0] - lp[1] / n[1]) - 0.5 for _, _, lp, _, n in rows])
    expected = -F.logsigmoid(z).mean()
    out = pygpo.FusedPreferenceLoss("simpo", reducer="segments")(p.hidden, p.weight, p.labels, segment_ids=seg)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-11)


def test_segments_inputs_are_required_and_token_heads_refused():
    p, seg = _problem(3)
    fn = pygpo.FusedPreferenceLoss("dpo", reducer="segments")
    with pytest.raises(ValueError, match="reducer='segments' needs segment_ids"):
        fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    with pytest.raises(ValueError, match="segment_ids must have the labels' shape"):
        fn(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight, segment_ids=seg[:, :5])
    with pytest.raises(ValueError, match="per-token scores, not per-segment sums"):
        pygpo.FusedPreferenceLoss("rrpo", reducer="segments")
