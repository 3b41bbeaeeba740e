"""FusedPreferenceLoss(eager_gradients=True): gradients computed in the forward, chunk by chunk of examples.

Checked against the module's ordinary path (itself checked against materialised float64 logits in
test_fused_loss_module / test_fused_loss_registry) and, for DPO, directly against float64 logits.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import pygpo
from pygpo.fused.eager import NotSeparableError
from pygpo.losses import preference_loss, reduce_pair
from pygpo.prefix import pack

from fused_reference import DT, reference_scores, rows_problem

B, K = 5, 2
HAS_C = importlib.util.find_spec("pygpo._C") is not None


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def _run(module, p, bias=None, **kw):
    h, w = _leaves(p.hidden, p.weight)
    b = None if bias is None else bias.clone().requires_grad_(True)
    out = module(h, w, p.labels, bias=b, **kw)
    upstream = 1.7  # a non-unit upstream gradient: the kept gradients must be scaled by it
    grads = torch.autograd.grad(out.loss * upstream, [t for t in (h, w, b) if t is not None])
    return out, grads


def _compare(loss, p, *, bias=None, tol=1e-10, module_kw=None, **forward):
    """The eager module against the ordinary one on the same problem: loss, per-example, metrics, grads."""
    kw = dict(module_kw or {})
    ordinary, g_ord = _run(pygpo.FusedPreferenceLoss(loss, **kw), p, bias, **forward)
    eager, g_eag = _run(pygpo.FusedPreferenceLoss(loss, eager_gradients=True, **kw), p, bias, **forward)
    torch.testing.assert_close(eager.loss, ordinary.loss.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(eager.per_example, ordinary.per_example.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(eager.policy_logps, ordinary.policy_logps.detach(), rtol=tol, atol=tol)
    assert set(eager.metrics) == set(ordinary.metrics)
    for name, value in ordinary.metrics.items():
        torch.testing.assert_close(torch.as_tensor(eager.metrics[name]).double(), torch.as_tensor(value).double(),
                                   rtol=max(tol, 1e-6), atol=max(tol, 1e-6), msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), g_eag, g_ord):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol, msg=name)
    for name in ("policy_logps", "per_example"):  # no gradient: a backward through them fails loudly
        with pytest.raises(RuntimeError, match=f"{name} has no gradient with eager_gradients=True"):
            getattr(eager, name).sum().backward()


# memory_budget in bytes of kept tile: 37 vocabulary entries x 8 bytes x 3 rows -> many chunks
@pytest.mark.parametrize("budget", [37 * 12 * 3, None], ids=["chunked", "one-chunk"])
@pytest.mark.parametrize("loss,kw", [
    ("dpo", dict(beta=0.3)),
    ("ipo", dict(beta=0.5)),
    ("cdpo", dict(beta=0.2, eps=0.1)),
    ("robust", dict(beta=0.2, eps=0.1)),
    ("hinge", dict(beta=0.4)),
    ("dpop", dict(beta=0.2)),
])
def test_reference_losses_match_the_ordinary_path(loss, kw, budget):
    p = rows_problem(B, K, seed=3)
    _compare(loss, p, module_kw=dict(memory_budget=budget, **kw), ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)


@pytest.mark.parametrize("loss,kw", [("simpo", dict(beta=2.0, gamma=0.4)), ("alphapo", dict(a=0.3))])
def test_reference_free_losses_take_their_lengths_per_chunk(loss, kw):
    p = rows_problem(B, K, seed=4)
    _compare(loss, p, module_kw=dict(memory_budget=37 * 12 * 4, **kw))


def test_mean_reducer():
    p = rows_problem(B, K, seed=12)
    _compare("dpo", p, module_kw=dict(reducer="mean", beta=0.3, memory_budget=37 * 12 * 4),
             ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)


def test_softcap_temperature_and_bias():
    p = rows_problem(B, K, seed=5)
    bias = torch.randn(p.weight.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1)) * 0.3
    _compare("dpo", p, bias=bias, module_kw=dict(beta=0.3, softcap=3.0, temperature=0.7, memory_budget=37 * 12 * 5),
             ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)


def test_dpo_against_materialised_float64_logits():
    """Independent of the module's ordinary path: float64 logits, log_softmax, sums, the DPO formula."""
    p = rows_problem(B, K, seed=6)
    h_ref, w_ref = _leaves(p.hidden, p.weight)
    sc = reference_scores(type(p)(h_ref, w_ref, p.labels, p.ref_hidden, p.ref_weight, p.b, p.k))
    pol, ref = reduce_pair("sum", sc["lp"], sc["rlp"], sc["mask"])
    expected = preference_loss("dpo", pol, ref, beta=0.3).loss
    g_expected = torch.autograd.grad(expected, (h_ref, w_ref))
    out, grads = _run(pygpo.FusedPreferenceLoss("dpo", beta=0.3, eager_gradients=True, memory_budget=37 * 12 * 4), p,
                      ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, g_expected):
        torch.testing.assert_close(a, 1.7 * b, rtol=1e-9, atol=1e-11)


def test_cached_references_in_both_forms():
    p = rows_problem(B, K, seed=7)
    sc = reference_scores(p)
    _, ref_seq = reduce_pair("sum", sc["lp"], sc["rlp"], sc["mask"])
    _compare("dpo", p, module_kw=dict(beta=0.3, memory_budget=37 * 12 * 3), ref_logps=ref_seq)
    from fused_reference import token_logp_rows

    ref_tok, _ = token_logp_rows(p.ref_hidden, p.ref_weight, p.labels)
    _compare("dpo", p, module_kw=dict(beta=0.3, memory_budget=37 * 12 * 3), ref_token_logps=ref_tok)


def test_token_rows_with_a_response_index_and_a_prefix_batch():
    g = torch.Generator().manual_seed(8)
    n, d, v = 40, 12, 37
    hidden = torch.randn(n, d, generator=g, dtype=DT)
    weight = torch.randn(v, d, generator=g, dtype=DT) / 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    index = torch.arange(n) // 4 % 10  # 10 responses = 5 pairs, tokens interleaved by blocks of 4
    ref = torch.randn(5, 2, generator=g, dtype=DT)

    class Tokens:  # the shape _run expects
        pass

    t = Tokens()
    t.hidden, t.weight, t.labels = hidden, weight, labels
    _compare("dpo", t, module_kw=dict(beta=0.3, memory_budget=37 * 12 * 3), response_index=index, ref_logps=ref)

    prompts = [torch.randint(0, v, (m,), generator=g) for m in (3, 5, 2)]
    responses = [[torch.randint(0, v, (m,), generator=g) for m in ms] for ms in ((2, 4), (3, 1), (5, 2))]
    batch = pack(prompts, responses, max_tokens=32)
    s = Tokens()
    s.hidden = torch.randn(batch.input_ids.shape + (d,), generator=g, dtype=DT)
    s.weight, s.labels = weight, batch.target_labels
    rows_hidden = batch.gather(s.hidden)
    s.hidden = rows_hidden
    _compare("dpo", s, module_kw=dict(beta=0.3, memory_budget=37 * 12 * 2), batch=batch,
             ref_logps=torch.randn(3, 2, generator=g, dtype=DT))


@pytest.mark.skipif(not HAS_C, reason="pygpo._C not built: the epilogue engine needs it")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_epilogue_engine_on_its_host_twin(dtype, tol):
    """float32 / bf16 inputs run the pygpo._C epilogue kernels (host twins here) on the kept tile."""
    p = rows_problem(B, K, seed=9)
    low = type(p)(p.hidden.to(dtype), p.weight.to(dtype), p.labels, p.ref_hidden.to(dtype), p.ref_weight.to(dtype),
                  p.b, p.k)
    bias = torch.randn(p.weight.shape[0], generator=torch.Generator().manual_seed(2)).to(dtype) * 0.3
    ordinary, g_ord = _run(pygpo.FusedPreferenceLoss("dpo", beta=0.3), low, bias, ref_hidden=low.ref_hidden,
                           ref_weight=low.ref_weight)
    eager, g_eag = _run(pygpo.FusedPreferenceLoss("dpo", beta=0.3, eager_gradients=True, memory_budget=37 * 4 * 3),
                        low, bias, ref_hidden=low.ref_hidden, ref_weight=low.ref_weight)
    torch.testing.assert_close(eager.loss.double(), ordinary.loss.detach().double(), rtol=tol, atol=tol)
    for a, b in zip(g_eag, g_ord):
        assert a.dtype == dtype
        scale = float(b.double().abs().max())
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale)


def test_no_grad_forward_computes_no_gradients():
    p = rows_problem(B, K, seed=10)
    module = pygpo.FusedPreferenceLoss("dpo", beta=0.3, eager_gradients=True)
    h, w = _leaves(p.hidden, p.weight)
    with torch.no_grad():
        out = module(h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    expected = pygpo.FusedPreferenceLoss("dpo", beta=0.3)(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden,
                                                          ref_weight=p.ref_weight)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", [{"dpo": 1.0, "sft": 0.5}, "orpo"], ids=["dpo+sft", "orpo"])
def test_a_loss_coupled_across_the_batch_is_refused_not_silently_wrong(loss, monkeypatch):
    """Without a fixed mean length the SFT term and ORPO's NLL are means over all chosen tokens of the batch,
    so a chunk's share depends on the other chunks' lengths. The eager pass fixes it at the call's mean
    (test_fused_reducer_contract); without that, the runtime whole-batch check catches the coupling."""
    p = rows_problem(B, K, seed=11)
    module = pygpo.FusedPreferenceLoss(loss, memory_budget=37 * 12 * 3, eager_gradients=True)
    monkeypatch.setattr(module, "_with_nll_mean_length", lambda inputs, layout: inputs)
    h, w = _leaves(p.hidden, p.weight)
    ref = dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight) if loss != "orpo" else {}
    with pytest.raises(NotSeparableError, match="eager_gradients=False"):
        module(h, w, p.labels, **ref)


@pytest.mark.parametrize("loss,kw", [
    ({"dpo": 1.0, "sft": 0.5}, dict(beta=0.3)),
    ("cpo", dict(beta=0.2, alpha=0.7)),
    ("orpo", dict(lam=0.4)),
])
def test_batch_token_mean_nll_runs_eagerly_given_the_mean_length(loss, kw):
    """Given nll_mean_length (here the batch's own mean chosen length, read from the labels), the chunked
    eager pass equals the ordinary one: loss, per-example losses, metrics and gradients."""
    p = rows_problem(B, K, seed=13)
    mean_length = float((p.labels[:B] != -100).sum()) / B  # rows 0..B-1 are the chosen responses
    ref = dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight) if loss not in ("cpo", "orpo") else {}
    _compare(loss, p, module_kw=dict(memory_budget=37 * 12 * 3, **kw), nll_mean_length=mean_length, **ref)


@pytest.mark.parametrize("loss,kw,match", [
    ("dpo", dict(reducer="ld", reducer_args={"alpha": 0.5}), "reducer='ld'"),
    ("beta_dpo", {}, "stateful"),
    ("tdpo1", {}, "token KL"),
    ("wpo", {}, "log sum p"),
])
def test_what_the_eager_pass_cannot_run_is_refused_at_construction(loss, kw, match):
    with pytest.raises(ValueError, match=match):
        pygpo.FusedPreferenceLoss(loss, eager_gradients=True, **kw)


def test_chunks_are_whole_examples_within_the_row_budget():
    from pygpo.fused.eager import _example_chunks

    assert _example_chunks([3, 4, 2, 6, 1], 6) == [(0, 1), (1, 3), (3, 4), (4, 5)]
    assert _example_chunks([3, 4, 2], 100) == [(0, 3)]
    assert _example_chunks([9, 9], 1) == [(0, 1), (1, 2)]  # an example larger than the budget is one chunk
    assert _example_chunks([], 4) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_eager_on_gpu_bf16_against_the_ordinary_path():
    """bf16 on the GPU: cuBLAS tiles and (with pygpo._C) the compiled epilogues, two pairs per chunk."""
    g = torch.Generator().manual_seed(13)
    b, t, d, v = 6, 96, 256, 5003
    hidden = (torch.randn(2 * b, t, d, generator=g)).cuda().bfloat16()
    weight = (torch.randn(v, d, generator=g) / d**0.5).cuda().bfloat16()
    ref_hidden = (hidden.float() + 0.2 * torch.randn(2 * b, t, d, generator=g).cuda()).bfloat16()
    labels = torch.randint(0, v, (2 * b, t), generator=g)
    labels[:, :40] = -100
    labels = labels.cuda()
    budget = 2 * 2 * (t - 40) * v * 2  # two pairs of bf16 rows per chunk
    results = []
    for eager in (False, True):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        module = pygpo.FusedPreferenceLoss("dpo", beta=0.1, eager_gradients=eager, memory_budget=budget if eager else None)
        out = module(h, w, labels, ref_hidden=ref_hidden, ref_weight=weight)
        results.append((out, torch.autograd.grad(out.loss, (h, w))))
    (a, ga), (e, ge) = results
    torch.testing.assert_close(e.loss.float(), a.loss.detach().float(), rtol=1e-3, atol=1e-4)
    for x, y in zip(ge, ga):
        scale = float(y.float().abs().max())
        torch.testing.assert_close(x.float(), y.float(), rtol=3e-2, atol=3e-2 * scale)


def test_multi_response_and_unpaired_heads_take_their_per_example_inputs_per_chunk():
    """K = 3 (Plackett-Luce with per-example ranks) and K = 1 (APO-zero with preference labels): the
    chunks get their own examples' rows of every per-example input."""
    p3 = rows_problem(B, 3, seed=14)
    ranks = torch.stack([torch.randperm(3, generator=torch.Generator().manual_seed(i)) for i in range(B)])
    _compare("plackett_luce", p3, module_kw=dict(beta=0.2, memory_budget=37 * 12 * 4), responses_per_example=3,
             ref_hidden=p3.ref_hidden, ref_weight=p3.ref_weight, ranks=ranks)
    p1 = rows_problem(B, 1, seed=15)
    labels = torch.tensor([True, False, True, True, False])
    _compare("apo_zero_unpaired", p1, module_kw=dict(beta=0.3, memory_budget=37 * 12 * 3),
             ref_hidden=p1.ref_hidden, ref_weight=p1.ref_weight, preference_labels=labels)
