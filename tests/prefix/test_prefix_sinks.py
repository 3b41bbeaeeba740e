"""Attention sinks (GPT-OSS): a learned logit per query head joins every softmax's denominator.

Forward and backward (including the sinks' own gradient) of both backends against the float64
reference of ``prefix_reference.reference_attention`` (the explicit sum), with random upstream
gradients, grouped-query heads, sliding windows and padding.
"""

from __future__ import annotations

import pytest
import torch

from pygpo.prefix import PrefixLayout, prefix_attention
from pygpo.prefix.torch_attention import dense_prefix_attention

from prefix_reference import allowed_mask, random_layout, reference_attention, single_torch_thread  # noqa: F401
from test_prefix_attention import DEVICE, _inputs
from test_prefix_window import _err


def _sinks(hq, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed + 7)
    return (2.0 * torch.randn(hq, generator=g)).to(device=device, dtype=dtype).requires_grad_()


def _check(fn, layout, B, hq, hkv, S, d, dtype, window, seed, tol, device="cpu"):
    q, k, v = _inputs(seed, B, hq, hkv, S, d, dtype, device)
    sinks = _sinks(hq, seed, dtype, device)
    out = fn(q, k, v, sinks)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v, sinks), do)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, sinks)]
    ref = reference_attention(*ref_in[:3], allowed_mask(layout, window), None, sinks=ref_in[3])
    ref_grads = torch.autograd.grad(ref, ref_in, do.double().cpu())
    assert _err(out, ref) < tol
    for name, a, r in zip("q k v sinks".split(), grads, ref_grads):
        assert _err(a, r) < tol, name


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 1)])
@pytest.mark.parametrize("impl", ["span", "dense"])
def test_torch_backends_match_reference(impl, hq, hkv, window):
    layout = random_layout(hq + (window or 0), batch_size=2, seq_len=31)  # padding at the rows' ends
    fn = {"span": lambda q, k, v, s: prefix_attention(q, k, v, layout, sliding_window=window, sinks=s,
                                                      backend="torch"),
          "dense": lambda q, k, v, s: dense_prefix_attention(q, k, v, layout, 16 ** -0.5, window, s)}[impl]
    _check(fn, layout, 2, hq, hkv, 31, 16, torch.float64, window, seed=hq, tol=1e-12)


@pytest.mark.parametrize("seed, B, hq, hkv, S, d, window", [
    (0, 2, 2, 2, 37, 16, None),
    (1, 2, 4, 2, 45, 24, 9),     # GQA, head dim not a power of two, a window
])
def test_triton_matches_reference(seed, B, hq, hkv, S, d, window):
    layout = random_layout(seed + 80, B, S)
    fn = lambda q, k, v, s: prefix_attention(q, k, v, layout, sliding_window=window, sinks=s,  # noqa: E731
                                             backend="triton")
    _check(fn, layout, B, hq, hkv, S, d, torch.float32, window, seed, tol=1e-5, device=DEVICE)


def test_sink_limits():
    """A sink at -inf is no sink; a sink far above every score takes the whole softmax (output 0)."""
    layout = PrefixLayout.from_lengths([[(3, [2, 4])]], seq_len=11)
    q, k, v = _inputs(2, 1, 2, 2, 11, 16, torch.float64)
    plain = prefix_attention(q, k, v, layout, backend="torch")
    none = prefix_attention(q, k, v, layout, sinks=torch.full((2,), float("-inf"), dtype=torch.float64),
                            backend="torch")
    torch.testing.assert_close(none, plain, rtol=1e-12, atol=1e-12)
    heavy = prefix_attention(q, k, v, layout, sinks=torch.full((2,), 200.0, dtype=torch.float64), backend="torch")
    assert float(heavy.detach().abs().max()) < 1e-60


@pytest.mark.parametrize("bad, err, match", [
    (torch.zeros(3), ValueError, r"sinks must have shape \(Hq,\) = \(2,\)"),
    (torch.zeros(2, dtype=torch.int64), TypeError, "sinks must be a floating-point"),
    ([0.0, 0.0], TypeError, "sinks must be a floating-point torch.Tensor"),
])
def test_bad_sinks_are_refused(bad, err, match):
    layout = random_layout(0, 1, 20)
    q, k, v = _inputs(0, 1, 2, 2, 20, 16, torch.float32)
    with pytest.raises(err, match=match):
        prefix_attention(q, k, v, layout, sinks=bad)


@pytest.mark.gpu
def test_triton_window_and_sinks_bf16_on_gpu():
    """S=2048, d=64 bf16 with the real tiles, a window of 128 (GPT-OSS's local layers) and sinks, against
    the torch backend in float32."""
    from pygpo.prefix.torch_attention import span_prefix_attention

    rows = [[(300, [200, 150]), (500, [120, 90, 60]), (250, [180, 190])], [(1024, [512, 400])]]
    layout = PrefixLayout.from_lengths(rows, seq_len=2048)
    q, k, v = _inputs(0, 2, 8, 2, 2048, 64, torch.bfloat16, "cuda")
    sinks = _sinks(8, 0, torch.bfloat16, "cuda")
    out = prefix_attention(q, k, v, layout, sliding_window=128, sinks=sinks, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), do)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v, sinks)]
    ref = span_prefix_attention(*ref_in[:3], layout, 64 ** -0.5, 128, ref_in[3])
    ref_grads = torch.autograd.grad(ref, ref_in, do.float())
    assert _err(out.float(), ref.double().cpu()) < 3e-2
    for name, a, r in zip("q k v sinks".split(), grads, ref_grads):
        assert _err(a.float(), r.double().cpu()) < 3e-2, name


@pytest.mark.parametrize("form", ["causal", "causal_continuing", "bool", "additive"])
def test_sink_attention_masks(form):
    """``sink_attention`` (a model's unpacked forward with sinks) against the explicit float64 sum, for a
    causal mask (also continuing a cache: 3 queries after 4 cached keys), a boolean and an additive mask."""
    from pygpo.prefix.torch_attention import sink_attention

    g = torch.Generator().manual_seed(3)
    q_len = 3 if form == "causal_continuing" else 7
    q = torch.randn(2, 4, q_len, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64) for _ in range(2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    visible = torch.ones(q_len, 7, dtype=torch.bool).tril(7 - q_len).expand(2, q_len, 7).clone()
    kwargs = {"is_causal": True}
    if form == "bool":
        visible[0, :, 0] = False  # a padded first key in row 0
        kwargs = {"mask": visible[:, None]}
    elif form == "additive":
        visible[1, 4:, 1] = False
        kwargs = {"mask": torch.zeros(2, 1, q_len, 7, dtype=torch.float64).masked_fill(~visible[:, None], -1e9)}
    out = sink_attention(q, k, v, sinks, scale=0.3, **kwargs)
    torch.testing.assert_close(out, reference_attention(q, k, v, visible, 0.3, sinks=sinks), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_inputs_with_float32_sinks(backend):
    """Models keep sinks in float32 beside 16-bit activations: the output has q's dtype, the sinks' gradient
    theirs, and both are as close to float64 as plain float16 attention is."""
    layout = random_layout(4, 2, 30)
    q, k, v = _inputs(4, 2, 2, 2, 30, 16, torch.float16, DEVICE)
    sinks = _sinks(2, 4, torch.float32, DEVICE)
    out = prefix_attention(q, k, v, layout, sinks=sinks, backend=backend)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    dsinks, = torch.autograd.grad(out, (sinks,), do)
    assert out.dtype == torch.float16 and dsinks.dtype == torch.float32
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (q, k, v, sinks)]
    ref = reference_attention(*ref_in[:3], allowed_mask(layout), None, sinks=ref_in[3])
    ref_dsinks, = torch.autograd.grad(ref, (ref_in[3],), do.double().cpu())
    assert _err(out, ref) < 5e-3
    assert _err(dsinks, ref_dsinks) < 5e-3
