"""The kept-logits strategy of the torch backend and of the cuda backend (on its host twin).

When the whole valid-row logit matrix fits the memory budget it is kept for the backward. Both
strategies are checked against the float64 reference elsewhere (default budget keeps, a tiny one
recomputes); here: which one a budget selects, kept logits walked in many small row chunks (with a
bias gradient), no logits kept when no backward can follow, and a second backward through the same
graph giving the very same gradients.
"""

import importlib.util

import pytest
import torch

import pygpo
from pygpo.ops.backends import torch_chunked, torch_tiles
from pygpo.ops.chunking import KEPT_WORK_TILES, kept_logits_rows
from pygpo.ops.token_stats import StatRequest
from reference import STAT_OUTPUTS, leaf, naive_token_stats, rel_err, run_with_grads

HAVE_C = importlib.util.find_spec("pygpo._C") is not None
BACKENDS = ["torch", pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_C, reason="pygpo._C not built"))]


def _make(n=29, d=24, v=301, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    upstream = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in STAT_OUTPUTS}
    return hidden, weight, bias, labels, upstream


def _budget_for(n, v, work_rows):
    """The budget that keeps an ``n x v`` fp32 logit matrix with ``work_rows`` rows of working tiles."""
    return 4 * v * (n + KEPT_WORK_TILES * work_rows)


def _stats(backend, h, w, b, labels, *, memory_budget=None, **kw):
    """Token statistics of the valid rows by ``backend`` (the cuda backend on CPU runs its host twin)."""
    req = StatRequest(entropy=True, log_sum_p2=True, **kw)
    valid = labels != -100
    if backend == "torch":
        from pygpo.ops.backends.torch_chunked import compute_token_stats
    else:
        from pygpo.ops.backends.cuda_logprobs import compute_token_stats
    return compute_token_stats(h[valid], w, b, labels[valid], req, memory_budget=memory_budget)._asdict()


def _spy(monkeypatch, backend):
    """A list that grows by one each time ``backend`` keeps a logit matrix."""
    calls = []
    if backend == "torch":
        module, name = torch_chunked, "_forward_kept"
    else:
        from pygpo.ops.backends import cuda_logprobs as module
        name = "_fill_kept"
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_kept_rows_follow_the_budget():
    assert kept_logits_rows(4096, 32000, 4, memory_budget=_budget_for(4096, 32000, 32)) == 32
    assert kept_logits_rows(4096, 32000, 4, memory_budget=_budget_for(4096, 32000, 1)) == 1
    assert kept_logits_rows(4096, 32000, 4, memory_budget=_budget_for(4096, 32000, 1) - 1) is None
    assert kept_logits_rows(5, 10, 4, memory_budget=2**30) == 5  # never more rows than there are
    assert kept_logits_rows(8192, 128256, 4) is None  # the default budget does not keep 4 GiB
    with pytest.raises(ValueError, match="memory_budget"):
        kept_logits_rows(5, 10, 4, memory_budget=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("work_rows,keeps", [(1, True), (4, True), (None, False)])
def test_budget_selects_the_strategy(monkeypatch, backend, work_rows, keeps):
    hidden, weight, _, labels, _ = _make()
    kept = _spy(monkeypatch, backend)
    budget = 1000 if work_rows is None else _budget_for(len(labels), weight.shape[0], work_rows)
    out = _stats(backend, leaf(hidden, torch.float32), weight.float(), None, labels, memory_budget=budget)
    out["logprobs"].sum().backward()
    assert bool(kept) == keeps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_mode", ["no_grad", "no_requires_grad"])
def test_nothing_kept_without_a_backward(monkeypatch, backend, grad_mode):
    """Reference scoring under no_grad (or on tensors without grad) never pays for kept logits."""
    hidden, weight, _, labels, _ = _make()
    kept = _spy(monkeypatch, backend)
    h = hidden.float().requires_grad_(grad_mode == "no_grad")
    with torch.set_grad_enabled(grad_mode != "no_grad"):
        out = _stats(backend, h, weight.float(), None, labels)
    assert not kept and not out["logprobs"].requires_grad
    assert rel_err(out["logprobs"], naive_token_stats(hidden, weight, labels)["logprobs"]) < 2e-6
    _stats(backend, leaf(hidden, torch.float32), weight.float(), None, labels)
    assert kept  # and with a backward possible, the default budget keeps them


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("work_rows", [1, 4, 100])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 4.0)])
def test_kept_in_row_chunks_matches_float64_reference(backend, work_rows, temperature, softcap):
    hidden, weight, bias, labels, upstream = _make()
    labels[::3] = -100
    valid = labels != -100
    kw = dict(temperature=temperature, softcap=softcap)
    ups = {k: u[valid] for k, u in upstream.items()}
    ref_out, ref_grads = run_with_grads(
        lambda h, w, b: {k: v[valid] for k, v in naive_token_stats(h, w, labels, b, **kw).items()},
        [leaf(hidden), leaf(weight), leaf(bias)], ups)
    budget = _budget_for(int(valid.sum()), weight.shape[0], work_rows)
    out, grads = run_with_grads(lambda h, w, b: _stats(backend, h, w, b, labels, memory_budget=budget, **kw),
                                [leaf(hidden, torch.float32), leaf(weight, torch.float32), leaf(bias, torch.float32)],
                                ups)
    for k in STAT_OUTPUTS:
        assert rel_err(out[k], ref_out[k]) < 3e-6, k
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(g, r) < 2e-5, name


def test_label_smoothed_cross_entropy_with_kept_logits():
    """The mean logit (label smoothing) goes through the kept path too."""
    hidden, weight, bias, labels, _ = _make()
    ins = [leaf(hidden, torch.float32), leaf(weight, torch.float32), leaf(bias, torch.float32)]
    loss = pygpo.fused_linear_cross_entropy(*ins[:2], labels, bias=ins[2], label_smoothing=0.2, backend="torch")
    grads = torch.autograd.grad(loss, ins)
    ref_ins = [leaf(hidden), leaf(weight), leaf(bias)]
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(ref_ins[0], ref_ins[1], ref_ins[2]), labels,
                                            label_smoothing=0.2)
    ref_grads = torch.autograd.grad(ref, ref_ins)
    assert rel_err(loss, ref) < 2e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_second_backward_gives_the_same_gradients(backend, softcap):
    """The first backward consumes the kept logits; a second one (retain_graph) rebuilds them exactly."""
    hidden, weight, bias, labels, upstream = _make()
    h, w, b = leaf(hidden, torch.float32), leaf(weight, torch.float32), leaf(bias, torch.float32)
    out = _stats(backend, h, w, b, labels, softcap=softcap, memory_budget=_budget_for(len(labels), weight.shape[0], 3))
    total = (out["logprobs"] * upstream["logprobs"].float()).sum() + (out["entropy"] * upstream["entropy"].float()).sum()
    first = torch.autograd.grad(total, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(total, (h, w, b))
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_fill_logits_in_chunks_equals_one_matmul(monkeypatch):
    """The accelerator branch (half-precision matmul per chunk, copied into fp32) on CPU."""
    hidden, weight, bias, _, _ = _make()
    h, w, b = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    req = StatRequest(temperature=0.5, softcap=2.0)
    whole = torch.mm(h, w.t()).float() + b.float()
    expected = (2.0 * torch.tanh(whole / 2.0)) / 0.5
    monkeypatch.setattr(torch_tiles, "matmul_dtype", lambda x: x.dtype)
    out = torch_tiles.fill_logits_(torch.empty(h.shape[0], w.shape[0]), h, w, b, req, rows_per_chunk=4)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
