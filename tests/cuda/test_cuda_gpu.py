"""The ``cuda`` backend's kernels on a GPU against float64 (run by bench/gpu_check.sh; skipped without CUDA).

fp32: error within 1e-5 of the reference's scale. bf16/fp16: error no more than twice that of plain
torch doing the same computation in that dtype (DESIGN.md). The loss head: float64 kernel against
the registry (``pygpo.preference_loss``) to 1e-12, float32 kernel against float64.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import pygpo
from pygpo.ops.backends.torch_tiles import matmul_dtype
from pygpo.ops.loss_head import fused_pairwise_loss_head
from reference import leaf, naive_token_stats

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("pygpo._C") is None, reason="pygpo._C not built"),
]

STATS = ("logprobs", "entropy", "lse", "log_sum_p2")


def _make(n, d, v, dtype, *, seed=0, bias=True, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64) * (2.0 / d**0.5)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    ups = {k: torch.randn(n, generator=g, dtype=torch.float64).cuda() for k in STATS}
    cast = lambda x: None if x is None else leaf(x.cuda(), dtype)  # noqa: E731
    return (cast(h), cast(w), cast(b)), y.cuda(), ups


def _run(fn, ins, ups):
    out = fn(*ins)
    total = sum((out[k].double() * ups[k]).sum() for k in ups)
    wrt = [x for x in ins if x is not None]
    return out, torch.autograd.grad(total, wrt)


def _ours(y, **kw):
    def fn(h, w, b):
        out = pygpo.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, return_lse=True,
                                          return_log_sum_p2=True, backend="cuda", **kw)
        return out._asdict()
    return fn


def _ref(y, dtype=torch.float64, **kw):
    return lambda h, w, b: naive_token_stats(h, w, y, b, dtype=dtype, **kw)


def _err(x, r):
    return (x.double() - r.double()).abs().max().item()


def _scale(r):
    return r.double().abs().max().item()


def _compare(dtype, ins, y, ups, *, opts=None, budget=None):
    opts = opts or {}
    wide = [None if x is None else leaf(x, torch.float64) for x in ins]
    ref_out, ref_grads = _run(_ref(y, **opts), wide, ups)
    out, grads = _run(_ours(y, memory_budget=budget, **opts), ins, ups)
    pairs = [(k, out[k], ref_out[k]) for k in ups] + list(zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads))
    if dtype == torch.float32:
        for name, g, r in pairs:
            assert _err(g, r) <= 1e-5 * max(_scale(r), 1e-2), name
        return
    low = [None if x is None else leaf(x, dtype) for x in ins]
    base_out, base_grads = _run(_ref(y, dtype=dtype, **opts), low, ups)
    base = [base_out[k] for k in ups] + list(base_grads)
    for (name, g, r), b in zip(pairs, base):
        assert _err(g, r) <= 2.0 * _err(b, r) + 1e-5 * _scale(r), name


@pytest.mark.parametrize("n,d,v", [(37, 48, 1001), (256, 128, 4096)])
@pytest.mark.parametrize("budget", [None, 2048 * 4])
@pytest.mark.parametrize("opts", [{}, dict(temperature=0.7, softcap=5.0)])
def test_fp32_against_float64(n, d, v, budget, opts):
    ins, y, ups = _make(n, d, v, torch.float32)
    _compare(torch.float32, ins, y, ups, opts=opts, budget=budget)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [32000, 1001])  # vector path (rows 16-byte aligned) and scalar path
def test_low_precision_no_worse_than_plain_torch(dtype, v):
    """lm_head without a bias, as models have it; with a bias see the next test."""
    ins, y, ups = _make(512, 256, v, dtype, bias=False)
    _compare(dtype, ins, y, ups, opts=dict(temperature=0.8, softcap=30.0), budget=128 * v * 2)


def test_bf16_bias_against_the_rounded_tile():
    """With a bias, dRaw is exact math on the bf16 logit tile: compare with float64 math on that tile."""
    (h, w, b), y, ups = _make(300, 64, 5000, torch.bfloat16)
    out, (_, _, d_b) = _run(_ours(y), (h, w, b), ups)
    valid = y != -100
    mm = matmul_dtype(h)  # bf16 on the GPU: the tile cuBLAS gives the backend
    tile = torch.mm(h.detach()[valid].to(mm), w.detach().to(mm).t()).double()
    b64 = b.detach().double().requires_grad_(True)
    ref = naive_token_stats(tile, torch.eye(5000, dtype=torch.float64, device="cuda"), y[valid], b64)
    total = sum((ref[k] * ups[k][valid]).sum() for k in ups)
    r_b, = torch.autograd.grad(total, b64)
    for k in ups:
        assert _err(out[k][valid], ref[k]) <= 1e-5 * max(_scale(ref[k]), 1.0), k
    assert _err(d_b, r_b) <= 2e-2 * _scale(r_b)  # bf16 output rounding (2^-8) plus summation


def test_deterministic_and_on_a_side_stream():
    """Two runs give identical bits (no atomics); a run on a non-default stream that torch is using
    launches there (ordered after that stream's matmuls) and agrees."""
    ins, y, ups = _make(200, 64, 3000, torch.bfloat16)
    first, again = _run(_ours(y), ins, ups), _run(_ours(y), ins, ups)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side = _run(_ours(y), ins, ups)
    torch.cuda.current_stream().wait_stream(stream)
    for k in first[0]:
        if first[0][k] is not None:
            assert torch.equal(first[0][k], again[0][k]), k
            torch.testing.assert_close(side[0][k], first[0][k], rtol=1e-6, atol=1e-6)
    for a, b, c in zip(first[1], again[1], side[1]):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("head,name,hp,extra", [
    ("logistic", "dpo", {}, {}),
    ("smoothed", "cdpo", dict(eps=0.2), dict(eps=0.2)),
    ("robust", "robust", dict(eps=0.2), dict(eps=0.2)),
    ("hinge", "hinge", {}, {}),
    ("ipo", "ipo", dict(length_normalize=True), dict(length_normalize=True)),
])
@pytest.mark.parametrize("pairs", [8, 512])
def test_loss_head_kernel_matches_registry(head, name, hp, extra, pairs):
    g = torch.Generator().manual_seed(pairs)
    lengths = torch.randint(1, 50, (2 * pairs,), generator=g)
    index = torch.repeat_interleave(torch.arange(2 * pairs), lengths).cuda()
    lp = (-torch.rand(index.numel(), generator=g, dtype=torch.float64) * 3).cuda()
    rp = (-torch.rand(index.numel(), generator=g, dtype=torch.float64) * 3).cuda()
    x = lp.clone().requires_grad_(True)
    out = fused_pairwise_loss_head(x, index, pairs, ref_logps=rp, head=head, beta=0.3,
                                                       backend="cuda", **extra)
    y = lp.clone().requires_grad_(True)
    pol = torch.zeros(2 * pairs, dtype=torch.float64, device="cuda").index_add(0, index, y).view(pairs, 2)
    ref = torch.zeros(2 * pairs, dtype=torch.float64, device="cuda").index_add(0, index, rp).view(pairs, 2)
    kw = dict(hp, beta=0.3)
    if name == "ipo":
        kw["lengths"] = lengths.view(pairs, 2).double().cuda()
    expected = pygpo.preference_loss(name, pol, ref, **kw)
    torch.testing.assert_close(out.per_example, expected.per_example, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-12, atol=1e-12)
    g1, = torch.autograd.grad(out.loss, x)
    g2, = torch.autograd.grad(expected.loss, y)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-13)
    out32 = fused_pairwise_loss_head(lp.float(), index, pairs, ref_logps=rp.float(), head=head,
                                                         beta=0.3, backend="cuda", **extra)
    torch.testing.assert_close(out32.per_example.double(), expected.per_example, rtol=1e-4, atol=1e-5)


def test_ignored_rows_and_softcap_on_gpu():
    """Sanity of the public contract on the GPU: ignored rows are 0 with zero gradient."""
    (h, w, _), y, _ = _make(64, 32, 777, torch.float32, bias=False, ignore_frac=0.5)
    out = pygpo.fused_linear_logprobs(h, w, y, backend="cuda", softcap=3.0)
    assert torch.all(out[y == -100] == 0)
    out.sum().backward()
    assert torch.all(h.grad[y == -100] == 0)
    ref = F.log_softmax(3.0 * torch.tanh(F.linear(h.detach().double(), w.detach().double()) / 3.0), -1)
    lp = ref.gather(1, y.clamp(min=0)[:, None])[:, 0]
    assert _err(out[y != -100], lp[y != -100]) <= 1e-5 * max(_scale(lp), 1.0)


def test_the_build_runs_on_this_gpu():
    from pygpo import _cuda

    assert _cuda.supports(torch.device("cuda")), _cuda.device_problem(torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_launch_on_another_gpu_leaves_the_current_device():
    """The launchers select the tensors' device (cudaSetDevice) and must restore the caller's: torch reads
    its current device from the same runtime state, and a model whose lm_head sits on cuda:1
    (device_map='auto') would otherwise send later device='cuda' allocations to cuda:1."""
    torch.cuda.set_device(0)
    (h, w, _), y, _ = _make(32, 16, 300, torch.float32, bias=False)
    h1, w1, y1 = h.detach().to("cuda:1").requires_grad_(True), w.detach().to("cuda:1"), y.to("cuda:1")
    pygpo.fused_linear_logprobs(h1, w1, y1, backend="cuda").sum().backward()
    index = torch.tensor([0, 0, 1, 1], device="cuda:1")
    fused_pairwise_loss_head(torch.randn(4, device="cuda:1", dtype=torch.float64), index, 1, backend="cuda")
    assert torch.cuda.current_device() == 0
    assert torch.empty(1, device="cuda").device.index == 0


def test_vocabulary_masked_with_the_lowest_float_on_gpu():
    """finfo.min instead of -inf on most of the vocabulary: threads whose columns are all masked merged into
    the block's state through (t + shift s) e^shift = -inf * 0 (nan entropy and gradients)."""
    (h, w, b), y, ups = _make(64, 32, 4096, torch.float32, ignore_frac=0.0)
    with torch.no_grad():
        b[:3000] = torch.finfo(torch.float32).min
    y = y % 1096 + 3000
    _compare(torch.float32, (h, w, b), y, ups)


@pytest.mark.parametrize("budget,tol", [(None, 2e-5), (64 * 3001 * 2, 1e-3)])  # kept matrix; recomputed tiles
def test_autocast_backward_differentiates_the_forwards_bf16_tiles(budget, tol):
    """Under autocast the tiles are bf16 in the forward and, recomputed or kept, in the backward, which runs
    outside the autocast region: the bias gradient (fp32 sums of dRaw) is exact math on the rounded tile.
    The reference tile is one matmul, as the kept one; recomputed tiles are smaller matmuls whose bf16
    rounding may differ by an ulp here and there, hence the looser bound (the fp32 recomputation of the
    backward this guards against was off by about 1e-2)."""
    (h, w, b), y, ups = _make(200, 64, 3001, torch.float32, ignore_frac=0.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _ours(y, memory_budget=budget)(h, w, b)
    total = sum((out[k].double() * ups[k]).sum() for k in ups)
    _, _, d_b = torch.autograd.grad(total, (h, w, b))
    tile = torch.mm(h.detach().bfloat16(), w.detach().bfloat16().t()).double()
    b64 = b.detach().bfloat16().double().requires_grad_(True)
    ref = naive_token_stats(tile, torch.eye(3001, dtype=torch.float64, device="cuda"), y, b64)
    r_b, = torch.autograd.grad(sum((ref[k] * ups[k]).sum() for k in ups), b64)
    for k in ups:
        assert _err(out[k], ref[k]) <= tol / 2 * max(_scale(ref[k]), 1.0), k
    assert _err(d_b, r_b) <= tol * _scale(r_b)


def test_autocast_kept_logits_second_backward_is_bitwise_equal():
    (h, w, b), y, ups = _make(200, 64, 3001, torch.float32, ignore_frac=0.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _ours(y)(h, w, b)
    total = sum((out[k].double() * ups[k]).sum() for k in ups)
    first = torch.autograd.grad(total, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(total, (h, w, b))
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_one_tile_of_more_than_two_to_the_31_logits():
    """17000 rows x V = 128256 in one kept bf16 tile (2.18e9 elements, 4.4 GB): the kernels' row offsets
    pass 2^31 elements in the forward and in the backward (one launch over every row). The last rows
    against float64 math on their own tile (a smaller matmul may round an element differently: loose
    bounds, which 32-bit offsets, reading other rows or faulting, would not meet)."""
    n, d, v = 17000, 64, 128256
    (h, w, _), y, _ = _make(n, d, v, torch.bfloat16, bias=False, ignore_frac=0.0)
    out = pygpo.fused_linear_logprobs(h, w, y, backend="cuda", return_entropy=True, memory_budget=20 * 2**30)
    last = slice(n - 4, n)
    g = torch.zeros(n, device="cuda")
    g[last] = 1.0
    d_h, = torch.autograd.grad((out.logprobs * g).sum(), h)
    log_p = torch.log_softmax(torch.mm(h.detach()[last], w.detach().t()).double(), -1)
    ref_lp = log_p.gather(1, y[last, None])[:, 0]
    ref_ent = -(log_p.exp() * log_p).sum(-1)
    assert _err(out.logprobs[last], ref_lp) <= 1e-2 * _scale(ref_lp)
    assert _err(out.entropy[last], ref_ent) <= 1e-2 * _scale(ref_ent)
    d_raw = -log_p.exp()
    d_raw[torch.arange(4, device="cuda"), y[last]] += 1.0
    r_h = d_raw @ w.detach().double()
    assert _err(d_h[last], r_h) <= 1e-2 * _scale(r_h)
    assert torch.all(d_h[: n - 4] == 0)
