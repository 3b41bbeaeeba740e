"""The arithmetic of the ``pygpo._C`` epilogue kernels, run on the CPU by their host twins.

The twins compile the kernels' ``__host__ __device__`` functions for the CPU (``csrc/host_twin.cpp``);
here they are driven through the ``cuda`` backend's own Python code (``cuda_logprobs``, which sends CPU
tensors to the twins) and directly, and checked against the float64 references of ``tests/reference.py``.
"""

import pytest
import torch

from reference import (STAT_OUTPUTS, assert_no_worse_than_baseline, leaf, naive_logits, naive_token_stats, rel_err,
                       run_with_grads)

_C = pytest.importorskip("pygpo._C", reason="pygpo._C not built (no CUDA toolkit at install time)")

from pygpo import _cuda  # noqa: E402
from pygpo.ops.backends import cuda_logprobs  # noqa: E402
from pygpo.ops.token_stats import StatRequest  # noqa: E402

ALL = STAT_OUTPUTS + ("mean_logit",)


def _make(n, d, v, *, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in ALL}
    return hidden, weight, bias, labels, upstream


def _twin_stats(h, w, b, y, req, budget):
    out = cuda_logprobs.compute_token_stats(h, w, b, y, req, memory_budget=budget)
    return out._asdict()


# V=1001: rows start misaligned (scalar path); V=1024: 16-byte aligned rows (vector path).
# memory_budget=2000 forces vocabulary tiles, so the running state is merged across tiles.
@pytest.mark.parametrize("n,d,v", [(37, 48, 1001), (9, 16, 1024), (1, 8, 5)])
@pytest.mark.parametrize("memory_budget", [None, 2000])
@pytest.mark.parametrize("temperature,softcap,with_bias", [(1.0, None, False), (0.7, 4.0, True)])
def test_fp32_twin_matches_float64(n, d, v, memory_budget, temperature, softcap, with_bias):
    hidden, weight, bias, labels, upstream = _make(n, d, v)
    bias = bias if with_bias else None
    req = StatRequest(entropy=True, log_sum_p2=True, mean_logit=True, temperature=temperature, softcap=softcap)
    ins64 = [leaf(hidden), leaf(weight)] + ([leaf(bias)] if with_bias else [])
    ref = naive_token_stats(*ins64[:2], labels, ins64[2] if with_bias else None, temperature=temperature, softcap=softcap)
    ins32 = [leaf(x, torch.float32) for x in ins64]
    ours = _twin_stats(ins32[0], ins32[1], ins32[2] if with_bias else None, labels, req, memory_budget)
    for k in ALL:
        assert ours[k].dtype == torch.float32 and ours[k].shape == (n,)
        assert rel_err(ours[k], ref[k]) < 3e-6, k
    total_ref = sum((ref[k] * upstream[k]).sum() for k in ALL)
    total = sum((ours[k].double() * upstream[k]).sum() for k in ALL)
    for name, g, r in zip(("hidden", "weight", "bias"), torch.autograd.grad(total, ins32),
                          torch.autograd.grad(total_ref, ins64)):
        assert g.dtype == torch.float32
        assert rel_err(g, r) < 2e-5, name


def test_absent_upstream_gradients_cost_nothing_and_partial_ones_are_exact():
    hidden, weight, _, labels, upstream = _make(11, 8, 40)
    req = StatRequest(entropy=True)
    h32, w32 = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    ours = _twin_stats(h32, w32, None, labels, req, None)
    g_h, = torch.autograd.grad((ours["entropy"].double() * upstream["entropy"]).sum(), h32)
    h64 = leaf(hidden)
    ref = naive_token_stats(h64, weight, labels)
    r_h, = torch.autograd.grad((ref["entropy"] * upstream["entropy"]).sum(), h64)
    assert rel_err(g_h, r_h) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_worse_than_plain_torch(dtype):
    """Error vs float64 within twice that of plain torch computing the same in ``dtype`` (DESIGN.md)."""
    hidden, weight, bias, labels, upstream = _make(37, 48, 1000)
    upstream = {"logprobs": upstream["logprobs"], "entropy": upstream["entropy"]}
    req = StatRequest(entropy=True)
    ref_out, ref_grads = run_with_grads(lambda h, w, b: naive_token_stats(h, w, labels, b),
                                        [leaf(hidden), leaf(weight), leaf(bias)], upstream)
    base_out, base_grads = run_with_grads(lambda h, w, b: naive_token_stats(h, w, labels, b, dtype=dtype),
                                          [leaf(hidden, dtype), leaf(weight, dtype), leaf(bias, dtype)], upstream)
    out, grads = run_with_grads(lambda h, w, b: _twin_stats(h, w, b, labels, req, 4000),
                                [leaf(hidden, dtype), leaf(weight, dtype), leaf(bias, dtype)], upstream)
    assert all(g.dtype == dtype for g in grads)
    assert_no_worse_than_baseline(upstream, (out, grads), (base_out, base_grads), (ref_out, ref_grads))


def _fold(tile, labels, *, lanes, bias=None, v0=0, vocab=None, softcap=0.0, inv_t=1.0):
    """One call of the forward twin over a whole tile (first and last): the finished statistics."""
    n = tile.shape[0]
    outs = {k: torch.full((n,), float("nan")) for k in ALL}
    args = _cuda.make("EpilogueArgs", tile=tile.data_ptr(), dtype=_cuda.DTYPE_CODES[tile.dtype], rows=n,
                      cols=tile.shape[1], ld=tile.stride(0), bias=_cuda.ptr(bias), labels=labels.data_ptr(), v0=v0,
                      vocab=vocab or tile.shape[1], inv_temperature=inv_t, softcap=softcap)
    fold = _cuda.make("FoldArgs", state=0, first=1, last=1, **{k: v.data_ptr() for k, v in outs.items()})
    _C.host_epilogue_fwd(args, fold, lanes)
    return outs


@pytest.mark.parametrize("lanes", [1, 3, 32, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_twin_any_lane_count_and_strided_rows(lanes, dtype):
    """Every lane count merges to the same statistics; rows with a padded stride (ld > cols) are read right."""
    g = torch.Generator().manual_seed(1)
    storage = (torch.randn(6, 131, generator=g) * 4).to(dtype)
    tile = storage[:, :117]  # ld = 131 > cols = 117
    labels = torch.randint(0, 117, (6,), generator=g)
    outs = _fold(tile, labels, lanes=lanes)
    z = tile.double()
    ref = naive_token_stats(z, torch.eye(117, dtype=torch.float64), labels)
    for k in ALL:
        assert rel_err(outs[k], ref[k]) < 3e-6, (k, lanes)


def test_large_logits_and_label_in_later_tile():
    """Logits of size 1e4 (the max shift must keep exp finite) and labels beyond the first vocabulary tile."""
    hidden, weight, _, labels, _ = _make(5, 4, 600, scale=3000.0)
    h, w = hidden.float(), weight.float()
    ours = _twin_stats(h, w, None, labels, StatRequest(entropy=True, log_sum_p2=True), 1000)
    ref = naive_token_stats(h.double(), w.double(), labels)
    ulp = 2.0**-23 * float((h.double() @ w.double().t()).abs().max())  # fp32 spacing at the largest logit
    for k in ("logprobs", "lse", "entropy", "log_sum_p2"):
        assert torch.isfinite(ours[k]).all(), k
        assert (ours[k].double() - ref[k]).abs().max() <= 4 * ulp, k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [64, 61])
def test_backward_twin_rounds_to_nearest_even_like_torch(dtype, cols):
    """The in-place dRaw of a 16-bit tile is the fp32 dRaw rounded exactly as torch rounds it (RNE, with
    fp16 subnormals), on the vector path (cols=64) and the scalar path (cols=61)."""
    g = torch.Generator().manual_seed(2)
    rows = 7
    tile16 = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    bias16 = (torch.randn(cols, generator=g)).to(dtype)
    labels = torch.randint(0, cols, (rows,), generator=g)
    z = naive_logits(tile16.double(), torch.eye(cols, dtype=torch.float64), bias16.double(), softcap=5.0, temperature=0.8)
    lse = torch.logsumexp(z, -1).float()
    ups = [torch.randn(rows, generator=g) for _ in range(4)]
    ent = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).float()
    l2 = torch.log((torch.softmax(z, -1) ** 2).sum(-1)).float()
    grad = _cuda.make("GradArgs", lse=lse.data_ptr(), g_logprobs=ups[0].data_ptr(), g_lse=ups[1].data_ptr(),
                      g_entropy=ups[2].data_ptr(), entropy=ent.data_ptr(), g_log_sum_p2=ups[3].data_ptr(),
                      log_sum_p2=l2.data_ptr())

    def run(tile, bias):
        args = _cuda.make("EpilogueArgs", tile=tile.data_ptr(), dtype=_cuda.DTYPE_CODES[tile.dtype], rows=rows,
                          cols=cols, ld=tile.stride(0), bias=bias.data_ptr(), labels=labels.data_ptr(), v0=0,
                          vocab=cols, inv_temperature=1 / 0.8, softcap=5.0)
        _C.host_epilogue_bwd(args, grad, 5)
        return tile

    d16 = run(tile16.clone(), bias16)
    d32 = run(tile16.float(), bias16.float())
    assert torch.equal(d16.view(torch.int16), d32.to(dtype).view(torch.int16))
    assert (d32 != 0).any() and torch.isfinite(d32).all()


def test_backward_twin_matches_float64_dz():
    """The fp32 dRaw of one tile against autograd of the float64 statistics (all five upstream terms)."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 5, 77
    tile = torch.randn(rows, cols, generator=g) * 2
    labels = torch.randint(0, cols, (rows,), generator=g)
    raw = tile.double().requires_grad_(True)
    z = raw * (1 / 0.9)
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    stats = {"logprobs": logp.gather(1, labels[:, None])[:, 0], "lse": torch.logsumexp(z, -1),
             "entropy": -(p * logp).sum(-1), "log_sum_p2": torch.log((p * p).sum(-1)), "mean_logit": z.mean(-1)}
    ups = {k: torch.randn(rows, generator=g, dtype=torch.float64) for k in stats}
    ref, = torch.autograd.grad(sum((stats[k] * ups[k]).sum() for k in stats), raw)
    f32 = {k: v.detach().float() for k, v in stats.items()}
    u32 = {k: v.float() for k, v in ups.items()}
    grad = _cuda.make("GradArgs", lse=f32["lse"].data_ptr(), g_logprobs=u32["logprobs"].data_ptr(),
                      g_lse=u32["lse"].data_ptr(), g_entropy=u32["entropy"].data_ptr(), entropy=f32["entropy"].data_ptr(),
                      g_log_sum_p2=u32["log_sum_p2"].data_ptr(), log_sum_p2=f32["log_sum_p2"].data_ptr(),
                      g_mean_logit=u32["mean_logit"].data_ptr())
    d = tile.clone()
    args = _cuda.make("EpilogueArgs", tile=d.data_ptr(), dtype=_C.FLOAT32, rows=rows, cols=cols, ld=cols, bias=0,
                      labels=labels.data_ptr(), v0=0, vocab=cols, inv_temperature=1 / 0.9, softcap=0.0)
    _C.host_epilogue_bwd(args, grad, 8)
    assert rel_err(d, ref) < 1e-5


def test_bad_dtype_and_lanes_are_refused():
    tile = torch.zeros(2, 3, dtype=torch.float64)
    labels = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        _fold(tile, labels, lanes=1)
    with pytest.raises(ValueError, match="lanes"):
        _fold(tile.float(), labels, lanes=0)
