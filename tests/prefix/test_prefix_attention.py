"""prefix_attention against a float64 masked-softmax reference: torch backend and Triton kernels.

The Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1, set by tests/conftest.py) at
tiny sizes with 16 x 16 tiles, so S=37..64 exercises full, partial, empty and ragged tiles; on a CUDA
machine the same tests run compiled on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from pygpo.prefix import PrefixLayout, prefix_attention
from pygpo.prefix.torch_attention import dense_prefix_attention

from prefix_reference import allowed_mask, random_layout, reference_attention, single_torch_thread  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seed, B, hq, hkv, S, d, dtype, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, S, d, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def _run(fn, q, k, v, seed=0):
    out = fn(q, k, v)
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out, grads, do


def _reference(q, k, v, allowed, do, scale=None, sinks=None):
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    out = reference_attention(q64, k64, v64, allowed, scale, None if sinks is None else sinks.double().cpu())
    grads = torch.autograd.grad(out, (q64, k64, v64), do.double().cpu())
    return out, grads


def _rel_err(a, ref):
    return float((a.detach().double().cpu() - ref.detach()).abs().max() / ref.detach().abs().max())


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["span", "dense"])
def test_torch_backends_match_reference(hq, hkv, dtype, impl):
    """``span``: the torch backend (one SDPA per span); ``dense``: SDPA with the whole-row mask."""
    fn = {"span": lambda *t: prefix_attention(*t, layout, backend="torch"),
          "dense": lambda *t: dense_prefix_attention(*t, layout, 16 ** -0.5)}[impl]
    layout = random_layout(hq * 10 + hkv, batch_size=2, seq_len=29)
    q, k, v = _inputs(0, 2, hq, hkv, 29, 16, dtype)
    out, grads, do = _run(fn, q, k, v)
    ref, ref_grads = _reference(q, k, v, allowed_mask(layout), do)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _rel_err(out, ref) < tol
    for a, r in zip(grads, ref_grads):
        assert _rel_err(a, r) < tol


def test_padding_rows_are_finite_and_scale_is_used():
    layout = PrefixLayout.from_lengths([[(3, [2, 2])]], seq_len=10)  # 3 padding tokens
    q, k, v = _inputs(1, 1, 2, 2, 10, 16, torch.float64)
    out = prefix_attention(q, k, v, layout, scale=0.3, backend="torch")
    ref = reference_attention(q, k, v, allowed_mask(layout), 0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense_prefix_attention(q, k, v, layout, 0.3), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[:, :, 7:], v[:, :, 7:])  # padding attends only to itself


# ----------------------------------------------------------------------------- Triton kernels
CASES = [
    # seed, B, hq, hkv, S, d, (layout kwargs)
    (0, 2, 2, 2, 37, 16, {}),
    (1, 2, 4, 2, 45, 24, {}),      # GQA, head dim not a power of two
    (2, 1, 4, 1, 64, 32, {}),      # MQA, S a multiple of the tile
    (3, 2, 2, 1, 48, 16, {"max_docs": 1, "max_k": 2}),
]


@pytest.mark.parametrize("seed, B, hq, hkv, S, d, lk", CASES)
def test_triton_matches_reference_fp32(seed, B, hq, hkv, S, d, lk):
    layout = random_layout(seed, B, S, **lk)
    q, k, v = _inputs(seed, B, hq, hkv, S, d, torch.float32, DEVICE)
    out, grads, do = _run(lambda *t: prefix_attention(*t, layout, backend="triton"), q, k, v, seed)
    ref, ref_grads = _reference(q, k, v, allowed_mask(layout), do)
    assert out.shape == (B, hq, S, d) and out.dtype == torch.float32
    assert _rel_err(out, ref) < 1e-5
    for a, r in zip(grads, ref_grads):
        assert _rel_err(a, r) < 1e-5


def test_triton_matches_dense_torch_on_random_layouts():
    for seed in range(3):
        layout = random_layout(100 + seed, 2, 40)
        q, k, v = _inputs(seed, 2, 4, 2, 40, 16, torch.float32, DEVICE)
        out_t, grads_t, do = _run(lambda *t: prefix_attention(*t, layout, backend="triton"), q, k, v, seed)
        out_r = dense_prefix_attention(q, k, v, layout, 16 ** -0.5)
        grads_r = torch.autograd.grad(out_r, (q, k, v), do)
        torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
        for a, r in zip(grads_t, grads_r):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_triton_mixed_tile_shapes():
    """Different tiles per kernel (each with its own block map) give the same result."""
    from pygpo.kernels.prefix_blocks import PrefixAttentionConfig
    from pygpo.prefix.triton_attention import triton_prefix_attention

    layout = random_layout(11, 2, 50)
    q, k, v = _inputs(5, 2, 2, 1, 50, 16, torch.float32, DEVICE)
    cfg = PrefixAttentionConfig(fwd_m=32, fwd_n=16, dq_m=16, dq_n=32, kv_m=32, kv_n=16)
    out, grads, do = _run(lambda *t: triton_prefix_attention(*t, layout, 0.25, cfg), q, k, v)
    ref, ref_grads = _reference(q, k, v, allowed_mask(layout), do, 0.25)
    assert _rel_err(out, ref) < 1e-5
    for a, r in zip(grads, ref_grads):
        assert _rel_err(a, r) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_within_torch_baseline(dtype):
    """Half-precision error no worse than plain torch attention in the same dtype (both vs float64)."""
    layout = random_layout(21, 2, 40)
    q, k, v = _inputs(8, 2, 4, 2, 40, 32, dtype, DEVICE)
    out, grads, do = _run(lambda *t: prefix_attention(*t, layout, backend="triton"), q, k, v)
    ref, ref_grads = _reference(q, k, v, allowed_mask(layout), do)
    # Baseline: the same math done by plain torch in `dtype` (scores, softmax, products).
    allowed = allowed_mask(layout).to(q.device)
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    kr, vr = kb.repeat_interleave(2, 1), vb.repeat_interleave(2, 1)
    scores = (qb @ kr.transpose(-1, -2)) * 32 ** -0.5
    base = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1) @ vr
    base_grads = torch.autograd.grad(base, (qb, kb, vb), do)
    assert out.dtype == dtype
    assert _rel_err(out, ref) <= 2 * _rel_err(base, ref) + 1e-3
    for a, b, r in zip(grads, base_grads, ref_grads):
        assert _rel_err(a, r) <= 2 * _rel_err(b, r) + 1e-3


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    from pygpo.prefix import attention as attention_module

    monkeypatch.delenv("PYGPO_BACKEND", raising=False)
    called = []
    real = attention_module.span_prefix_attention
    monkeypatch.setattr(attention_module, "span_prefix_attention", lambda *a: called.append(1) or real(*a))
    layout = PrefixLayout.from_lengths([[(2, [1, 1])]])
    q, k, v = _inputs(0, 1, 1, 1, 4, 16, torch.float32)
    prefix_attention(q, k, v, layout)
    assert called == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_triton_realistic_size_bf16_on_gpu(d):
    """S=2048 bf16 on a GPU (the real tile sizes), against the torch backend in float32."""
    from pygpo.prefix.torch_attention import span_prefix_attention

    rows = [[(300, [200, 150]), (500, [120, 90, 60]), (250, [180, 190])], [(1024, [512, 400])]]
    layout = PrefixLayout.from_lengths(rows, seq_len=2048)
    q, k, v = _inputs(0, 2, 8, 2, 2048, d, torch.bfloat16, "cuda")
    out, grads, do = _run(lambda *t: prefix_attention(*t, layout, backend="triton"), q, k, v)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = span_prefix_attention(q32, k32, v32, layout, d ** -0.5)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    assert _rel_err(out.float(), ref.cpu().double()) < 3e-2
    for a, r in zip(grads, ref_grads):
        assert _rel_err(a.float(), r.cpu().double()) < 3e-2


@pytest.mark.parametrize("window, with_sinks", [(None, False), (7, True)])
def test_triton_atomic_dq_matches_reference(window, with_sinks):
    """``atomic_dq``: the dK/dV kernel also accumulates dQ with atomic adds (no dQ kernel); same gradients,
    GQA, a head dim that is not a power of two, ragged tiles, a window and sinks."""
    from pygpo.kernels.prefix_blocks import PrefixAttentionConfig
    from pygpo.prefix.triton_attention import triton_prefix_attention

    layout = random_layout(13, 2, 45)
    q, k, v = _inputs(6, 2, 4, 2, 45, 24, torch.float32, DEVICE)
    sinks = torch.linspace(-1.0, 2.0, 4, device=DEVICE) if with_sinks else None
    cfg = PrefixAttentionConfig(fwd_m=16, fwd_n=16, dq_m=16, dq_n=16, kv_m=16, kv_n=32, atomic_dq=True)
    out, grads, do = _run(lambda *t: triton_prefix_attention(*t, layout, 0.3, cfg, window, sinks), q, k, v)
    ref, ref_grads = _reference(q, k, v, allowed_mask(layout, window), do, 0.3, sinks)
    assert _rel_err(out, ref) < 1e-5
    for a, r in zip(grads, ref_grads):
        assert _rel_err(a, r) < 1e-5


@pytest.mark.gpu
def test_triton_atomic_dq_realistic_size_bf16_on_gpu():
    """The default GPU tiles with ``atomic_dq`` at S=2048, d=128, bf16, against the torch backend in float32."""
    import dataclasses

    from pygpo.kernels.prefix_blocks import default_config
    from pygpo.prefix.torch_attention import span_prefix_attention
    from pygpo.prefix.triton_attention import triton_prefix_attention

    rows = [[(300, [200, 150]), (500, [120, 90, 60]), (250, [180, 190])], [(1024, [512, 400])]]
    layout = PrefixLayout.from_lengths(rows, seq_len=2048)
    q, k, v = _inputs(1, 2, 8, 2, 2048, 128, torch.bfloat16, "cuda")
    cfg = dataclasses.replace(default_config(128, torch.bfloat16), atomic_dq=True)
    out, grads, do = _run(lambda *t: triton_prefix_attention(*t, layout, 128 ** -0.5, cfg), q, k, v)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = span_prefix_attention(q32, k32, v32, layout, 128 ** -0.5)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    assert _rel_err(out.float(), ref.cpu().double()) < 3e-2
    for a, r in zip(grads, ref_grads):
        assert _rel_err(a.float(), r.cpu().double()) < 3e-2
