"""Triton backend of the policy + reference log-probs and KL against an independent float64 reference.

Runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``) on small odd shapes:
``M=37, D=48, D_ref=40, V=1001`` is a multiple of no block size, ``V=50`` is below one vocabulary block
and ``M=1`` below one row block. Tests compare the three outputs (and, where requested, the policy's
entropy and mean logit) and the gradients w.r.t. the policy's hidden, weight and bias under random
per-row upstream gradients with a computation over materialised float64 logits written here with
plain torch ops.

Tolerances: fp32 within 1e-5 of the reference's largest magnitude; fp16/bf16 no worse than twice the
error of the same naive computation done by torch in that dtype, plus a floor of 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

pytest.importorskip("triton")

from pygpo.kernels import INTERPRET  # noqa: E402
from pygpo.kernels.policy_ref_fwd import policy_ref_fwd  # noqa: E402
from pygpo.ops.backends.triton_policy_ref import compute_policy_ref  # noqa: E402
from pygpo.ops.token_stats import StatRequest  # noqa: E402
from gpu_compile import assert_compiles, has_cuda_backend  # noqa: E402
from reference import naive_policy_ref, naive_token_stats  # noqa: E402
from triton_checks import FP32_RTOL, assert_matches_reference, max_err, scale, triton_device  # noqa: E402

DEVICE = triton_device()
NAMES = ("logprobs", "ref_logprobs", "kl")
METRICS = ("entropy", "mean_logit")
ODD = (37, 48, 40, 1001)  # M, D, D_ref, V


# ----------------------------------------------------------------------------- reference


def requested(req):
    """The output names ``req`` asks for: the three always, then the requested policy metrics."""
    return NAMES + tuple(k for k in METRICS if getattr(req, k))


def run_naive(inputs, grads, dtype, req):
    """Forward values (the policy metrics ``req`` asks for included) and policy gradients of the naive
    computation in ``dtype`` (reference detached)."""
    h, w, b, hr, wr, br, y = inputs
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_(x.requires_grad) for x in (h, w, b)]
    ref = [None if x is None else x.detach().to(dtype) for x in (hr, wr, br)]
    out = naive_policy_ref(leaves[0], leaves[1], ref[0], ref[1], y, leaves[2], ref[2],
                           temperature=req.temperature, softcap=req.softcap, dtype=dtype)
    sum((out[k] * g.to(dtype)).sum() for k, g in grads.items()).backward()
    with torch.no_grad():
        out.update(naive_token_stats(leaves[0], leaves[1], y, leaves[2], temperature=req.temperature,
                                     softcap=req.softcap, dtype=dtype))
    return {k: out[k].detach() for k in requested(req)}, [None if x is None else x.grad for x in leaves]


def run_triton(inputs, grads, req, **kwargs):
    h, w, b, hr, wr, br, y = inputs
    # detach() keeps storage and strides (clone() would make strided inputs contiguous)
    leaves = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in (h, w, b)]
    ref = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in (hr, wr, br)]
    out = compute_policy_ref(*leaves, *ref, y, req, **kwargs)._asdict()
    names = requested(req)
    for k in names:
        assert out[k].dtype == torch.float32 and out[k].shape == y.shape, k
    assert all(out[k] is None for k in METRICS if k not in names)
    assert not any(out[k].requires_grad for k in names if k not in ("logprobs", "kl")), "a constant has a graph"
    sum((out[k] * g).sum() for k, g in grads.items()).backward()
    assert all(x is None or x.grad is None for x in ref), "the reference received a gradient"
    return {k: out[k].detach() for k in names}, [None if x is None else x.grad for x in leaves]


def make_inputs(m, d, d_ref, v, dtype, *, bias=True, logit_scale=1.0, seed=0):
    """Policy and reference inputs rounded to ``dtype``; logits have standard deviation about ``2 logit_scale``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g) * (2.0 / d**0.5)
    w = torch.randn(v, d, generator=g) * logit_scale
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    hr = torch.randn(m, d_ref, generator=g) * (2.0 / d_ref**0.5)
    wr = torch.randn(v, d_ref, generator=g) * logit_scale
    br = torch.randn(v, generator=g) * 0.5 if bias else None
    y = torch.randint(0, v, (m,), generator=g)
    cast = lambda x: None if x is None else x.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    # the reference tensors require grad too: they must still receive none
    return cast(h), cast(w), cast(b), cast(hr), cast(wr), cast(br), y.to(DEVICE)


def upstream(m, only=("logprobs", "kl"), seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(m, generator=g).to(DEVICE) for k in only}


def check(case, dtype, inputs, grads, req, **kwargs):
    """Compare the triton backend with float64 (and, below fp32, with the naive baseline in ``dtype``)."""
    got_out, got_grads = run_triton(inputs, grads, req, **kwargs)
    ref_out, ref_grads = run_naive(inputs, grads, torch.float64, req)
    names = requested(req)
    pairs = [(k, got_out[k], ref_out[k]) for k in names]
    pairs += [(n, g, r) for n, g, r in zip(("d_hidden", "d_weight", "d_bias"), got_grads, ref_grads) if r is not None]
    for name, g, _ in pairs[len(names):]:
        assert g is not None, f"{case}: missing {name}"
    for x, grad in zip(inputs[:3], got_grads):
        if grad is not None:
            assert grad.dtype == x.dtype and grad.shape == x.shape

    def baseline():
        base_out, base_grads = run_naive(inputs, grads, dtype, req)
        return [base_out[k] for k in names] + [b for b, r in zip(base_grads, ref_grads) if r is not None]

    assert_matches_reference(case, dtype, pairs, baseline)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype,deterministic,metrics", [
    (torch.float32, False, True), (torch.float32, True, False), (torch.float16, False, True),
    (torch.bfloat16, True, False),
], ids=["fp32-atomic-metrics", "fp32-deterministic", "fp16-atomic-metrics", "bf16-deterministic"])
def test_softcap_temperature_biases(dtype, deterministic, metrics):
    """All outputs and policy gradients; softcap 5 bends the logits (std about 2), temperature 0.7. Two
    cases also ask for the policy's entropy and mean logit (the gradients must not change)."""
    m, d, d_ref, v = ODD
    inputs = make_inputs(m, d, d_ref, v, dtype)
    # 33-row chunks: the deterministic backward runs two chunks and accumulates dW and db across them
    budget = 33 * v * inputs[0].element_size()
    req = StatRequest(entropy=metrics, mean_logit=metrics, temperature=0.7, softcap=5.0)
    check(f"{dtype} det={deterministic}", dtype, inputs, upstream(m), req, deterministic=deterministic,
          memory_budget=budget)


@pytest.mark.parametrize("only", [("logprobs",), ("kl",)], ids=["logprob-grad-only", "kl-grad-only"])
def test_one_upstream_gradient_no_bias_frozen_weight(only):
    """Only one output has an upstream gradient (the reference tile is skipped without a KL gradient);
    no biases, no softcap, and a frozen policy weight (no dW requested)."""
    m, d, d_ref, v = ODD
    h, w, _, hr, wr, _, y = make_inputs(m, d, d_ref, v, torch.float32, bias=False, seed=3)
    w.requires_grad_(False)
    check(f"only {only}", torch.float32, (h, w, None, hr, wr, None, y), upstream(m, only), StatRequest())


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_vocab_below_one_block_single_row(deterministic):
    """V=50 < BLOCK_V and M=1 < BLOCK_N: everything is a ragged edge."""
    inputs = make_inputs(1, 48, 24, 50, torch.float32, seed=4)
    check("V=50 M=1", torch.float32, inputs, upstream(1), StatRequest(temperature=1.3, softcap=3.0),
          deterministic=deterministic)


def test_extreme_logits():
    """Logits of size 1e4 in both models: finite outputs, both online maxima keep exp() in range."""
    m, d, d_ref, v = 19, 48, 40, 300
    inputs = make_inputs(m, d, d_ref, v, torch.float32, logit_scale=5e3, seed=5)
    with torch.no_grad():
        assert F.linear(inputs[0], inputs[1], inputs[2]).abs().max() > 5e3
    check("extreme", torch.float32, inputs, upstream(m), StatRequest())


def test_identical_models_give_zero_kl_and_zero_kl_gradient():
    """Reference == policy: the KL is exactly 0 (u = 0, s = s_r bitwise) and so is its gradient p - q."""
    m, d, _, v = ODD
    h, w, b, *_, y = make_inputs(m, d, d, v, torch.float32, seed=6)
    out = compute_policy_ref(h, w, b, h.detach(), w.detach(), b.detach(), y, StatRequest(softcap=4.0))
    assert torch.equal(out.kl, torch.zeros_like(out.kl))
    assert torch.equal(out.logprobs, out.ref_logprobs)
    g_h, g_w, g_b = torch.autograd.grad(out.kl.sum(), (h, w, b))
    assert not (g_h.any() or g_w.any() or g_b.any())


def test_strided_inputs():
    """Non-contiguous inputs on both sides: column slices of wider tensors, weights stored transposed,
    biases taking every other element."""
    m, d, d_ref, v = ODD
    h, w, b, hr, wr, br, y = make_inputs(m, d, d_ref, v, torch.float32, seed=7)

    def strided(x: Tensor) -> Tensor:
        if x.dim() == 1:
            return torch.stack([x.detach(), torch.zeros_like(x)], 1)[:, 0].requires_grad_()
        if x.shape[0] == v:
            return x.detach().t().contiguous().t().requires_grad_()
        return torch.cat([x.detach(), torch.zeros(m, 5, device=DEVICE)], 1)[:, : x.shape[1]].requires_grad_()

    inputs = tuple(strided(x) for x in (h, w, b, hr, wr, br)) + (y,)
    assert not any(x.is_contiguous() for x in inputs[:6])
    check("strided", torch.float32, inputs, upstream(m), StatRequest(temperature=2.0))


def test_deterministic_backward_is_bitwise_reproducible():
    m, d, d_ref, v = 37, 48, 40, 333
    inputs = make_inputs(m, d, d_ref, v, torch.float32, seed=8)
    runs = [run_triton(inputs, upstream(m), StatRequest(), deterministic=True, memory_budget=16 * v * 4)[1]
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("vocab_per_split,entropy,mean_logit", [(64, True, True), (1024, True, False),
                                                                 (1024, False, True)])
def test_forward_vocab_splits_merge(vocab_per_split, entropy, mean_logit):
    """Partial statistics of 16 splits (or of one) merge to the same values; the policy metrics too,
    each computed only when asked for."""
    m, d, d_ref, v = ODD
    h, w, b, hr, wr, br, y = make_inputs(m, d, d_ref, v, torch.float32, seed=9)
    with torch.no_grad():
        got = policy_ref_fwd(h, w, b, hr, wr, br, y, temperature=0.9, softcap=4.0, entropy=entropy,
                             mean_logit=mean_logit, vocab_per_split=vocab_per_split)
        ref = naive_policy_ref(h, w, hr, wr, y, b, br, temperature=0.9, softcap=4.0)
        ref.update(naive_token_stats(h, w, y, b, temperature=0.9, softcap=4.0))
    for k, wanted in zip(METRICS, (entropy, mean_logit)):
        assert (getattr(got, k) is not None) == wanted, k
    for k in NAMES + tuple(k for k, f in zip(METRICS, (entropy, mean_logit)) if f):
        assert max_err(getattr(got, k), ref[k]) <= FP32_RTOL * max(scale(ref[k]), 1e-2), k


def test_empty_input():
    h, w, b, hr, wr, br, y = make_inputs(0, 48, 40, 50, torch.float32)
    out = compute_policy_ref(h, w, b, hr, wr, br, y, StatRequest())
    assert all(getattr(out, k).shape == (0,) for k in NAMES)
    (out.logprobs.sum() + out.kl.sum()).backward()
    assert h.grad.shape == h.shape and torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


# ----------------------------------------------------------------------------- GPU (compiled kernels)

needs_gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA, not the interpreter")


@pytest.mark.gpu
@needs_gpu
def test_gpu_bf16_realistic():
    """bf16 on the tensor cores (no upcast), real atomics: M=2048, D=1024, D_ref=768, V=32000.

    One mode only: the autotuner compiles every config of both kernels on first use.
    """
    m, d, d_ref, v = 2048, 1024, 768, 32000
    inputs = make_inputs(m, d, d_ref, v, torch.bfloat16, seed=11)
    check("gpu bf16", torch.bfloat16, inputs, upstream(m), StatRequest(temperature=0.8, softcap=30.0))


# ----------------------------------------------------------------------------- GPU compilation, without a GPU

COMPILE_SCRIPT = """
    from pygpo.kernels.policy_ref_bwd import policy_ref_bwd_kernel
    from pygpo.kernels.policy_ref_fwd import policy_ref_fwd_kernel

    common = dict(HAS_BIAS=True, HAS_REF_BIAS=True, HAS_SOFTCAP=True, UPCAST=False, INPUT_PRECISION="ieee",
                  BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)
    bf16 = {k: "*bf16" for k in ("H", "W", "B", "HR", "WR", "BR")}
    for arch in (90,):
        build(policy_ref_fwd_kernel, dict(Y="*i64", PART="*fp32", **bf16),
          dict(WANT_ENTROPY=True, WANT_MEAN=True, **common), arch)
        for write in (False, True):
            pointers = {k: "*fp32" for k in ("LSE", "LSE_R", "A", "GKL", "GLP", "DH", "DW", "DB")}
            pointers.update(Y="*i64", DRAW="*bf16" if write else "*fp32", **bf16)
            build(policy_ref_bwd_kernel, pointers,
                  dict(HAS_KL=True, HAS_LP=True, NEED_DH=not write, NEED_DW=not write, NEED_DB=True,
                       WRITE_DRAW=write, **common), arch)
        print("compiled for sm", arch)
"""


@pytest.mark.skipif(not has_cuda_backend(), reason="triton without its CUDA backend")
def test_kernels_compile_for_gpu():
    """The interpreter accepts programs the compiler rejects: lower both kernels (every feature on, both
    backward modes) to cubins for sm_90, in a subprocess because this one interprets (``gpu_compile``).

    Only Hopper, to keep the suite fast (about 20 s with a cold Triton cache); the same kernels also
    lower for sm_80 (add 80 to the loop to check, about 18 s more).
    """
    assert_compiles(COMPILE_SCRIPT, 90)
