"""fused_linear_kl against an independent float64 reference that materialises both models' logits.

Most tests run the torch backend; ``test_triton_public_api`` runs the public op on backend="triton"
(the interpreter on CPU). The kernels themselves are tested in tests/kernels/test_policy_ref_triton.py.
Tolerances: fp32 1e-5 of the reference's largest magnitude (values 2e-6); fp16/bf16 no worse than
twice the error of plain torch in that dtype against float64, plus a floor of 1e-6 relative.
"""

import importlib.util

import pytest
import torch

import pygpo.ops.policy_ref as policy_ref
from pygpo.ops.dispatch import load_backend
from reference import assert_no_worse_than_baseline, leaf, naive_policy_ref, naive_token_stats, rel_err

fused_linear_kl = policy_ref.fused_linear_kl
OUTPUTS = ("logprobs", "ref_logprobs", "kl")
DIFFERENTIABLE = ("logprobs", "kl")
# (M, D, D_ref, V): odd sizes; V=5 is below every vocabulary chunk
SHAPES = [(37, 48, 40, 1001), (1, 8, 6, 5), (64, 16, 24, 50)]


def _make(m, d, d_ref, v, *, ignore_frac=0.5, seed=0, scale=2.0):
    """float64 policy and reference inputs (the reference a different model), labels, upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    x = dict(
        hidden=torch.randn(m, d, generator=g, dtype=torch.float64) * scale,
        weight=torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5,
        bias=torch.randn(v, generator=g, dtype=torch.float64) * 0.1,
        ref_hidden=torch.randn(m, d_ref, generator=g, dtype=torch.float64) * scale,
        ref_weight=torch.randn(v, d_ref, generator=g, dtype=torch.float64) / d_ref**0.5,
        ref_bias=torch.randn(v, generator=g, dtype=torch.float64) * 0.1,
    )
    labels = torch.randint(0, v, (m,), generator=g)
    labels[torch.rand(m, generator=g) < ignore_frac] = -100
    upstream = {k: torch.randn(m, generator=g, dtype=torch.float64) for k in DIFFERENTIABLE}
    return x, labels, upstream


def _run(fn, x, labels, upstream, dtype, *, bias=True, ref_bias=True):
    """Outputs of ``fn`` and the gradients of ``sum_k <out_k, upstream_k>`` w.r.t. hidden, weight, bias."""
    h, w, b = leaf(x["hidden"], dtype), leaf(x["weight"], dtype), leaf(x["bias"], dtype) if bias else None
    ref = [x["ref_hidden"].to(dtype), x["ref_weight"].to(dtype), x["ref_bias"].to(dtype) if ref_bias else None]
    out = fn(h, w, ref[0], ref[1], labels, b, ref[2])
    total = sum((out[k].double() * upstream[k]).sum() for k in upstream)
    wrt = [t for t in (h, w, b) if t is not None]
    return out, torch.autograd.grad(total, wrt)


def _ours(**kw):
    def fn(h, w, hr, wr, y, b, br):
        return fused_linear_kl(h, w, hr, wr, y, bias=b, ref_bias=br, **kw)._asdict()

    return fn


def _ref(**kw):
    return lambda h, w, hr, wr, y, b, br: naive_policy_ref(h, w, hr, wr, y, b, br, **kw)


@pytest.mark.parametrize("m,d,d_ref,v", SHAPES)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("memory_budget", [None, 3000])  # 3000 bytes forces vocabulary tiles and online rescaling
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 4.0)])
def test_fp32_matches_float64_reference(m, d, d_ref, v, ignore_frac, memory_budget, temperature, softcap):
    x, labels, upstream = _make(m, d, d_ref, v, ignore_frac=ignore_frac)
    kw = dict(temperature=temperature, softcap=softcap)
    ref_out, ref_grads = _run(_ref(**kw), x, labels, upstream, torch.float64)
    out, grads = _run(_ours(backend="torch", memory_budget=memory_budget, **kw), x, labels, upstream, torch.float32)
    for k in OUTPUTS:
        assert out[k].dtype == torch.float32 and out[k].shape == labels.shape, k
        assert rel_err(out[k], ref_out[k]) < 2e-6, k
        assert torch.all(out[k][labels == -100] == 0), k
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < 1e-5, name


@pytest.mark.parametrize("bias,ref_bias", [(False, False), (True, False), (False, True)])
def test_without_biases(bias, ref_bias):
    x, labels, upstream = _make(37, 48, 40, 1001, seed=1)
    ref_out, ref_grads = _run(_ref(), x, labels, upstream, torch.float64, bias=bias, ref_bias=ref_bias)
    out, grads = _run(_ours(backend="torch"), x, labels, upstream, torch.float32, bias=bias, ref_bias=ref_bias)
    for k in OUTPUTS:
        assert rel_err(out[k], ref_out[k]) < 2e-6, k
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_leading_shape_and_ignored_rows():
    x, labels, upstream = _make(24, 16, 12, 70)
    shape = (2, 3, 4)
    h = leaf(x["hidden"].float().reshape(*shape, 16))
    hr, y = x["ref_hidden"].float().reshape(*shape, 12), labels.reshape(shape)
    out = fused_linear_kl(h, x["weight"].float(), hr, x["ref_weight"].float(), y, backend="torch")
    ref = naive_policy_ref(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], labels)
    for k in OUTPUTS:
        assert getattr(out, k).shape == shape
        assert rel_err(getattr(out, k), ref[k].reshape(shape)) < 2e-6, k
        assert torch.all(getattr(out, k)[y == -100] == 0), k
    (out.kl * upstream["kl"].float().reshape(shape)).sum().backward()
    assert torch.all(h.grad[y == -100] == 0)
    assert torch.any(h.grad[y != -100] != 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_plain_torch(dtype):
    """Error vs float64 must not exceed twice that of the same computation done by plain torch in ``dtype``."""
    x, labels, upstream = _make(37, 48, 40, 1001)
    kw = dict(temperature=0.8, softcap=5.0)
    ref_out, ref_grads = _run(_ref(**kw), x, labels, upstream, torch.float64)
    base_out, base_grads = _run(_ref(dtype=dtype, **kw), x, labels, upstream, dtype)
    out, grads = _run(_ours(backend="torch", **kw), x, labels, upstream, dtype)
    assert all(out[k].dtype == torch.float32 for k in OUTPUTS) and all(g.dtype == dtype for g in grads)
    assert_no_worse_than_baseline(OUTPUTS, (out, grads), (base_out, base_grads), (ref_out, ref_grads))


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.6, softcap=3.0, memory_budget=2000)])
def test_gradcheck_float64(options):
    x, labels, _ = _make(7, 5, 4, 13, ignore_frac=0.3)
    memory_budget = options.pop("memory_budget", None)

    def fn(h, w, b):
        out = fused_linear_kl(h, w, x["ref_hidden"], x["ref_weight"], labels, bias=b, ref_bias=x["ref_bias"],
                              backend="torch", memory_budget=memory_budget, **options)
        return out.logprobs, out.kl

    ins = (leaf(x["hidden"]), leaf(x["weight"]), leaf(x["bias"]))
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-6)


def test_reference_tensors_receive_no_gradient():
    """Reference tensors that require grad are treated as constants: no gradient, no graph."""
    x, labels, upstream = _make(37, 48, 40, 1001)
    h, w = leaf(x["hidden"], torch.float32), leaf(x["weight"], torch.float32)
    hr, wr, br = (leaf(x[k], torch.float32) for k in ("ref_hidden", "ref_weight", "ref_bias"))
    out = fused_linear_kl(h, w, hr, wr, labels, ref_bias=br, backend="torch")
    assert not out.ref_logprobs.requires_grad and out.ref_logprobs.grad_fn is None
    (out.kl * upstream["kl"].float() + out.logprobs).sum().backward()
    assert hr.grad is None and wr.grad is None and br.grad is None
    assert h.grad is not None and w.grad is not None
    # the same values as with detached reference tensors
    detached = fused_linear_kl(h.detach(), w.detach(), hr.detach(), wr.detach(), labels, ref_bias=br.detach(),
                               backend="torch")
    for k in OUTPUTS:
        assert torch.equal(getattr(out, k).detach(), getattr(detached, k)), k


def test_identical_models_give_exactly_zero_kl_and_kl_gradient():
    """With the reference equal to the policy, u = 0 and s = s_r bitwise: KL is 0 and so is p - q."""
    x, labels, _ = _make(37, 48, 48, 1001)
    h, w, b = leaf(x["hidden"], torch.float32), leaf(x["weight"], torch.float32), leaf(x["bias"], torch.float32)
    for budget in (None, 3000):
        out = fused_linear_kl(h, w, h, w, labels, bias=b, ref_bias=b, backend="torch", memory_budget=budget,
                              softcap=4.0)
        assert torch.equal(out.kl, torch.zeros_like(out.kl))
        assert torch.equal(out.logprobs, out.ref_logprobs)
        g_h, g_w, g_b = torch.autograd.grad(out.kl.sum(), (h, w, b))
        assert not (g_h.any() or g_w.any() or g_b.any())


def test_extreme_logits_stay_finite_and_exact():
    """|z| ~ 1e4 for both models, disagreeing: the two online maxima keep exp() in range."""
    h = torch.tensor([[1e4, 0.0], [-1e4, 3e3], [5e3, -5e3]])
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    hr = torch.tensor([[-8e3], [2e3], [9e3]])
    wr = torch.tensor([[1.0], [-1.0], [0.3], [0.0]])
    y = torch.tensor([0, 1, 3])
    h.requires_grad_(True)
    # 24 bytes: one vocabulary column per tile, maximal rescaling
    out = fused_linear_kl(h, w, hr, wr, y, backend="torch", memory_budget=24)
    ref = naive_policy_ref(h.detach(), w, hr, wr, y)
    for k in OUTPUTS:
        assert torch.isfinite(getattr(out, k)).all(), k
        assert torch.allclose(getattr(out, k).double(), ref[k], rtol=1e-6, atol=1e-3), k
    (out.kl + out.logprobs).sum().backward()
    assert torch.isfinite(h.grad).all()


METRICS = ("entropy", "mean_logit")


def _metrics_ref(x, labels, **kw):
    """The policy's float64 entropy and mean logit (one model's statistics, from materialised logits)."""
    ref = naive_token_stats(x["hidden"], x["weight"], labels, x["bias"], **kw)
    return {k: ref[k] for k in METRICS}


@pytest.mark.parametrize("return_entropy,return_mean_logit,memory_budget,temperature,softcap", [
    (True, True, None, 1.0, None), (True, True, 3000, 0.7, 4.0),  # 3000 bytes: vocabulary tiles, rescaling
    (True, False, 3000, 1.0, None), (False, True, None, 0.7, 4.0),
])
def test_metrics_match_float64_reference(return_entropy, return_mean_logit, memory_budget, temperature, softcap):
    """Entropy and mean logit of the policy: float32, labels' shape, 0 at ignored rows, no gradient; the
    other outputs and their gradients are bitwise those of the call without metrics."""
    x, labels, upstream = _make(37, 48, 40, 1001, seed=2)
    kw = dict(temperature=temperature, softcap=softcap)
    flags = dict(return_entropy=return_entropy, return_mean_logit=return_mean_logit)
    ref = _metrics_ref(x, labels, **kw)
    plain, plain_grads = _run(_ours(backend="torch", memory_budget=memory_budget, **kw), x, labels, upstream,
                              torch.float32)
    out, grads = _run(_ours(backend="torch", memory_budget=memory_budget, **kw, **flags), x, labels, upstream,
                      torch.float32)
    for k, wanted in zip(METRICS, (return_entropy, return_mean_logit)):
        if not wanted:
            assert out[k] is None, k
            continue
        assert out[k].dtype == torch.float32 and out[k].shape == labels.shape, k
        assert not out[k].requires_grad and out[k].grad_fn is None, k
        assert rel_err(out[k], ref[k]) < 2e-6, k
        assert torch.all(out[k][labels == -100] == 0), k
    for k in OUTPUTS:
        assert torch.equal(out[k], plain[k]), k
    for g, p in zip(grads, plain_grads):
        assert torch.equal(g, p)


def test_default_return_is_the_three_field_tuple():
    x, labels, _ = _make(5, 8, 6, 13)
    args = [x[k].float() for k in ("hidden", "weight", "ref_hidden", "ref_weight")] + [labels]
    out = fused_linear_kl(*args, backend="torch")
    assert type(out) is policy_ref.PolicyRefLogProbs and len(out) == 3
    logprobs, ref_logprobs, kl = out  # existing callers unpack three values
    both = fused_linear_kl(*args, backend="torch", return_entropy=True, return_mean_logit=True)
    assert type(both) is policy_ref.PolicyRefOutputs and both._fields == OUTPUTS + METRICS
    only = fused_linear_kl(*args, backend="torch", return_mean_logit=True)
    assert only.entropy is None and only.mean_logit.shape == labels.shape


def test_metrics_of_all_ignored_rows_and_leading_shape():
    x, labels, _ = _make(24, 16, 12, 70, ignore_frac=1.0)
    shape = (2, 3, 4)
    h = leaf(x["hidden"].float().reshape(*shape, 16))
    out = fused_linear_kl(h, x["weight"].float(), x["ref_hidden"].float().reshape(*shape, 12),
                          x["ref_weight"].float(), labels.reshape(shape), backend="torch", return_entropy=True,
                          return_mean_logit=True)
    for k in METRICS:
        value = getattr(out, k)
        assert value.shape == shape and value.dtype == torch.float32 and not value.requires_grad, k
        assert not value.any(), k


def test_metrics_of_extreme_logits():
    """|z| ~ 1e4, one vocabulary column per tile: t stays relative to the running max, so the entropy is
    accurate (a near-one-hot policy has entropy near 0) and finite."""
    h = torch.tensor([[1e4, 0.0], [-1e4, 3e3], [5e3, -5e3], [0.3, -0.2]])
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    hr, wr = torch.randn(4, 1), torch.randn(4, 1)
    y = torch.tensor([0, 1, 3, 2])
    out = fused_linear_kl(h, w, hr, wr, y, backend="torch", memory_budget=24, return_entropy=True,
                          return_mean_logit=True)
    ref = naive_token_stats(h, w, y)
    for k in METRICS:
        assert torch.allclose(getattr(out, k).double(), ref[k], rtol=1e-6, atol=1e-6), k


N, D, D_REF, V = 6, 8, 5, 11


def _ok():
    return dict(hidden=torch.randn(N, D), weight=torch.randn(V, D), ref_hidden=torch.randn(N, D_REF),
                ref_weight=torch.randn(V, D_REF), labels=torch.randint(0, V, (N,)))


@pytest.mark.parametrize("change,exc,match", [
    (dict(ref_weight=torch.randn(V + 1, D_REF)), ValueError, "ref_weight must have the policy's vocabulary size V=11"),
    (dict(ref_hidden=torch.randn(N + 1, D_REF)), ValueError, "ref_hidden's leading shape"),
    (dict(ref_hidden=torch.randn(2, 3, D_REF)), ValueError, "ref_hidden's leading shape"),
    (dict(ref_hidden=torch.randn(N, D_REF + 1)), ValueError, "ref_hidden's last dimension"),
    (dict(ref_weight=torch.randn(V)), ValueError, r"ref_weight must have shape \(V, D\)"),
    (dict(ref_hidden=torch.randn(N, D_REF).double(), ref_weight=torch.randn(V, D_REF).double()), TypeError,
     "ref_hidden dtype torch.float64 must match hidden dtype"),
    (dict(ref_weight=torch.randn(V, D_REF).half()), TypeError, "ref_weight dtype"),
    (dict(ref_bias=torch.randn(V + 2)), ValueError, r"ref_bias must have shape \(V,\)"),
    (dict(ref_bias=torch.randn(V).double()), TypeError, "ref_bias dtype"),
    (dict(ref_hidden=torch.randn(N, D_REF).long()), TypeError, "ref_hidden must be a floating-point"),
    (dict(ref_hidden=[[0.0]]), TypeError, "ref_hidden must be a torch.Tensor"),
    (dict(ref_weight=torch.randn(V, D_REF, device="meta")), ValueError, "one device.*ref_weight on meta"),
    (dict(ref_bias=torch.randn(V, device="meta")), ValueError, "one device.*ref_bias on meta"),
    (dict(weight=torch.randn(V + 1, D)), ValueError, "ref_weight must have the policy's vocabulary size V=12"),
    (dict(labels=torch.full((N,), V)), ValueError, r"labels must lie in \[0, 11\)"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(memory_budget=0), ValueError, "memory_budget"),
    (dict(backend="magic"), ValueError, "backend must be one of"),
    (dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
    (dict(return_mean_logit="yes"), TypeError, "return_mean_logit must be a bool"),
])
def test_bad_input_names_the_argument(change, exc, match):
    args = _ok()
    args.update(change)
    pos = [args.pop(k) for k in ("hidden", "weight", "ref_hidden", "ref_weight", "labels")]
    with pytest.raises(exc, match=match):
        fused_linear_kl(*pos, **args)


def test_empty_input():
    h, w = torch.randn(0, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    out = fused_linear_kl(h, w, torch.randn(0, D_REF), torch.randn(V, D_REF), torch.zeros(0, dtype=torch.long))
    assert all(getattr(out, k).shape == (0,) for k in OUTPUTS)
    (out.logprobs.sum() + out.kl.sum()).backward()
    assert h.grad.shape == h.shape and torch.count_nonzero(w.grad) == 0


def test_policy_ref_backends_are_registered():
    assert hasattr(load_backend("torch", "policy_ref"), "compute_policy_ref")
    assert hasattr(load_backend("torch"), "compute_token_stats")  # the default op is unchanged
    with pytest.raises(ValueError, match="unknown op"):
        load_backend("torch", "nonsense")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_public_api(deterministic):
    """backend="triton" through compaction and scatter: leading shape, half the rows ignored, both biases;
    the deterministic run also asks for the policy's entropy and mean logit."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, labels, upstream = _make(39, 40, 24, 333, seed=5)
    kw = dict(temperature=0.8, softcap=5.0)
    ref_out, ref_grads = _run(_ref(**kw), x, labels, upstream, torch.float64)
    shape = (3, 13)

    def ours(h, w, hr, wr, y, b, br):
        out = fused_linear_kl(h.to(device).reshape(*shape, -1), w.to(device), hr.to(device).reshape(*shape, -1),
                              wr.to(device), y.to(device).reshape(shape), bias=b.to(device), ref_bias=br.to(device),
                              backend="triton", deterministic=deterministic, return_entropy=deterministic,
                              return_mean_logit=deterministic, **kw)
        assert len(out) == (5 if deterministic else 3)
        return {k: getattr(out, k).reshape(-1).cpu() for k in out._fields}

    out, grads = _run(ours, x, labels, upstream, torch.float32)
    if deterministic:
        ref_out.update(_metrics_ref(x, labels, **kw))
    for k in OUTPUTS + (METRICS if deterministic else ()):
        assert rel_err(out[k], ref_out[k]) < 1e-5, k
        assert torch.all(out[k][labels == -100] == 0), k
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(g.cpu(), r) < 2e-5, name
