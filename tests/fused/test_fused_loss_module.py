"""FusedPreferenceLoss: input forms, reducers, cached references, metrics, state, combined losses, backends."""

from __future__ import annotations

import pytest
import torch

import pygpo
from pygpo.losses import BetaDPOLoss, preference_loss, reduce_pair
from pygpo.prefix import pack

from fused_reference import DT, reference_scores, rows_problem, token_logp_rows

B, K = 4, 2


def _leaves(p):
    return p.hidden.clone().requires_grad_(True), p.weight.clone().requires_grad_(True)


def _seq(x, mask):
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum(-1)


def _assert_same(out, loss, h, w, h_ref, w_ref):
    torch.testing.assert_close(out.loss, loss, rtol=1e-9, atol=1e-11)
    torch.autograd.backward(out.loss)
    torch.autograd.backward(loss)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-8, atol=1e-10)


def _reference_dpo(p, reducer="sum", **reducer_args):
    h_ref, w_ref = _leaves(p)
    sc = reference_scores(type(p)(h_ref, w_ref, p.labels, p.ref_hidden, p.ref_weight, p.b, p.k))
    pol, ref = reduce_pair(reducer, sc["lp"], sc["rlp"], sc["mask"], **reducer_args)
    return preference_loss("dpo", pol, ref, beta=0.3), h_ref, w_ref, sc


@pytest.mark.parametrize("reducer,args", [("sum", {}), ("mean", {}), ("ld", {"alpha": 0.4}), ("sampled", {"seed": 5})])
def test_reducers_apply_to_policy_and_reference_alike(reducer, args):
    p = rows_problem(B, K, seed=1)
    expected, h_ref, w_ref, _ = _reference_dpo(p, reducer, **args)
    h, w = _leaves(p)
    out = pygpo.FusedPreferenceLoss("dpo", beta=0.3, reducer=reducer, reducer_args=args)(
        h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    _assert_same(out, expected.loss, h, w, h_ref, w_ref)


def test_weighted_reducer_takes_per_token_weights_of_the_labels_shape():
    p = rows_problem(B, K, seed=2)
    weights = torch.rand(p.labels.shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    from fused_reference import per_response_tokens

    dense_w = per_response_tokens(weights, p.labels, B, K)
    expected, h_ref, w_ref, _ = _reference_dpo(p, "weighted", weights=dense_w)
    h, w = _leaves(p)
    out = pygpo.FusedPreferenceLoss("dpo", beta=0.3, reducer="weighted")(
        h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight, token_weights=weights)
    _assert_same(out, expected.loss, h, w, h_ref, w_ref)


def test_rows_tokens_and_permuted_rows_forms_agree():
    p = rows_problem(B, K, seed=3)
    loss_fn = pygpo.FusedPreferenceLoss("ipo", beta=0.3)
    h, w = _leaves(p)
    base = loss_fn(h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    # rows in example-major order [c0, r0, c1, r1, ...] with an explicit response index
    order = torch.tensor([kk * B + bb for bb in range(B) for kk in range(K)])
    response_index = torch.tensor([bb * K + kk for bb in range(B) for kk in range(K)])
    h2, w2 = _leaves(p)
    permuted = loss_fn(h2[order], w2, p.labels[order], response_index, ref_hidden=p.ref_hidden[order],
                       ref_weight=p.ref_weight)
    # token rows: only the scored rows, flattened, with their response ids
    valid = p.labels != -100
    row_resp = torch.tensor([(r % B) * K + r // B for r in range(B * K)])[:, None].expand_as(p.labels)
    h3, w3 = _leaves(p)
    tokens = loss_fn(h3[valid], w3, p.labels[valid], row_resp[valid], ref_hidden=p.ref_hidden[valid],
                     ref_weight=p.ref_weight)
    for out, (hh, ww) in ((permuted, (h2, w2)), (tokens, (h3, w3))):
        torch.testing.assert_close(out.loss, base.loss, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(out.policy_logps, base.policy_logps, rtol=1e-12, atol=1e-13)
    torch.autograd.backward(base.loss)
    for out, (hh, ww) in ((permuted, (h2, w2)), (tokens, (h3, w3))):
        torch.autograd.backward(out.loss)
        torch.testing.assert_close(ww.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-10, atol=1e-12)  # the leaves are in the original order
    torch.testing.assert_close(h3.grad, h.grad, rtol=1e-10, atol=1e-12)


def test_prefix_batch_form_matches_per_response_sums():
    g = torch.Generator().manual_seed(4)
    v, d = 41, 10
    prompts = [torch.randint(0, v, (n,), generator=g).tolist() for n in (3, 6, 2)]
    responses = [[torch.randint(0, v, (n,), generator=g).tolist() for n in lens] for lens in ((4, 2), (1, 5), (3, 3))]
    batch = pack(prompts, responses, max_tokens=32)
    hidden = torch.randn(*batch.input_ids.shape, d, dtype=DT, generator=g)
    ref_hidden = hidden + 0.2 * torch.randn(hidden.shape, dtype=DT, generator=g)
    weight = torch.randn(v, d, dtype=DT, generator=g)
    h = hidden.clone().requires_grad_(True)
    out = pygpo.FusedPreferenceLoss("dpo", beta=0.5)(h, weight, batch=batch, ref_hidden=ref_hidden, ref_weight=weight)

    h_ref = hidden.clone().requires_grad_(True)
    lp, _ = token_logp_rows(h_ref.reshape(-1, d)[batch.target_index], weight, batch.target_labels)
    rlp, _ = token_logp_rows(ref_hidden.reshape(-1, d)[batch.target_index], weight, batch.target_labels)
    pol = torch.zeros(len(prompts), 2, dtype=DT)
    ref = torch.zeros(len(prompts), 2, dtype=DT)
    for i in range(batch.target_index.numel()):  # loop: response -> (example, rank)
        r = int(batch.target_response[i])
        e, k = int(batch.response_example[r]), int(batch.response_rank[r])
        pol = pol.index_put((torch.tensor(e), torch.tensor(k)), pol[e, k] + lp[i])
        ref[e, k] += rlp[i].detach()
    expected = preference_loss("dpo", pol, ref, beta=0.5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-10, atol=1e-12)
    torch.autograd.backward(out.loss)
    torch.autograd.backward(expected.loss)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-9, atol=1e-11)


def test_cached_reference_forms_equal_reference_hidden_states():
    p = rows_problem(B, K, seed=5)
    _, _, _, sc = _reference_dpo(p)
    loss_fn = pygpo.FusedPreferenceLoss("dpo", beta=0.3)
    h, w = _leaves(p)
    live = loss_fn(h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    seq = _seq(sc["rlp"], sc["mask"])
    rlp_rows, _ = token_logp_rows(p.ref_hidden, p.ref_weight, p.labels)
    for kw in (dict(ref_logps=seq), dict(ref_token_logps=rlp_rows), dict(ref_token_logps=sc["rlp"])):
        out = loss_fn(h, w, p.labels, **kw)
        torch.testing.assert_close(out.loss, live.loss, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(out.ref_logps, live.ref_logps, rtol=1e-12, atol=1e-13)
    mean_fn = pygpo.FusedPreferenceLoss("dpo", beta=0.3, reducer="mean")
    torch.testing.assert_close(mean_fn(h, w, p.labels, ref_logps=seq).loss,
                               mean_fn(h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight).loss,
                               rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (3.0, 0.7)])
def test_metrics_are_token_means_over_completion_tokens(softcap, temperature):
    p = rows_problem(B, K, seed=6)
    best = (p.hidden @ p.weight.T).argmax(-1)  # softcap and temperature keep the argmax
    every_third = (torch.arange(p.labels.numel()).view_as(p.labels) % 3 == 0) & (p.labels != -100)
    p.labels[every_third] = best[every_third]  # some labels are the top-1 token
    sc = reference_scores(p, temperature=temperature, softcap=softcap)
    mask = sc["mask"]
    out = pygpo.FusedPreferenceLoss("dpo", softcap=softcap, temperature=temperature)(
        p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    m = out.metrics
    torch.testing.assert_close(m["logits/chosen"].double(), sc["mean_logit"][:, 0][mask[:, 0]].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["logits/rejected"].double(), sc["mean_logit"][:, 1][mask[:, 1]].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["entropy"].double(), sc["entropy"][mask].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["nll_loss"].double(), -sc["lp"][:, 0][mask[:, 0]].mean().detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m["mean_token_accuracy"].double(), sc["top1"][:, 0][mask[:, 0]].mean())
    assert 0 < float(m["mean_token_accuracy"]) < 1
    torch.testing.assert_close(out.lengths, mask.sum(-1))


def test_token_kl_metrics_come_from_the_same_pass():
    p = rows_problem(B, K, seed=7)
    sc = reference_scores(p)
    out = pygpo.FusedPreferenceLoss("tdpo2")(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    torch.testing.assert_close(out.metrics["entropy"].double(), sc["entropy"][sc["mask"]].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["logits/chosen"].double(), sc["mean_logit"][:, 0][sc["mask"][:, 0]].mean(),
                               rtol=1e-6, atol=1e-7)


def test_combined_loss_with_additive_term():
    p = rows_problem(B, K, seed=8)
    h_ref, w_ref = _leaves(p)
    sc = reference_scores(type(p)(h_ref, w_ref, p.labels, p.ref_hidden, p.ref_weight, B, K))
    mask = sc["mask"]
    expected = preference_loss({"dpo": 1.0, "sft": 0.5}, _seq(sc["lp"], mask), _seq(sc["rlp"], mask),
                               lengths=mask.sum(-1).double(), beta=0.2)
    h, w = _leaves(p)
    out = pygpo.FusedPreferenceLoss({"dpo": 1.0, "sft": 0.5}, beta=0.2)(
        h, w, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    _assert_same(out, expected.loss, h, w, h_ref, w_ref)
    assert set(out.metrics) >= {"loss/dpo", "loss/sft", "rewards/accuracies"}


def test_stateful_loss_keeps_its_statistics_in_the_module():
    p = rows_problem(6, K, seed=9)
    sc = reference_scores(p)
    mask = sc["mask"]
    pol, ref = _seq(sc["lp"], mask).detach(), _seq(sc["rlp"], mask)
    module = pygpo.FusedPreferenceLoss("beta_dpo", beta=0.2, rho=0.5, generator=torch.Generator().manual_seed(1))
    plain = BetaDPOLoss(beta=0.2, rho=0.5, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        out = module(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
        expected = plain(pol, ref)
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-10, atol=1e-12)
    state = module.state_dict()
    torch.testing.assert_close(state["state_loss.m0"], plain.m0)
    assert int(state["state_loss.steps"]) == 2


def test_unpaired_kto_with_preference_labels():
    p = rows_problem(5, 1, seed=10)
    sc = reference_scores(p)
    flags = torch.tensor([True, False, True, False, True])
    expected = preference_loss("kto", _seq(sc["lp"], sc["mask"])[:, 0], _seq(sc["rlp"], sc["mask"])[:, 0], labels=flags,
                               z0=torch.tensor(0.2, dtype=DT))
    out = pygpo.FusedPreferenceLoss("kto")(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden, ref_weight=p.ref_weight,
                                         preference_labels=flags, z0=torch.tensor(0.2, dtype=DT))
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-10, atol=1e-12)
    assert out.policy_logps.shape == (5, 1)


def test_bfloat16_inputs_are_no_worse_than_plain_torch_in_bfloat16():
    p = rows_problem(B, K, seed=11, d=32, v=300)
    exact = pygpo.FusedPreferenceLoss("dpo")(p.hidden, p.weight, p.labels, ref_hidden=p.ref_hidden,
                                             ref_weight=p.ref_weight).loss
    bf = lambda x: x.to(torch.bfloat16)  # noqa: E731
    out = pygpo.FusedPreferenceLoss("dpo")(bf(p.hidden), bf(p.weight), p.labels, ref_hidden=bf(p.ref_hidden),
                                           ref_weight=bf(p.ref_weight))
    assert out.loss.dtype == torch.float32
    # plain torch in bf16: logits and log_softmax in bf16
    lp = torch.log_softmax(bf(p.hidden) @ bf(p.weight).T, -1).gather(-1, p.labels.clamp(min=0)[..., None])[..., 0]
    rlp = torch.log_softmax(bf(p.ref_hidden) @ bf(p.ref_weight).T, -1).gather(-1, p.labels.clamp(min=0)[..., None])[..., 0]
    keep = p.labels != -100
    s = lambda x: torch.where(keep, x.double(), torch.zeros((), dtype=DT)).sum(-1).view(K, B).T  # noqa: E731
    plain = preference_loss("dpo", s(lp), s(rlp)).loss
    assert abs(float(out.loss) - float(exact)) <= max(abs(float(plain) - float(exact)), 1e-3)


def test_triton_backend_through_the_module():
    pytest.importorskip("triton")
    p = rows_problem(3, K, seed=12, d=16, v=70)
    f32 = lambda x: x.float()  # noqa: E731
    args = (f32(p.hidden), f32(p.weight), p.labels)
    kw = dict(ref_hidden=f32(p.ref_hidden), ref_weight=f32(p.ref_weight))
    torch_out = pygpo.FusedPreferenceLoss("wpo", backend="torch")(*args, **kw)
    h = args[0].clone().requires_grad_(True)
    triton_out = pygpo.FusedPreferenceLoss("wpo", backend="triton")(h, args[1], args[2], **kw)
    torch.testing.assert_close(triton_out.loss, torch_out.loss, rtol=1e-5, atol=1e-6)
    triton_out.loss.backward()
    h2 = args[0].clone().requires_grad_(True)
    pygpo.FusedPreferenceLoss("wpo", backend="torch")(h2, args[1], args[2], **kw).loss.backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)


def test_token_kl_loss_without_metrics():
    p = rows_problem(B, K, seed=13)
    sc = reference_scores(p)
    mask = sc["mask"]
    out = pygpo.FusedPreferenceLoss("tdpo1", compute_metrics=False)(p.hidden, p.weight, p.labels,
                                                                    ref_hidden=p.ref_hidden, ref_weight=p.ref_weight)
    expected = preference_loss("tdpo1", _seq(sc["lp"], mask), _seq(sc["rlp"], mask), kl=_seq(sc["kl"], mask))
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-9, atol=1e-11)
    assert "entropy" not in out.metrics and "logits/chosen" not in out.metrics
