"""pygpo.integrations.liger against Liger-Kernel itself (CPU, eager) and against a float64 reference.

Every comparison runs Liger's class and pygpo's class of the same name on the same inputs and checks the
loss, every auxiliary output and the gradients w.r.t. ``_input``, ``weight`` and ``bias``. Liger works
in float32 (it rounds float64 log-probs to float32), so those comparisons use float32 tolerances; the
float64 reference test checks pygpo alone, tightly.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from reference import leaf, naive_logits, naive_token_stats

from pygpo.integrations import liger as compat

B, T, D, V = 3, 7, 16, 50
CLASSES = ("DPO", "ORPO", "CPO", "SimPO", "KTO")
FUNCTIONS = {"DPO": "dpo", "ORPO": "orpo", "CPO": "cpo", "SimPO": "simpo", "KTO": "kto"}
PYGPO_OPTIONS = {"backend": "auto", "memory_budget": None, "deterministic": None}


@pytest.fixture(scope="module")
def liger():
    return pytest.importorskip("liger_kernel.chunked_loss")


def make_batch(dtype=torch.float32, *, ignore_index=-100, rows=2 * B, bias=True, seed=0):
    """Policy and reference heads, and targets whose prompt prefixes (and one inner token) are ignored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, T, D, generator=g, dtype=dtype)
    w = torch.randn(V, D, generator=g, dtype=dtype) * 0.5
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    ref_x = torch.randn(rows, T, D, generator=g, dtype=dtype)
    ref_w = w + 0.1 * torch.randn(V, D, generator=g, dtype=dtype)
    target = torch.randint(0, V, (rows, T), generator=g)
    for r in range(rows):
        target[r, : 1 + r % 3] = ignore_index
    target[1, 5] = ignore_index
    return dict(x=x, w=w, b=b, ref_x=ref_x, ref_w=ref_w, target=target)


def call(module, name, batch, forward_kw):
    """Run ``module`` on fresh leaves of the batch; return (loss, outputs, grads of _input/weight/bias)."""
    x, w = leaf(batch["x"]), leaf(batch["w"])
    b = None if batch["b"] is None else leaf(batch["b"])
    if name == "KTO":  # Liger's KTO module takes _input first
        loss, outputs = module(x, w, batch["target"], b, **forward_kw)
    else:
        loss, outputs = module(w, x, batch["target"], b, **forward_kw)
    (2.0 * loss).backward()  # an upstream gradient other than 1
    return loss, outputs, [t.grad for t in (x, w, b) if t is not None]


def assert_matches(mine, theirs):
    loss, outputs, grads = mine
    l_loss, l_outputs, l_grads = theirs
    close = dict(rtol=2e-5, atol=2e-5, check_dtype=False)
    torch.testing.assert_close(loss, l_loss.to(loss.dtype), **close)
    assert len(outputs) == len(l_outputs)
    for k, (a, e) in enumerate(zip(outputs, l_outputs)):
        assert a.shape == e.shape, f"output {k}: shape {tuple(a.shape)} != Liger's {tuple(e.shape)}"
        assert not a.requires_grad, f"output {k} must be detached"
        torch.testing.assert_close(a, e.to(a.dtype), msg=lambda m, k=k: f"output {k}: {m}", **close)
    assert len(grads) == len(l_grads)
    for name, a, e in zip(("_input", "weight", "bias"), grads, l_grads):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"grad {name}: {m}", **close)


def kto_labels():
    return torch.tensor([True, False, True, True, False, False])


# (class, constructor kwargs, forward kwargs from the batch)
REF = lambda bt: dict(ref_input=bt["ref_x"], ref_weight=bt["ref_w"])  # noqa: E731
NONE = lambda bt: {}  # noqa: E731
CASES = [
    ("DPO", {}, REF),
    ("DPO", dict(beta=0.5, compute_nll_loss=True, alpha=0.3, average_log_prob=True), REF),
    ("DPO", dict(use_ref_model=False, loss_type="robust", label_smoothing=0.2), NONE),
    ("DPO", dict(loss_type="hinge"), REF),
    ("DPO", dict(loss_type="exo_pair", label_smoothing=1e-2), REF),
    ("DPO", dict(loss_type="nca_pair"), REF),
    ("DPO", dict(loss_type="bco_pair"), REF),
    ("DPO", dict(loss_type="sppo_hard", beta=1.0), REF),
    ("DPO", dict(loss_type="apo_zero"), REF),
    ("DPO", dict(loss_type="apo_down", beta=0.3), REF),
    ("DPO", dict(loss_type="discopop", discopop_tau=0.1), REF),
    ("ORPO", {}, NONE),
    ("ORPO", dict(beta=0.5, compute_nll_loss=False), NONE),
    ("CPO", {}, NONE),
    ("CPO", dict(beta=0.2, alpha=0.5, label_smoothing=0.1, average_log_prob=True), NONE),
    ("CPO", dict(compute_nll_loss=False), NONE),
    ("SimPO", {}, NONE),
    ("SimPO", dict(beta=2.0, gamma=1.0, label_smoothing=0.1, compute_nll_loss=False), NONE),
    ("KTO", {}, lambda bt: dict(preference_labels=kto_labels())),
    ("KTO", dict(use_ref_model=True, beta=0.5),
     lambda bt: dict(preference_labels=kto_labels(), kl=torch.tensor(0.2), **REF(bt))),
    ("KTO", dict(average_log_prob=True), lambda bt: dict(preference_labels=kto_labels(), kl=0.1)),
]


@pytest.mark.parametrize("name,ctor,forward", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_matches_liger(liger, name, ctor, forward):
    batch = make_batch()
    kw = forward(batch)
    theirs = call(getattr(liger, f"LigerFusedLinear{name}Loss")(compiled=False, **ctor), name, batch, kw)
    mine = call(getattr(compat, f"LigerFusedLinear{name}Loss")(**ctor), name, batch, kw)
    assert mine[0].requires_grad and mine[0].dim() == 0
    assert_matches(mine, theirs)


@pytest.mark.parametrize("name", CLASSES)
def test_matches_liger_float64_no_bias_other_ignore_index(liger, name):
    batch = make_batch(torch.float64, ignore_index=-1, bias=False, seed=1)
    ctor = dict(ignore_index=-1, compute_nll_loss=True) if name in ("ORPO", "CPO", "SimPO") else dict(ignore_index=-1)
    kw = dict(preference_labels=kto_labels()) if name == "KTO" else REF(batch) if name == "DPO" else {}
    theirs = call(getattr(liger, f"LigerFusedLinear{name}Loss")(compiled=False, **ctor), name, batch, kw)
    mine = call(getattr(compat, f"LigerFusedLinear{name}Loss")(**ctor), name, batch, kw)
    assert mine[0].dtype == torch.float64
    assert_matches(mine, theirs)


@pytest.mark.parametrize("name", ["DPO", "KTO"])
def test_triton_backend_matches_liger(liger, name):
    """pygpo's options reach the fused op: the Triton kernels (interpreted on CPU) give Liger's numbers too."""
    batch = make_batch(seed=7)
    kw = dict(REF(batch), preference_labels=kto_labels()) if name == "KTO" else REF(batch)
    ctor = dict(use_ref_model=True) if name == "KTO" else dict(compute_nll_loss=True)
    theirs = call(getattr(liger, f"LigerFusedLinear{name}Loss")(compiled=False, **ctor), name, batch, kw)
    mine = call(getattr(compat, f"LigerFusedLinear{name}Loss")(**ctor, backend="triton"), name, batch, kw)
    assert_matches(mine, theirs)


def test_attributes_set_after_construction_take_effect(liger):
    batch = make_batch(seed=8)
    theirs = call(liger.LigerFusedLinearCPOLoss(compiled=False, beta=0.4, alpha=0.2), "CPO", batch, {})
    module = compat.LigerFusedLinearCPOLoss()
    module.beta, module.alpha = 0.4, 0.2
    assert_matches(call(module, "CPO", batch, {}), theirs)


def test_orpo_nll_target_matches_liger(liger):
    batch = make_batch(seed=2)
    nll_target = torch.randint(0, V, (2 * B, T), generator=torch.Generator().manual_seed(3))
    nll_target[:, :3] = -100
    kw = dict(nll_target=nll_target)
    theirs = call(liger.LigerFusedLinearORPOLoss(compiled=False, beta=0.2), "ORPO", batch, kw)
    mine = call(compat.LigerFusedLinearORPOLoss(beta=0.2), "ORPO", batch, kw)
    assert_matches(mine, theirs)


def test_functional_forms_match_liger(liger):
    from liger_kernel.chunked_loss import functional as lf

    batch = make_batch(seed=4)
    x, w, target, b = batch["x"], batch["w"], batch["target"], batch["b"]
    # Positional arguments in Liger's order: (_input, weight, target, bias, ref_input, ref_weight, ref_bias,
    # ignore_index, beta, compute_nll_loss, compiled, use_ref_model, average_log_prob, ...)
    args = (x, w, target, b, batch["ref_x"], batch["ref_w"], None, -100, 0.2, True, False, True, True)
    l_loss, l_out = lf.liger_fused_linear_dpo(*args)
    loss, out = compat.liger_fused_linear_dpo(*args)
    torch.testing.assert_close(loss, l_loss, rtol=2e-5, atol=2e-5)
    for a, e in zip(out, l_out, strict=True):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)
    args = (x, w, target, kto_labels(), b, None, None, None, torch.tensor(0.1), -100, 0.3, False, False)
    l_loss, l_out = lf.liger_fused_linear_kto(*args)
    loss, out = compat.liger_fused_linear_kto(*args)
    torch.testing.assert_close(loss, l_loss, rtol=2e-5, atol=2e-5)
    for a, e in zip(out, l_out, strict=True):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)


def test_reference_gets_no_gradient(liger):
    batch = make_batch(seed=5)
    ref_x, ref_w = leaf(batch["ref_x"]), leaf(batch["ref_w"])
    loss, _ = compat.LigerFusedLinearDPOLoss()(leaf(batch["w"]), leaf(batch["x"]), batch["target"], leaf(batch["b"]),
                                               ref_input=ref_x, ref_weight=ref_w)
    loss.backward()
    assert ref_x.grad is None and ref_w.grad is None


# ----------------------------------------------------------------------------------------- signatures


def _params(fn, drop=()):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name not in drop]


def _assert_prefix_signature(mine, theirs, *, drop=()):
    """Liger's parameters come first, identical; pygpo's extras are keyword-only with pygpo's defaults."""
    ours, expected = _params(mine, drop), _params(theirs, drop)
    assert ours[: len(expected)] == expected
    extras = ours[len(expected):]
    for name, kind, default in extras:
        assert kind is inspect.Parameter.KEYWORD_ONLY and PYGPO_OPTIONS[name] == default


@pytest.mark.parametrize("name", CLASSES)
def test_module_signatures_match_liger(liger, name):
    theirs, mine = getattr(liger, f"LigerFusedLinear{name}Loss"), getattr(compat, f"LigerFusedLinear{name}Loss")
    _assert_prefix_signature(mine.__init__, theirs.__init__)
    assert _params(mine.forward) == _params(theirs.forward)
    assert {k for k, *_ in _params(mine.__init__)} - {k for k, *_ in _params(theirs.__init__)} == set(PYGPO_OPTIONS)


@pytest.mark.parametrize("name", CLASSES)
def test_functional_signatures_match_liger(liger, name):
    from liger_kernel.chunked_loss import functional as lf

    liger_fn = getattr(lf, f"LigerFusedLinear{name}Function").forward
    mine = getattr(compat, f"liger_fused_linear_{FUNCTIONS[name]}")
    _assert_prefix_signature(mine, liger_fn, drop=("ctx",))


def test_dpo_supported_loss_types_match_liger(liger):
    assert compat.LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES == liger.LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES


# ------------------------------------------------------------------------------- independent float64


def test_dpo_against_float64_log_softmax():
    """DPO with a reference and the NLL, from materialised float64 logits and the paper's formula."""
    batch = make_batch(torch.float64, seed=6)
    beta, alpha = 0.3, 0.7
    x, w, b, target = leaf(batch["x"]), leaf(batch["w"]), leaf(batch["b"]), batch["target"]
    loss, out = compat.LigerFusedLinearDPOLoss(beta=beta, alpha=alpha, compute_nll_loss=True)(
        w, x, target, b, ref_input=batch["ref_x"], ref_weight=batch["ref_w"])
    grads = torch.autograd.grad(loss, (x, w, b))

    xr, wr, br = leaf(batch["x"]), leaf(batch["w"]), leaf(batch["b"])
    lp = naive_token_stats(xr, wr, target, br)["logprobs"].sum(-1)
    rp = naive_token_stats(batch["ref_x"], batch["ref_w"], target)["logprobs"].sum(-1)
    valid = target != -100
    h = (lp[:B] - rp[:B]) - (lp[B:] - rp[B:])
    nll = -lp[:B].sum() / valid[:B].sum()
    expected = -F.logsigmoid(beta * h).mean() + alpha * nll
    expected_grads = torch.autograd.grad(expected, (xr, wr, br))
    logits = naive_logits(batch["x"], batch["w"], batch["b"])

    tight = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, expected, **tight)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, **tight)
    expected_out = (lp[:B], lp[B:], logits[:B].mean(), logits[B:].mean(), nll,
                    beta * (lp[:B] - rp[:B]), beta * (lp[B:] - rp[B:]))
    for a, e in zip(out, expected_out, strict=True):
        torch.testing.assert_close(a, e.detach(), **tight)


# ------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    bt = make_batch()
    w, x, y = bt["w"], bt["x"], bt["target"]
    dpo = compat.LigerFusedLinearDPOLoss(use_ref_model=False)
    with pytest.raises(ValueError, match="even number of rows"):
        dpo(w, x[:5], y[:5])
    with pytest.raises(ValueError, match=r"_input must have shape \(2B, T, D\)"):
        dpo(w, x[0], y[0])
    with pytest.raises(ValueError, match="target must have _input's leading shape"):
        dpo(w, x, y[:, :-1])
    with pytest.raises(ValueError, match="last dimension"):
        dpo(w[:, :-1], x, y)
    with pytest.raises(ValueError, match=r"target: labels must lie in \[0, 50\)"):
        dpo(w, x, y + V)
    with pytest.raises(ValueError, match="use_ref_model=True needs .* ref_weight not given"):
        compat.LigerFusedLinearDPOLoss()(w, x, y, ref_input=bt["ref_x"])
    with pytest.raises(ValueError, match="ref_weight must have the policy's vocabulary size"):
        compat.LigerFusedLinearDPOLoss()(w, x, y, ref_input=bt["ref_x"], ref_weight=bt["ref_w"][:-1])
    empty = y.clone()
    empty[4] = -100
    with pytest.raises(ValueError, match="target row 4 has no token"):
        compat.LigerFusedLinearSimPOLoss()(w, x, empty)
    with pytest.raises(ValueError, match="Unsupported loss_type: 'ipo'"):
        compat.LigerFusedLinearDPOLoss(loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing must be > 0 for loss_type='exo_pair'"):
        compat.LigerFusedLinearDPOLoss(loss_type="exo_pair")
    with pytest.raises(ValueError, match="robust"):
        compat.LigerFusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        compat.LigerFusedLinearCPOLoss(beta=-1.0)


def test_kto_bad_inputs_raise_clear_errors():
    bt = make_batch()
    kto = compat.LigerFusedLinearKTOLoss()
    x, w, y = bt["x"], bt["w"], bt["target"]
    with pytest.raises(ValueError, match="preference_labels is required"):
        kto(x, w, y)
    with pytest.raises(TypeError, match="preference_labels must be a bool tensor"):
        kto(x, w, y, preference_labels=kto_labels().long())
    with pytest.raises(ValueError, match=r"preference_labels must have shape \(N,\) = \(6,\)"):
        kto(x, w, y, preference_labels=kto_labels()[:4])
    with pytest.raises(ValueError, match=r"kl must be a scalar .* or have shape \(N,\) = \(6,\)"):
        kto(x, w, y, preference_labels=kto_labels(), kl=torch.zeros(5))
    with pytest.raises(TypeError, match="kl must be a real number or a tensor, got str"):
        kto(x, w, y, preference_labels=kto_labels(), kl="0.1")


def test_kto_per_row_kl_matches_liger_with_one_chunk_and_float64(liger):
    """An (N,) kl is one reference point per row: Liger applies it so when one chunk holds the batch; a
    float64 reading of the formula confirms it. numpy scalars are accepted as numbers."""
    import numpy as np

    bt = make_batch()
    rows = 2 * B
    labels = kto_labels()
    kl = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0, 0.3])
    forward_kw = dict(preference_labels=labels, kl=kl, **REF(bt))
    mine = call(compat.LigerFusedLinearKTOLoss(chunk_size=rows, use_ref_model=True), "KTO", bt, forward_kw)
    theirs = call(liger.LigerFusedLinearKTOLoss(compiled=False, chunk_size=rows, use_ref_model=True), "KTO", bt,
                  forward_kw)
    assert_matches(mine, theirs)
    # float64 reference from the formula: mean_i 1 - sigma(beta (u_i - kl_i) sign_i)
    x, w, b, rx, rw = (bt[k].double() for k in ("x", "w", "b", "ref_x", "ref_w"))
    s, s_ref = (naive_token_stats(h, m, bt["target"], c)["logprobs"].sum(-1) for h, m, c in ((x, w, b), (rx, rw, None)))
    sign = labels.double() * 2 - 1
    want = (1 - torch.sigmoid(0.1 * (s - s_ref - kl.double()) * sign)).mean()
    torch.testing.assert_close(mine[0].double(), want, rtol=1e-5, atol=1e-6)
    scalar = call(compat.LigerFusedLinearKTOLoss(), "KTO", bt, dict(forward_kw, kl=np.float32(0.3)))
    assert_matches(scalar, call(liger.LigerFusedLinearKTOLoss(), "KTO", bt, dict(forward_kw, kl=np.float32(0.3))))
