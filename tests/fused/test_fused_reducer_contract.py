"""The reducer shapes the preference scores only: NLL / SFT terms and WPO's weight read raw token sums,
``lengths`` are the true counts, and combinations without a meaning are refused at construction.

References are float64 from materialised logits (tests/fused/fused_reference.py) with LOSSES.md's
formulas written out here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pygpo
from pygpo.losses import get, names

from fused_reference import DT, reference_scores, rows_problem

B, K = 4, 2
BETA = 0.3


def _setup(seed):
    p = rows_problem(B, K, seed=seed)
    h_ref, w_ref = p.hidden.clone().requires_grad_(True), p.weight.clone().requires_grad_(True)
    sc = reference_scores(type(p)(h_ref, w_ref, p.labels, p.ref_hidden, p.ref_weight, B, K))
    h, w = p.hidden.clone().requires_grad_(True), p.weight.clone().requires_grad_(True)
    return p, sc, (h, w), (h_ref, w_ref)


def _tokens(x, mask):
    return torch.where(mask, x, torch.zeros((), dtype=DT))


def _ld_weights(mask, alpha):
    """LD-DPO: tokens at completion position k > min(|y_w|, |y_l|) weigh alpha (written out by loops)."""
    w = torch.zeros(mask.shape, dtype=DT)
    for b in range(mask.shape[0]):
        shared = int(mask[b].sum(-1).min())
        for k in range(mask.shape[1]):
            for t in range(int(mask[b, k].sum())):
                w[b, k, t] = 1.0 if t < shared else alpha
    return w


def _nll_mean(sc):
    """NLL_mean(y_w): mean of -lp over every chosen token of the batch."""
    return -_tokens(sc["lp"][:, 0], sc["mask"][:, 0]).sum() / sc["mask"][:, 0].sum()


def _check(out, expected, leaves, ref_leaves):
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-11)
    torch.autograd.backward(out.loss)
    torch.autograd.backward(expected)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def _run(loss, p, leaves, *, ref=True, **kw):
    ref_kw = dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight) if ref else {}
    return pygpo.FusedPreferenceLoss(loss, **kw)(leaves[0], leaves[1], p.labels, **ref_kw)


@pytest.mark.parametrize("reducer,args", [("mean", {}), ("ld", {"alpha": 0.5}), ("sampled", {"seed": 1})])
def test_sft_is_the_chosen_token_mean_nll_whatever_the_reducer(reducer, args):
    p, sc, leaves, ref_leaves = _setup(2)  # seed 2: some chosen responses are the longer ones
    out = _run("sft", p, leaves, ref=False, reducer=reducer, reducer_args=args, alpha=0.7)
    _check(out, 0.7 * _nll_mean(sc), leaves, ref_leaves)


def test_dpo_plus_sft_with_ld_weights_only_the_log_ratios():
    p, sc, leaves, ref_leaves = _setup(2)
    wt = _ld_weights(sc["mask"], 0.4)
    u = (_tokens(sc["lp"], sc["mask"]) * wt).sum(-1) - (_tokens(sc["rlp"], sc["mask"]) * wt).sum(-1)
    dpo = -F.logsigmoid(BETA * (u[:, 0] - u[:, 1])).mean()
    out = _run({"dpo": 1.0, "sft": 0.5}, p, leaves, reducer="ld", reducer_args={"alpha": 0.4}, beta=BETA)
    _check(out, dpo + 0.5 * _nll_mean(sc), leaves, ref_leaves)


@pytest.mark.parametrize("reducer,args", [("ld", {"alpha": 0.5}), ("mean", {})])
def test_wpo_weights_read_raw_token_log_probs(reducer, args):
    p, sc, leaves, ref_leaves = _setup(3)
    mask, lengths = sc["mask"], sc["mask"].sum(-1).to(DT)
    with torch.no_grad():  # WPO: w(y) = exp(mean_t[lp_t - log sum_v p^2]), detached
        w = torch.exp(_tokens(sc["lp"] - sc["lsp2"], mask).sum(-1) / lengths)
    wt = _ld_weights(mask, 0.5) if reducer == "ld" else mask.to(DT) / lengths[..., None]
    u = (_tokens(sc["lp"], mask) * wt).sum(-1) - (_tokens(sc["rlp"], mask) * wt).sum(-1)
    expected = (-(w[:, 0] * w[:, 1]) * F.logsigmoid(BETA * (u[:, 0] - u[:, 1]))).mean()
    out = _run("wpo", p, leaves, reducer=reducer, reducer_args=args, beta=BETA, clamp=False)
    _check(out, expected, leaves, ref_leaves)


def test_cpo_with_mean_scores_keeps_a_raw_nll():
    p, sc, leaves, ref_leaves = _setup(4)
    m = _tokens(sc["lp"], sc["mask"]).sum(-1) / sc["mask"].sum(-1)
    expected = -F.logsigmoid(BETA * (m[:, 0] - m[:, 1])).mean() + 1.0 * _nll_mean(sc)
    out = _run("cpo", p, leaves, ref=False, reducer="mean", beta=BETA, alpha=1.0)
    _check(out, expected, leaves, ref_leaves)


def test_rpo_sum_reads_the_summed_chosen_log_prob():
    p, sc, leaves, ref_leaves = _setup(5)
    lp_w = _tokens(sc["lp"], sc["mask"]).sum(-1)[:, 0]
    out = _run("rpo_sum", p, leaves, ref=False, reducer="mean", beta=BETA, eta=2.0)
    _check(out, (-2.0 * BETA * lp_w).mean(), leaves, ref_leaves)


def test_length_normalising_heads_divide_the_reducer_score_by_the_true_lengths():
    """As TRL with ld_alpha: sigmoid_norm on the LD-weighted log-ratio over the full completion length."""
    p, sc, leaves, ref_leaves = _setup(6)
    mask = sc["mask"]
    wt = _ld_weights(mask, 0.3)
    u = ((_tokens(sc["lp"], mask) - _tokens(sc["rlp"], mask)) * wt).sum(-1) / mask.sum(-1)
    expected = -F.logsigmoid(BETA * (u[:, 0] - u[:, 1])).mean()
    out = _run("sigmoid_norm", p, leaves, reducer="ld", reducer_args={"alpha": 0.3}, beta=BETA)
    _check(out, expected, leaves, ref_leaves)


def test_ipo_without_its_own_normalisation_takes_the_mean_reducer():
    p, sc, leaves, ref_leaves = _setup(7)
    mask = sc["mask"]
    u = (_tokens(sc["lp"], mask) - _tokens(sc["rlp"], mask)).sum(-1) / mask.sum(-1)
    expected = ((u[:, 0] - u[:, 1] - 1 / (2 * BETA)) ** 2).mean()
    out = _run("ipo", p, leaves, reducer="mean", beta=BETA, length_normalize=False)
    _check(out, expected, leaves, ref_leaves)


@pytest.mark.parametrize("loss,kw", [
    ("simpo", {}), ("sigmoid_norm", {}), ("ipo", {}), ("alphapo", {}), ("repo", {}), ("simpo_gamma_dynamic", {}),
    ({"dpo": 1.0, "sigmoid_norm": 1.0}, {}),
])
def test_mean_reducer_refused_for_heads_that_normalise_themselves(loss, kw):
    with pytest.raises(ValueError, match="divide twice"):
        pygpo.FusedPreferenceLoss(loss, reducer="mean", **kw)


@pytest.mark.parametrize("loss", ["orpo", "asft", "omni_dpo"])
@pytest.mark.parametrize("reducer,args", [("mean", {}), ("ld", {"alpha": 0.5}), ("weighted", {})])
def test_likelihood_heads_take_the_sum_reducer_only(loss, reducer, args):
    with pytest.raises(ValueError, match=f"{loss}.*reducer='sum'"):
        pygpo.FusedPreferenceLoss(loss, reducer=reducer, reducer_args=args)


def test_every_head_that_takes_lengths_has_a_stated_reducer_contract():
    """A head reading ``lengths`` either normalises (refused under ``mean``), reads raw sums, or uses them
    as counts; a new head must be placed in one of these."""
    from pygpo.fused.inputs import LENGTH_NORMALISING

    counts_only = {"rdpo_length"}
    for key in names():
        spec = get(key)
        if "lengths" in spec.input_names and spec.kind != "reducer":
            assert key in LENGTH_NORMALISING | counts_only or "sum_logps" in spec.input_names, key


@pytest.mark.parametrize("loss", ["orpo", "cpo", "dpo+sft", "tpo_triple"])
def test_eager_gradients_fix_a_batch_token_mean_nll_at_the_calls_mean_length(loss):
    """Eager chunks of a batch-token-mean NLL each divide by the whole call's mean length (chosen, or gold for
    tpo_triple), so the eager loss and gradients are the ordinary pass's."""
    p, _, _, _ = _setup(8)
    extra = dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight) if loss == "dpo+sft" else {}
    if loss == "tpo_triple":
        extra = dict(gold_logps=torch.linspace(-60.0, -20.0, B, dtype=DT),
                     gold_lengths=torch.arange(3.0, 3.0 + 4 * B, 4, dtype=DT))
    results = []
    for eager in (False, True):
        h, w = p.hidden.clone().requires_grad_(), p.weight.clone().requires_grad_()
        out = pygpo.FusedPreferenceLoss(loss, eager_gradients=eager, memory_budget=2000)(h, w, p.labels, **extra)
        results.append((out.loss.detach(), *torch.autograd.grad(out.loss, (h, w))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_metric_the_head_reports_is_not_overwritten():
    """tpo_triple's nll_loss is its gold response's NLL; the pass's chosen-token NLL does not replace it."""
    p, sc, leaves, _ = _setup(8)
    gold, gold_len = torch.full((B,), -40.0, dtype=DT), torch.full((B,), 8.0, dtype=DT)
    out = pygpo.FusedPreferenceLoss("tpo_triple")(leaves[0], leaves[1], p.labels, gold_logps=gold, gold_lengths=gold_len)
    torch.testing.assert_close(out.metrics["nll_loss"].double(), torch.tensor(5.0, dtype=DT))
    plain = _run("dpo", p, leaves)  # a head without its own nll_loss gets the pass's token NLL
    torch.testing.assert_close(plain.metrics["nll_loss"].double(), _nll_mean(sc).detach(), rtol=1e-9, atol=1e-11)
