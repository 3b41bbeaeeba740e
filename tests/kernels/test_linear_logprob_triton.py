"""Triton backend of the linear -> token statistics against an independent float64 reference.

Runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``) on small odd shapes:
``M=37, D=48, V=1001`` is a multiple of no block size, ``V=50`` is below one vocabulary block, ``M=1``
is below one row block. Every test compares forward values and the gradients w.r.t. hidden, weight
and bias, under random per-row upstream gradients, with a float64 computation over materialised
logits written here with plain torch ops.

Tolerances: fp32 within 1e-5 of the reference's largest magnitude; fp16/bf16 no worse than twice the
error of the same naive computation done by torch in that dtype, plus a floor of 1e-5 relative.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

pytest.importorskip("triton")

from pygpo.kernels import INTERPRET, linear_logprob_fwd  # noqa: E402
from pygpo.ops.backends.triton_fused import compute_token_stats  # noqa: E402
from pygpo.ops.token_stats import StatRequest  # noqa: E402
from triton_checks import FP32_RTOL, assert_matches_reference, max_err, scale, triton_device  # noqa: E402

DEVICE = triton_device()
NAMES = ("logprobs", "lse", "entropy", "log_sum_p2", "mean_logit")


# ----------------------------------------------------------------------------- reference


def naive_token_stats(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
    softcap: Optional[float],
) -> dict[str, Tensor]:
    """All five per-row statistics from the full ``(M, V)`` logits, computed in the inputs' dtype."""
    z = F.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    return {
        "logprobs": log_p.gather(1, labels[:, None])[:, 0],
        "lse": torch.logsumexp(z, dim=-1),
        "entropy": -(p * log_p).sum(-1),
        "log_sum_p2": torch.logsumexp(2.0 * log_p, dim=-1),
        "mean_logit": z.mean(-1),
    }


def run_naive(inputs, grads, dtype, temperature, softcap, stats):
    """Forward values and input gradients of the naive computation in ``dtype``."""
    h, w, b, y = inputs
    leaves = [x.detach().to(dtype).requires_grad_(x.requires_grad) if x is not None else None for x in (h, w, b)]
    out = naive_token_stats(leaves[0], leaves[1], leaves[2], y, temperature, softcap)
    loss = sum((out[k] * grads[k].to(dtype)).sum() for k in stats if grads.get(k) is not None)
    loss.backward()
    return {k: out[k].detach() for k in stats}, [None if x is None or x.grad is None else x.grad for x in leaves]


def run_triton(inputs, grads, req, stats, **kwargs):
    h, w, b, y = inputs
    # detach() keeps the storage and strides (clone() would make strided inputs contiguous)
    leaves = [x.detach().requires_grad_(x.requires_grad) if x is not None else None for x in (h, w, b)]
    out = compute_token_stats(leaves[0], leaves[1], leaves[2], y, req, **kwargs)._asdict()
    for k in NAMES:
        assert (out[k] is not None) == (k in stats), k
    for k in stats:
        assert out[k].dtype == torch.float32 and out[k].shape == y.shape, k
    loss = sum((out[k] * grads[k]).sum() for k in stats if grads.get(k) is not None)
    loss.backward()
    return {k: out[k].detach() for k in stats}, [None if x is None or x.grad is None else x.grad for x in leaves]


def make_inputs(m, d, v, dtype, *, bias=True, logit_scale=1.0, seed=0):
    """Inputs rounded to ``dtype``; logits have standard deviation about ``logit_scale * 2``."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=g) * (2.0 / d**0.5)
    w = torch.randn(v, d, generator=g) * logit_scale
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    y = torch.randint(0, v, (m,), generator=g)
    cast = lambda x: None if x is None else x.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return cast(h), cast(w), cast(b), y.to(DEVICE)


def check(case, dtype, inputs, grads, req, stats, **kwargs):
    """Compare the triton backend with float64 (and, below fp32, with the baseline in ``dtype``)."""
    got_out, got_grads = run_triton(inputs, grads, req, stats, **kwargs)
    ref_out, ref_grads = run_naive(inputs, {k: g for k, g in grads.items()}, torch.float64,
                                   req.temperature, req.softcap, stats)
    pairs = [(k, got_out[k], ref_out[k]) for k in stats]
    pairs += [(n, g, r) for n, g, r in zip(("d_hidden", "d_weight", "d_bias"), got_grads, ref_grads) if r is not None]
    for name, g, _ in pairs[len(stats):]:
        assert g is not None, f"{case}: missing {name}"
    for x, grad in zip(inputs[:3], got_grads):
        if x is not None and grad is not None:
            assert grad.dtype == x.dtype and grad.shape == x.shape

    def baseline():
        base_out, base_grads = run_naive(inputs, grads, dtype, req.temperature, req.softcap, stats)
        return [base_out[k] for k in stats] + [b for b, r in zip(base_grads, ref_grads) if r is not None]

    assert_matches_reference(case, dtype, pairs, baseline)


def upstream(m, stats, seed=1, only=None):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(m, generator=g).to(DEVICE) for k in stats if only is None or k in only}


ALL = NAMES
ODD = (37, 48, 1001)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_all_outputs_softcap_temperature_bias(dtype, deterministic):
    """Every output and gradient; softcap 5 bends the logits (std about 2), temperature 0.7."""
    m, d, v = ODD
    inputs = make_inputs(m, d, v, dtype)
    req = StatRequest(entropy=True, log_sum_p2=True, mean_logit=True, temperature=0.7, softcap=5.0)
    # 33-row chunks: the deterministic backward runs two chunks (the first spans two row blocks) and
    # accumulates dW and db across them
    budget = 33 * v * inputs[0].element_size()
    check(f"{dtype} det={deterministic}", dtype, inputs, upstream(m, ALL), req, ALL,
          deterministic=deterministic, memory_budget=budget)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_plain_logprobs_no_bias_frozen_weight(deterministic):
    """The plain path: no bias, softcap or temperature, no optional outputs, only a log-prob gradient,
    and a frozen weight (no dW requested); default memory budget (one chunk)."""
    m, d, v = ODD
    h, w, _, y = make_inputs(m, d, v, torch.float32, bias=False, seed=3)
    w.requires_grad_(False)
    stats = ("logprobs", "lse")
    check("plain", torch.float32, (h, w, None, y), upstream(m, stats, only=("logprobs",)), StatRequest(),
          stats, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_vocab_below_one_block_single_row(deterministic):
    """V=50 < BLOCK_V and M=1 < BLOCK_N: everything is a ragged edge."""
    inputs = make_inputs(1, 48, 50, torch.float32, seed=4)
    req = StatRequest(entropy=True, log_sum_p2=True, mean_logit=True, temperature=1.3, softcap=3.0)
    check("V=50 M=1", torch.float32, inputs, upstream(1, ALL), req, ALL, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_extreme_logits(deterministic):
    """Logits of size 1e4: finite outputs, the online max keeps exp() in range."""
    m, d, v = 19, 48, 300
    inputs = make_inputs(m, d, v, torch.float32, logit_scale=5e3, seed=5)
    with torch.no_grad():
        z = F.linear(inputs[0], inputs[1], inputs[2])
    assert z.abs().max() > 5e3
    req = StatRequest(entropy=True, log_sum_p2=True, mean_logit=True)
    check("extreme", torch.float32, inputs, upstream(m, ALL), req, ALL, deterministic=deterministic)


def test_partial_upstream_and_strided_inputs():
    """Gradients flowing only into entropy and log sum p^2; hidden is a column slice of a wider
    tensor, weight is stored transposed and bias is every other element (none contiguous)."""
    m, d, v = ODD
    h, w, b, y = make_inputs(m, d, v, torch.float32, seed=6)
    h_strided = torch.cat([h.detach(), torch.zeros(m, 5, device=DEVICE)], 1)[:, :d].requires_grad_()
    w_strided = w.detach().t().contiguous().t().requires_grad_()
    b_strided = torch.stack([b.detach(), torch.zeros_like(b)], 1)[:, 0].requires_grad_()
    assert not (h_strided.is_contiguous() or w_strided.is_contiguous() or b_strided.is_contiguous())
    req = StatRequest(entropy=True, log_sum_p2=True, temperature=2.0)
    stats = ("logprobs", "lse", "entropy", "log_sum_p2")
    check("partial+strided", torch.float32, (h_strided, w_strided, b_strided, y),
          upstream(m, stats, only=("entropy", "log_sum_p2")), req, stats)


def test_deterministic_backward_is_bitwise_reproducible():
    m, d, v = ODD
    h, w, b, y = make_inputs(m, d, v, torch.float32, seed=7)
    req = StatRequest(entropy=True)
    g = upstream(m, ("logprobs", "entropy"))
    runs = []
    for _ in range(2):
        _, grads = run_triton((h, w, b, y), g, req, ("logprobs", "lse", "entropy"),
                              deterministic=True, memory_budget=16 * v * 4)
        runs.append(grads)
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("vocab_per_split", [None, 64, 1024])
def test_forward_vocab_splits_merge(vocab_per_split):
    """The split-vocabulary partial statistics merge to the same values: 16 splits, 1 split, default."""
    m, d, v = ODD
    h, w, b, y = make_inputs(m, d, v, torch.float32, seed=8)
    with torch.no_grad():
        got = linear_logprob_fwd(h, w, b, y, temperature=0.9, softcap=4.0, entropy=True, log_sum_p2=True,
                                 mean_logit=True, vocab_per_split=vocab_per_split)
        ref = naive_token_stats(h.double(), w.double(), b.double(), y, 0.9, 4.0)
    for k in NAMES:
        assert max_err(getattr(got, k), ref[k]) <= FP32_RTOL * max(scale(ref[k]), 1e-2), k


def test_reduced_outputs_give_expanded_upstream_gradients():
    """``sum()``/``mean()`` hand the backward stride-0 (expanded) gradients; they must work as-is."""
    h, w, b, y = make_inputs(37, 48, 50, torch.float32, seed=9)
    out = compute_token_stats(h, w, b, y, StatRequest(mean_logit=True))
    (out.logprobs.sum() + 0.5 * out.lse.mean() - out.mean_logit.sum()).backward()
    hd, wd, bd = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = naive_token_stats(hd, wd, bd, y, 1.0, None)
    (ref["logprobs"].sum() + 0.5 * ref["lse"].mean() - ref["mean_logit"].sum()).backward()
    for got, r in ((h.grad, hd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert max_err(got, r) <= FP32_RTOL * max(scale(r), 1e-2)


def test_empty_input():
    h, w, b, y = make_inputs(0, 48, 50, torch.float32)
    out = compute_token_stats(h, w, b, y, StatRequest(entropy=True))
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,) and out.log_sum_p2 is None
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert h.grad.shape == h.shape and torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_interpreter_mode_matches_environment():
    """Guard against a silent switch: CPU runs must be interpreted, as conftest.py arranges."""
    if not torch.cuda.is_available():
        assert INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- GPU (compiled kernels)

needs_gpu = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA, not the interpreter")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_bf16_large(deterministic):
    """A realistic size on the tensor cores: M=4096, D=1024, V=32000, bf16, every output."""
    m, d, v = 4096, 1024, 32000
    inputs = make_inputs(m, d, v, torch.bfloat16, seed=11)
    req = StatRequest(entropy=True, log_sum_p2=True, mean_logit=True, temperature=0.8, softcap=30.0)
    check("gpu bf16", torch.bfloat16, inputs, upstream(m, ALL), req, ALL, deterministic=deterministic,
          memory_budget=1000 * v * 2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_gpu_fp32_exact_dots(deterministic):
    """fp32 on the GPU keeps full-precision dots (no TF32): the fp32 tolerance still holds."""
    m, d, v = 1000, 512, 8191
    inputs = make_inputs(m, d, v, torch.float32, seed=12)
    req = StatRequest(entropy=True, log_sum_p2=True, temperature=1.1)
    stats = ("logprobs", "lse", "entropy", "log_sum_p2")
    check("gpu fp32", torch.float32, inputs, upstream(m, stats), req, stats, deterministic=deterministic)


@pytest.mark.gpu
@needs_gpu
def test_gpu_int64_offsets_strided_inputs():
    """Row strides so large that ``row * stride`` passes 2**31 for hidden (64 rows, stride 2**26) and
    weight (300 rows, stride 2**23): int32 offsets would read the wrong memory."""
    m, d, v = 64, 128, 300
    h, w, b, y = make_inputs(m, d, v, torch.bfloat16, seed=13)
    h_store = torch.zeros(m, 2**26, device=DEVICE, dtype=torch.bfloat16)
    w_store = torch.zeros(v, 2**23, device=DEVICE, dtype=torch.bfloat16)
    h_store[:, :d] = h.detach()
    w_store[:, :d] = w.detach()
    h_big, w_big = h_store[:, :d].requires_grad_(), w_store[:, :d].requires_grad_()
    assert (m - 1) * h_big.stride(0) > 2**31 and (v - 1) * w_big.stride(0) > 2**31
    req = StatRequest(entropy=True)
    stats = ("logprobs", "lse", "entropy")
    for det in (False, True):
        check("int64 offsets", torch.bfloat16, (h_big, w_big, b, y), upstream(m, stats), req, stats,
              deterministic=det)
    del h_store, w_store


@pytest.mark.gpu
@needs_gpu
def test_gpu_draw_buffer_past_int32():
    """Deterministic mode with one chunk of 70000 x 32000 dRaw entries (> 2**31): checks the last
    rows of dH (each row of dH depends on its own row only) against float64."""
    m, d, v = 70000, 64, 32000
    h, w, _, y = make_inputs(m, d, v, torch.bfloat16, bias=False, seed=14)
    g = upstream(m, ("logprobs",))
    out = compute_token_stats(h, w, None, y, StatRequest(), deterministic=True, memory_budget=m * v * 2)
    (out.logprobs * g["logprobs"]).sum().backward()
    tail = slice(m - 200, m)
    ref_h = h.detach()[tail].double().requires_grad_()
    lp = torch.log_softmax(F.linear(ref_h, w.detach().double()), -1).gather(1, y[tail, None])[:, 0]
    (lp * g["logprobs"][tail].double()).sum().backward()
    base_h = h.detach()[tail].clone().requires_grad_()
    lp_b = torch.log_softmax(F.linear(base_h, w.detach()), -1).gather(1, y[tail, None])[:, 0]
    (lp_b * g["logprobs"][tail].to(torch.bfloat16)).sum().backward()
    assert max_err(h.grad[tail], ref_h.grad) <= 2 * max_err(base_h.grad, ref_h.grad) + 1e-5 * scale(ref_h.grad)
