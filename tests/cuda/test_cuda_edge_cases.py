"""Edge cases of the ``cuda`` backend, run on the CPU through the kernels' host twins.

A vocabulary masked with the lowest finite float instead of ``-inf``, zero rows, int32 labels, row
offsets past 2^31 elements, refused kernel arguments, and ``torch.autocast``: the tiles take autocast's
dtype once, in the forward, and the backward recomputes them in that dtype (a backward runs outside the
autocast region). References are float64 (``tests/reference.py``).
"""

import pytest
import torch

from reference import STAT_OUTPUTS, leaf, naive_token_stats, rel_err, run_with_grads

_C = pytest.importorskip("pygpo._C", reason="pygpo._C not built (no CUDA toolkit at install time)")

from pygpo import _cuda  # noqa: E402
from pygpo.ops.backends import cuda_logprobs  # noqa: E402
from pygpo.ops.token_stats import StatRequest  # noqa: E402


def _make(n, d, v, *, seed=0, bias_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64) * bias_scale
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in STAT_OUTPUTS}
    return hidden, weight, bias, labels, upstream


def _stats(h, w, b, y, *, memory_budget=None, **kw):
    req = StatRequest(entropy=True, log_sum_p2=True, **kw)
    return cuda_logprobs.compute_token_stats(h, w, b, y, req, memory_budget=memory_budget)._asdict()


@pytest.mark.parametrize("memory_budget", [None, 2000])  # kept whole-vocabulary tile; vocabulary tiles
def test_vocabulary_masked_with_the_lowest_float_is_finite_and_exact(memory_budget):
    """A bias of finfo(float32).min (a common mask value) on the first 40 of 64 columns: a lane whose
    running max sat there rescaled by (t + shift s) e^shift with shift s = -inf and e^shift = 0 (nan entropy)."""
    hidden, weight, bias, labels, upstream = _make(6, 8, 64)
    bias[:40] = torch.finfo(torch.float32).min
    labels = labels % 24 + 40
    ref_out, ref_grads = run_with_grads(lambda h, w: naive_token_stats(h, w, labels, bias),
                                        [leaf(hidden), leaf(weight)], upstream)
    out, grads = run_with_grads(lambda h, w: _stats(h, w, bias.float(), labels, memory_budget=memory_budget),
                                [leaf(hidden, torch.float32), leaf(weight, torch.float32)], upstream)
    for k in STAT_OUTPUTS:
        assert rel_err(out[k], ref_out[k]) < 3e-6, k
    for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
        assert rel_err(g, r) < 2e-5, name


@pytest.mark.parametrize("lanes", [1, 3, 32])
def test_forward_twin_lowest_float_packs_before_the_max(lanes):
    """The vector path (16-byte packs of 4 floats) folding masked packs first, then merging lanes."""
    g = torch.Generator().manual_seed(4)
    tile = torch.randn(3, 96, generator=g) * 3
    tile[:, :64] = torch.finfo(torch.float32).min
    labels = torch.tensor([64, 80, 95])
    lp, ent = torch.full((3,), float("nan")), torch.full((3,), float("nan"))
    args = _cuda.make("EpilogueArgs", tile=tile.data_ptr(), dtype=_C.FLOAT32, rows=3, cols=96, ld=96, bias=0,
                      labels=labels.data_ptr(), v0=0, vocab=96, inv_temperature=1.0, softcap=0.0)
    _C.host_epilogue_fwd(args, _cuda.make("FoldArgs", state=0, first=1, last=1, logprobs=lp.data_ptr(),
                                          entropy=ent.data_ptr()), lanes)
    ref = naive_token_stats(tile.double(), torch.eye(96, dtype=torch.float64), labels)
    assert rel_err(lp, ref["logprobs"]) < 3e-6 and rel_err(ent, ref["entropy"]) < 3e-6


def test_zero_rows_give_empty_outputs_and_zero_gradients():
    """The kept-logits path used a row chunk of 0 (range step 0) for an empty batch."""
    h, w = torch.randn(0, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    out = _stats(h, w, None, torch.zeros(0, dtype=torch.int64))
    assert all(out[k].shape == (0,) for k in STAT_OUTPUTS)
    (out["logprobs"].sum() + out["entropy"].sum()).backward()
    assert h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros(10, 8))


def test_int32_labels_read_as_int64():
    """The kernels read int64 labels; an int32 tensor was passed through as it was."""
    hidden, weight, _, labels, _ = _make(9, 8, 50)
    out = _stats(hidden.float(), weight.float(), None, labels.to(torch.int32))
    ref = naive_token_stats(hidden, weight, labels)
    assert rel_err(out["logprobs"], ref["logprobs"]) < 3e-6


def test_row_offsets_past_two_to_the_31_elements():
    """Rows ld = 2^31 + 8 elements apart (an 8 GiB virtual buffer whose untouched pages are never backed):
    forward and backward twins index rows with 64-bit offsets."""
    cols, ld = 40, 2**31 + 8
    try:
        buf = torch.empty(ld + cols, dtype=torch.float32)
    except RuntimeError:
        pytest.skip("cannot reserve 8 GiB of address space here")
    tile = buf.as_strided((2, cols), (ld, 1))
    values = torch.randn(2, cols, generator=torch.Generator().manual_seed(5))
    tile.copy_(values)
    labels = torch.tensor([3, cols - 1])
    lp, lse = torch.full((2,), float("nan")), torch.full((2,), float("nan"))
    args = _cuda.make("EpilogueArgs", tile=tile.data_ptr(), dtype=_C.FLOAT32, rows=2, cols=cols, ld=ld, bias=0,
                      labels=labels.data_ptr(), v0=0, vocab=cols, inv_temperature=1.0, softcap=0.0)
    _C.host_epilogue_fwd(args, _cuda.make("FoldArgs", state=0, first=1, last=1, logprobs=lp.data_ptr(),
                                          lse=lse.data_ptr()), 4)
    log_p = torch.log_softmax(values.double(), -1)
    assert rel_err(lp, log_p.gather(1, labels[:, None])[:, 0]) < 3e-6
    g = torch.ones(2)
    _C.host_epilogue_bwd(args, _cuda.make("GradArgs", lse=lse.data_ptr(), g_logprobs=g.data_ptr()), 4)
    d_ref = -log_p.exp()
    d_ref[torch.arange(2), labels] += 1
    assert rel_err(tile, d_ref) < 1e-5


def test_kernel_arguments_are_refused_before_a_launch():
    req = StatRequest()
    tile, labels = torch.zeros(4, 6), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="unit column stride"):
        cuda_logprobs.epilogue_args(tile.t(), None, torch.zeros(6, dtype=torch.int64), 0, 6, req)
    with pytest.raises(ValueError, match="labels must be a contiguous"):
        cuda_logprobs.epilogue_args(tile, None, labels.int(), 0, 6, req)
    with pytest.raises(ValueError, match="softcap must be a positive number representable in float32"):
        cuda_logprobs.epilogue_args(tile, None, labels, 0, 6, StatRequest(softcap=1e-50))  # float32 0: no cap
    with pytest.raises(ValueError, match="temperature"):
        cuda_logprobs.epilogue_args(tile, None, labels, 0, 6, StatRequest(temperature=1e-40))


def _autocast_run(hidden, weight, bias, labels, upstream, budget):
    ins = [leaf(hidden, torch.float32), leaf(weight, torch.float32), leaf(bias, torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _stats(*ins, labels, memory_budget=budget)
    total = sum((out[k].double() * upstream[k]).sum() for k in STAT_OUTPUTS)
    return out, ins, total


@pytest.mark.parametrize("memory_budget", [None, 6000])  # kept matrix; recomputed vocabulary tiles
def test_autocast_backward_differentiates_the_forwards_tiles(memory_budget):
    """Under autocast the forward's tiles are bf16; the backward ran outside autocast and recomputed them in
    fp32 (and with the unrounded bias), so dRaw did not belong to the log-sum-exp it was built from. The
    bias gradient sums unrounded fp32 dRaw: against float64 math on the rounded tile it is fp32-exact."""
    hidden, weight, bias, labels, upstream = _make(37, 48, 1001, bias_scale=1.0)
    out, ins, total = _autocast_run(hidden, weight, bias, labels, upstream, memory_budget)
    _, _, d_b = torch.autograd.grad(total, ins)
    tile = torch.mm(hidden.bfloat16(), weight.bfloat16().t()).double()  # what autocast's matmul gives
    b64 = leaf(bias.bfloat16().double())
    ref = naive_token_stats(tile, torch.eye(1001, dtype=torch.float64), labels, b64)
    r_b, = torch.autograd.grad(sum((ref[k] * upstream[k]).sum() for k in STAT_OUTPUTS), b64)
    for k in STAT_OUTPUTS:
        assert rel_err(out[k], ref[k]) < 3e-6, k
    assert d_b.dtype == torch.float32
    assert rel_err(d_b, r_b) < 2e-5


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_autocast_kept_logits_second_backward_is_bitwise_equal(softcap):
    """retain_graph: the first backward consumes the bf16 kept matrix, the second rebuilds it in bf16 too."""
    hidden, weight, bias, labels, upstream = _make(29, 24, 301)
    ins = [leaf(hidden, torch.float32), leaf(weight, torch.float32), leaf(bias, torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _stats(*ins, labels, softcap=softcap)
    total = sum((out[k].double() * upstream[k]).sum() for k in STAT_OUTPUTS)
    first = torch.autograd.grad(total, ins, retain_graph=True)
    second = torch.autograd.grad(total, ins)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("memory_budget", [6 * 64 * 1001, None])  # recomputed tiles; kept matrix
def test_bf16_tiles_as_on_a_gpu(monkeypatch, memory_budget):
    """The GPU's branch on the CPU (matmuls in the input dtype, bf16 tiles) with a bf16 bias that needs its
    gradient: the backward widens each tile to fp32 beside it, 6 bytes an element, and the recomputed tiles
    must fit the budget (they were sized at 2 bytes). Statistics and the bias gradient (summed in fp32,
    returned in bf16) against float64 math on the rounded tile."""
    hidden, weight, bias, labels, upstream = _make(200, 16, 1001, bias_scale=1.0)
    monkeypatch.setattr(cuda_logprobs, "matmul_dtype", lambda x: x.dtype)
    shapes = []
    real = cuda_logprobs.mm_tile
    monkeypatch.setattr(cuda_logprobs, "mm_tile", lambda *a: shapes.append(real(*a)) or shapes[-1])
    ins = [leaf(x, torch.bfloat16) for x in (hidden, weight, bias)]
    out, (_, _, d_b) = run_with_grads(lambda h, w, b: _stats(h, w, b, labels, memory_budget=memory_budget), ins,
                                      upstream)
    assert shapes and all(t.dtype == torch.bfloat16 for t in shapes)
    if memory_budget is not None:
        assert max(t.numel() for t in shapes) * (2 + 4) <= memory_budget
    tile = torch.mm(hidden.bfloat16(), weight.bfloat16().t()).double()
    b64 = leaf(bias.bfloat16().double())
    ref = naive_token_stats(tile, torch.eye(1001, dtype=torch.float64), labels, b64)
    r_b, = torch.autograd.grad(sum((ref[k] * upstream[k]).sum() for k in STAT_OUTPUTS), b64)
    for k in STAT_OUTPUTS:
        assert rel_err(out[k], ref[k]) < 3e-6, k
    assert d_b.dtype == torch.bfloat16 and rel_err(d_b, r_b) < 2**-8


@pytest.mark.parametrize("memory_budget", [None, 3000])
def test_labels_at_the_ends_of_the_vocabulary(memory_budget):
    """Labels 0 and V - 1 (the last column of a narrower last vocabulary tile) and their gradients."""
    hidden, weight, _, labels, upstream = _make(6, 8, 1001)
    labels = torch.tensor([0, 1000, 0, 1000, 500, 999])
    ref_out, ref_grads = run_with_grads(lambda h, w: naive_token_stats(h, w, labels), [leaf(hidden), leaf(weight)],
                                        upstream)
    out, grads = run_with_grads(lambda h, w: _stats(h, w, None, labels, memory_budget=memory_budget),
                                [leaf(hidden, torch.float32), leaf(weight, torch.float32)], upstream)
    for k in STAT_OUTPUTS:
        assert rel_err(out[k], ref_out[k]) < 3e-6, k
    for name, g, r in zip(("hidden", "weight"), grads, ref_grads):
        assert rel_err(g, r) < 2e-5, name


def test_strided_bias_view():
    """A bias that is a strided view (every other entry of a buffer): the kernels read it with unit stride."""
    hidden, weight, bias, labels, _ = _make(7, 8, 301)
    storage = torch.zeros(2 * 301, dtype=torch.float32)
    storage[::2] = bias.float()
    out = _stats(hidden.float(), weight.float(), storage[::2], labels, memory_budget=2000)
    ref = naive_token_stats(hidden, weight, labels, bias)
    for k in STAT_OUTPUTS:
        assert rel_err(out[k], ref[k]) < 3e-6, k
