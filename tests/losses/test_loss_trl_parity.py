"""Parity with TRL's own loss code on the same inputs.

TRL computes its DPO/KTO losses inside ``_compute_loss(model, inputs)``; we call that unbound method
with a minimal trainer stand-in whose "model" returns given per-token log-probs, so the numbers come
from TRL's code itself. CPO (SimPO, AlphaPO) and ORPO expose loss methods on plain tensors. Where the
installed TRL lacks a trainer, method or loss type, the test is skipped naming what is missing.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pygpo.losses import preference_loss, reduce
from pygpo.versions import major_minor

trl = pytest.importorskip("trl", reason="trl is not installed (dev extra)")
if major_minor(trl.__version__) < (1, 15):  # trl >= 1.15 needs Python >= 3.11
    pytest.skip(f"trl {trl.__version__}: the trainer stubs below mirror trl >= 1.15, whose _compute_loss reads "
                "log-probs from the model output", allow_module_level=True)

B, T = 6, 8
DT = torch.float64


def _find(paths: list[str], attr: str):
    for mod in paths:
        try:
            obj = getattr(importlib.import_module(mod), attr, None)
        except Exception:  # noqa: BLE001 - a broken optional import counts as absent
            obj = None
        if obj is not None:
            return obj
    pytest.skip(f"trl {trl.__version__} has no {attr} (looked in {', '.join(paths)})")


def _method(cls, name: str):
    fn = getattr(cls, name, None)
    if fn is None:
        pytest.skip(f"trl {trl.__version__}: {cls.__name__}.{name} is absent")
    return fn


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _tokens(seed: int):
    """Per-token log-probs for [chosen; rejected] rows (0 outside completions), masks, lengths."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, T + 1, (2 * B,), generator=g)
    shift_mask = (torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)).long()  # completion tokens first
    per_tok = -torch.rand(2 * B, T, generator=g, dtype=DT) * 2.0 * shift_mask
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), shift_mask], dim=1)  # prompt token first
    ref_seq = per_tok.sum(1) + 0.7 * torch.randn(2 * B, generator=g, dtype=DT)
    lsp2 = -torch.rand(2 * B, T, generator=g, dtype=DT) * 0.5 * shift_mask
    return per_tok, shift_mask, completion_mask, ref_seq, lsp2


def _pairs(x):
    return torch.stack([x[:B], x[B:]], dim=1)


# ---------------------------------------------------------------------------------------------- DPO


def _run_trl_dpo(loss_types, *, seed=0, dtype=DT, beta=0.1, label_smoothing=0.0, f_div="reverse_kl", f_coef=0.5,
                 discopop_tau=0.05, use_weighting=False, ld_alpha=None, loss_weights=None):
    DPOTrainer = _find(["trl", "trl.trainer.dpo_trainer"], "DPOTrainer")
    compute = _method(DPOTrainer, "_compute_loss")
    per_tok, shift_mask, completion_mask, ref_seq, lsp2 = (x.to(dtype) if x.is_floating_point() else x for x in _tokens(seed))
    outputs = SimpleNamespace(
        log_probs=per_tok, entropy=torch.zeros_like(per_tok), mean_logits=torch.zeros_like(per_tok),
        is_top1=torch.zeros_like(per_tok, dtype=torch.bool), log_sum_sq_probs=lsp2, aux_loss=None,
    )
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), ld_alpha=ld_alpha, precompute_ref_logps=True,
        f_divergence_type=f_div, f_alpha_divergence_coef=f_coef, loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)), beta=beta, label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None), use_weighting=use_weighting,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long), "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": completion_mask, "ref_chosen_logps": ref_seq[:B], "ref_rejected_logps": ref_seq[B:],
    }
    try:
        loss = compute(stub, lambda **kw: outputs, inputs, False)
    except ValueError as exc:
        if "Unknown" in str(exc):
            pytest.skip(f"trl {trl.__version__}: {exc}")
        raise
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    seq = (per_tok * shift_mask).sum(1)
    return loss, metrics, dict(policy=_pairs(seq), ref=_pairs(ref_seq), lengths=_pairs(shift_mask.sum(1).to(DT)),
                               per_tok=per_tok, shift_mask=shift_mask, lsp2=_pairs((lsp2 * shift_mask).sum(1)))


DPO_CASES = [
    # (TRL loss_type, TRL options, pygpo key, pygpo options)
    ("sigmoid", {}, "dpo", {}),
    ("hinge", {}, "hinge", {}),
    ("ipo", {}, "ipo", {"lengths": True}),
    ("exo_pair", {"label_smoothing": 1e-3}, "exo", {"eps": 1e-3}),  # TRL holds eps in a float32 tensor
    ("nca_pair", {}, "nca", {}),
    ("robust", {"label_smoothing": 0.2}, "robust", {"eps": 0.2}),
    ("bco_pair", {}, "bco_pair", {}),
    ("sppo_hard", {}, "sppo_hard", {}),
    ("aot", {"label_smoothing": 0.1}, "aot", {"eps": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}, "aot_unpaired", {"eps": 0.1}),
    ("apo_zero", {}, "apo_zero", {}),
    ("apo_down", {}, "apo_down", {}),
    ("discopop", {"discopop_tau": 0.2}, "discopop", {"tau": 0.2}),
    ("sigmoid_norm", {}, "sigmoid_norm", {"lengths": True}),
]


@pytest.mark.parametrize("trl_type,trl_opts,key,opts", DPO_CASES, ids=[c[0] for c in DPO_CASES])
def test_dpo_trainer_loss_types(trl_type, trl_opts, key, opts):
    loss, metrics, d = _run_trl_dpo([trl_type], beta=0.3, **trl_opts)
    kw = {k: v for k, v in opts.items() if k != "lengths"}
    if opts.get("lengths"):
        kw["lengths"] = d["lengths"]
    ours = preference_loss(key, d["policy"], d["ref"], beta=0.3, **kw)
    rtol = 1e-6 if trl_type == "exo_pair" else 1e-10  # TRL computes log(eps) from a float32 tensor
    torch.testing.assert_close(ours.loss, loss.to(DT), rtol=rtol, atol=1e-12)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(ours.metrics[name]) == pytest.approx(metrics[name], rel=1e-9, abs=1e-12), name
    # TRL casts the accuracy to float32
    assert float(ours.metrics["rewards/accuracies"]) == pytest.approx(metrics["rewards/accuracies"], rel=1e-6)


@pytest.mark.parametrize("trl_div,ours", [("forward_kl", "forward_kl"), ("js_divergence", "js"), ("alpha_divergence", "alpha")])
def test_dpo_trainer_f_divergences(trl_div, ours):
    coef = 0.3  # TRL's f_alpha_divergence_coef c; pygpo's alpha = 1 - c
    # TRL's alpha-divergence clamp table knows fp16/bf16/fp32 only: run this comparison in float32
    dtype = torch.float32 if trl_div == "alpha_divergence" else DT
    loss, _, d = _run_trl_dpo(["sigmoid"], beta=0.3, f_div=trl_div, f_coef=coef, dtype=dtype)
    out = preference_loss("fdpo", d["policy"], d["ref"], beta=0.3, divergence=ours, alpha=1 - coef)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, loss, **tol)
    out_trl_name = preference_loss("fdpo", d["policy"], d["ref"], beta=0.3, divergence=trl_div, alpha=1 - coef)
    torch.testing.assert_close(out_trl_name.loss, out.loss)


def test_dpo_trainer_sft_and_loss_weights():
    loss, _, d = _run_trl_dpo(["sigmoid", "sft"], beta=0.3, loss_weights=[1.0, 0.4])
    out = preference_loss(["dpo", "sft"], d["policy"], d["ref"], lengths=d["lengths"], loss_weights=[1.0, 0.4], beta=0.3, alpha=1.0)
    torch.testing.assert_close(out.loss, loss.to(DT), rtol=1e-10, atol=1e-12)


def test_dpo_trainer_wpo_weighting():
    loss, _, d = _run_trl_dpo(["sigmoid"], beta=0.3, use_weighting=True)
    out = preference_loss("wpo", d["policy"], d["ref"], beta=0.3, clamp=False, lengths=d["lengths"], log_sum_p2=d["lsp2"])
    torch.testing.assert_close(out.loss, loss.to(DT), rtol=1e-10, atol=1e-12)


def test_dpo_trainer_ld_alpha_matches_ld_reducer():
    _, metrics, d = _run_trl_dpo(["sigmoid"], beta=0.3, ld_alpha=0.4)
    tok = torch.stack([d["per_tok"][:B], d["per_tok"][B:]], dim=1)
    mask = torch.stack([d["shift_mask"][:B], d["shift_mask"][B:]], dim=1).bool()
    scores = reduce("ld", tok, mask, alpha=0.4)
    assert float(scores[:, 0].mean()) == pytest.approx(metrics["logps/chosen"], rel=1e-10)
    assert float(scores[:, 1].mean()) == pytest.approx(metrics["logps/rejected"], rel=1e-10)


# ----------------------------------------------------------------------------------------- CPO family


def _mean_scores(seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 20, (B, 2), generator=g).to(DT)
    lp = -lens * torch.rand(B, 2, generator=g, dtype=DT) * 2.0
    return lp, lens


def _cpo_stub(loss_type, *, beta, label_smoothing=0.0, alpha=0.0, simpo_gamma=0.5):
    return SimpleNamespace(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, alpha=alpha,
                           simpo_gamma=simpo_gamma, accelerator=_accelerator())


def _cpo_loss():
    CPOTrainer = _find(["trl.experimental.cpo", "trl.experimental.cpo.cpo_trainer", "trl", "trl.trainer.cpo_trainer"], "CPOTrainer")
    return _method(CPOTrainer, "cpo_loss")


def test_cpo_sigmoid_with_nll():
    cpo_loss = _cpo_loss()
    lp, lens = _mean_scores()
    losses, cr, rr = cpo_loss(_cpo_stub("sigmoid", beta=0.2, label_smoothing=0.1), lp[:, 0], lp[:, 1])
    nll = -lp[:, 0].sum() / lens[:, 0].sum()  # CPO's cross-entropy: mean over every chosen token
    trl_total = losses.mean() + 0.5 * nll
    out = preference_loss("cpo", lp, lengths=lens, beta=0.2, eps=0.1, alpha=0.5)
    torch.testing.assert_close(out.loss, trl_total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["rewards/chosen"], cr.mean())


def test_cpo_simpo():
    cpo_loss = _cpo_loss()
    lp, lens = _mean_scores()
    m = lp / lens  # CPO averages log-probs for loss_type='simpo'
    losses, cr, _ = cpo_loss(_cpo_stub("simpo", beta=2.5, label_smoothing=0.1, simpo_gamma=0.4), m[:, 0], m[:, 1])
    out = preference_loss("simpo", lp, lengths=lens, beta=2.5, gamma=0.4, eps=0.1)
    torch.testing.assert_close(out.per_example, losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["rewards/chosen"], cr.mean())


def test_cpo_alphapo():
    cpo_loss = _cpo_loss()
    lp, lens = _mean_scores()
    m = lp / lens
    losses, cr, _ = cpo_loss(_cpo_stub("simpo", beta=2.0, simpo_gamma=0.4, alpha=0.25), m[:, 0], m[:, 1])
    out = preference_loss("alphapo", lp, lengths=lens, beta=2.0, gamma=0.4, a=0.25)
    torch.testing.assert_close(out.per_example, losses, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["rewards/chosen"], cr.mean())


def test_orpo_odds_ratio():
    ORPOTrainer = _find(["trl.experimental.orpo", "trl.experimental.orpo.orpo_trainer", "trl", "trl.trainer.orpo_trainer"], "ORPOTrainer")
    odds_ratio_loss = _method(ORPOTrainer, "odds_ratio_loss")
    lp, lens = _mean_scores()
    m = lp / lens
    stub = SimpleNamespace(beta=0.2, accelerator=_accelerator())
    losses, cr, rr, ratio, log_odds = odds_ratio_loss(stub, m[:, 0], m[:, 1])
    nll = -lp[:, 0].sum() / lens[:, 0].sum()
    out = preference_loss("orpo", lp, lengths=lens, lam=0.2)
    tol = dict(rtol=1e-6, atol=1e-7)  # TRL's odds_ratio_loss casts the log-probs to float32
    torch.testing.assert_close(out.loss, nll - losses.mean().double(), **tol)
    torch.testing.assert_close(out.metrics["log_odds_ratio"], ratio.double(), **tol)
    torch.testing.assert_close(out.metrics["log_odds_chosen"], log_odds.double(), **tol)
    torch.testing.assert_close(out.metrics["rewards/chosen"], cr.mean().double(), **tol)


# ---------------------------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("loss_type,key", [("kto", "kto"), ("apo_zero_unpaired", "apo_zero_unpaired")])
def test_kto_trainer(loss_type, key):
    KTOTrainer = _find(["trl", "trl.trainer.kto_trainer", "trl.experimental.kto"], "KTOTrainer")
    compute = _method(KTOTrainer, "_compute_loss")
    g = torch.Generator().manual_seed(3)
    n = 2 * B
    lens = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)).long()
    per_tok = -torch.rand(n, T, generator=g, dtype=DT) * 2.0 * mask
    labels = torch.tensor([True, False] * B)
    ref = per_tok.sum(1) + 0.5 * torch.randn(n, generator=g, dtype=DT)
    kl_lp = -torch.rand(n, generator=g, dtype=DT) * 10
    kl_ref = kl_lp - torch.rand(n, generator=g, dtype=DT)
    outputs = SimpleNamespace(log_probs=per_tok, entropy=torch.zeros_like(per_tok), mean_logits=torch.zeros_like(per_tok), aux_loss=None)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), calculate_KL=loss_type == "kto",
        precompute_ref_logps=True, loss_type=loss_type, beta=0.3, desirable_weight=1.3, undesirable_weight=0.7,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=lambda model, batch: kl_lp if loss_type == "kto" else None,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    batch = {
        "input_ids": torch.zeros(n, T + 1, dtype=torch.long), "attention_mask": torch.ones(n, T + 1, dtype=torch.long),
        "completion_mask": torch.cat([torch.zeros(n, 1, dtype=torch.long), mask], 1), "label": labels,
        "ref_logps": ref, "ref_KL_logps": kl_ref,
    }
    loss = compute(stub, lambda **kw: outputs, batch, False)
    metrics = {k: v[-1] for k, v in stub._metrics["train"].items()}
    lp = per_tok.sum(1)
    if key == "kto":
        out = preference_loss("kto", lp, ref, beta=0.3, desirable_weight=1.3, undesirable_weight=0.7, labels=labels, kl_logps=kl_lp, kl_ref_logps=kl_ref)
        assert float(out.metrics["kl"]) == pytest.approx(metrics["kl"], rel=1e-9)
    else:
        out = preference_loss("apo_zero_unpaired", lp, ref, beta=0.3, labels=labels)
        # TRL also scales apo_zero_unpaired by the desirable/undesirable weights; LOSSES.md's entry has none
        w = torch.where(labels, torch.tensor(1.3, dtype=DT), torch.tensor(0.7, dtype=DT))
        torch.testing.assert_close((w * out.per_example).mean(), loss.to(DT), rtol=1e-10, atol=1e-12)
        return
    torch.testing.assert_close(out.loss, loss.to(DT), rtol=1e-10, atol=1e-12)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(out.metrics[name]) == pytest.approx(metrics[name], rel=1e-9), name



def test_missing_trl_names_skip_with_their_name():
    with pytest.raises(pytest.skip.Exception, match="NoSuchTrainer"):
        _find(["trl"], "NoSuchTrainer")
    with pytest.raises(pytest.skip.Exception, match="DPOTrainer.no_such_loss"):
        _method(_find(["trl"], "DPOTrainer"), "no_such_loss")
