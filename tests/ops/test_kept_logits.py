"""The torch backend's kept-logits strategy (whole logit matrix within the memory budget).

Both strategies are checked against the float64 reference elsewhere (default budget keeps, a tiny
one recomputes); here: which one a budget selects, kept logits walked in many small row chunks,
and a second backward through the same graph giving the very same gradients.
"""

import pytest
import torch

import pygpo
from pygpo.ops.backends import torch_chunked, torch_tiles
from pygpo.ops.chunking import KEPT_WORK_TILES, kept_logits_rows
from pygpo.ops.token_stats import StatRequest
from reference import STAT_OUTPUTS, leaf, naive_token_stats, rel_err, run_with_grads


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


def test_kept_rows_follow_the_budget():
    assert kept_logits_rows(4096, 32000, 4, memory_budget=_budget_for(4096, 32000, 32)) == 32
    assert kept_logits_rows(4096, 32000, 4, memory_budget=_budget_for(4096, 32000, 1)) == 1
    assert kept_logits_rows(4096, 32000, 4, memory_budget=_budget_for(4096, 32000, 1) - 1) is None
    assert kept_logits_rows(5, 10, 4, memory_budget=2**30) == 5  # never more rows than there are
    assert kept_logits_rows(8192, 128256, 4) is None  # the default budget does not keep 4 GiB
    with pytest.raises(ValueError, match="memory_budget"):
        kept_logits_rows(5, 10, 4, memory_budget=-1)


@pytest.mark.parametrize("work_rows,keeps", [(1, True), (4, True), (None, False)])
def test_budget_selects_the_strategy(monkeypatch, work_rows, keeps):
    hidden, weight, _, labels, _ = _make()
    calls = []
    real = torch_chunked._backward_kept
    monkeypatch.setattr(torch_chunked, "_backward_kept", lambda *a: calls.append(1) or real(*a))
    budget = 1000 if work_rows is None else _budget_for(len(labels), weight.shape[0], work_rows)
    h = leaf(hidden, torch.float32)
    out = pygpo.fused_linear_logprobs(h, weight.float(), labels, backend="torch", memory_budget=budget)
    out.sum().backward()
    assert bool(calls) == keeps


@pytest.mark.parametrize("grad_mode", ["no_grad", "no_requires_grad"])
def test_nothing_kept_without_a_backward(monkeypatch, grad_mode):
    """Reference scoring under no_grad (or on tensors without grad) never pays for kept logits."""
    hidden, weight, _, labels, _ = _make()
    kept = []
    real = torch_chunked._forward_kept
    monkeypatch.setattr(torch_chunked, "_forward_kept", lambda *a: kept.append(1) or real(*a))
    h = hidden.float().requires_grad_(grad_mode == "no_grad")
    with torch.set_grad_enabled(grad_mode != "no_grad"):
        out = pygpo.fused_linear_logprobs(h, weight.float(), labels, backend="torch")
    assert not kept and not out.requires_grad
    ref = naive_token_stats(hidden, weight, labels)["logprobs"]
    assert rel_err(out, ref) < 2e-6
    pygpo.fused_linear_logprobs(leaf(hidden, torch.float32), weight.float(), labels, backend="torch")
    assert kept  # and with a backward possible, the default budget keeps them


@pytest.mark.parametrize("work_rows", [1, 4, 100])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 4.0)])
def test_kept_in_row_chunks_matches_float64_reference(work_rows, temperature, softcap):
    hidden, weight, bias, labels, upstream = _make()
    labels[::3] = -100
    kw = dict(temperature=temperature, softcap=softcap)
    n_valid = int((labels != -100).sum())
    ref_out, ref_grads = run_with_grads(
        lambda h, w, b: naive_token_stats(h, w, labels, b, **kw), [leaf(hidden), leaf(weight), leaf(bias)], upstream)

    def ours(h, w, b):
        return pygpo.fused_linear_logprobs(
            h, w, labels, bias=b, return_entropy=True, return_lse=True, return_log_sum_p2=True, backend="torch",
            memory_budget=_budget_for(n_valid, weight.shape[0], work_rows), **kw)._asdict()

    out, grads = run_with_grads(ours, [leaf(hidden, torch.float32), leaf(weight, torch.float32),
                                       leaf(bias, torch.float32)], upstream)
    for k in STAT_OUTPUTS:
        assert rel_err(out[k], ref_out[k]) < 2e-6, k
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name


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


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_second_backward_gives_the_same_gradients(softcap):
    """The first backward consumes the kept logits; a second one (retain_graph) rebuilds them exactly."""
    hidden, weight, bias, labels, upstream = _make()
    h, w, b = leaf(hidden, torch.float32), leaf(weight, torch.float32), leaf(bias, torch.float32)
    out = pygpo.fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True, backend="torch", softcap=softcap,
                                      memory_budget=_budget_for(len(labels), weight.shape[0], 3))
    total = (out.logprobs * upstream["logprobs"].float()).sum() + (out.entropy * upstream["entropy"].float()).sum()
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
