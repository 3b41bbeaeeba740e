"""Bad input fails before any kernel with a message naming the argument; edge cases stay exact."""

import importlib.util

import pytest
import torch

import pygpo
from pygpo.ops.dispatch import resolve_backend
from blocked_import import run_without

N, D, V = 6, 8, 11


def _ok():
    return torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,))


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda h, w, y: (h[:, :5], w, y), ValueError, "hidden's last dimension"),
    (lambda h, w, y: (h, w, y[:4]), ValueError, "labels shape"),
    (lambda h, w, y: (h, w[0], y), ValueError, "weight must have shape"),
    (lambda h, w, y: (h, w.double(), y), TypeError, "weight dtype"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "labels must be an integer"),
    (lambda h, w, y: (h, w, torch.full_like(y, V)), ValueError, r"labels must lie in \[0, 11\)"),
    (lambda h, w, y: (h, w, torch.full_like(y, -3)), ValueError, "found -3"),
    (lambda h, w, y: (h.long(), w, y), TypeError, "hidden must be a floating-point"),
    (lambda h, w, y: (h.numpy(), w, y), TypeError, "hidden must be a torch.Tensor"),
    (lambda h, w, y: (h, w.to("meta"), y), ValueError, "one device"),
])
def test_bad_tensors_name_the_argument(mutate, exc, match):
    h, w, y = mutate(*_ok())
    with pytest.raises(exc, match=match):
        pygpo.fused_linear_logprobs(h, w, y)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(softcap=0.0), "softcap"), (dict(bias=torch.randn(V + 1)), r"bias must have shape \(V,\)"),
    (dict(bias=torch.randn(V).double()), "bias dtype"), (dict(memory_budget=0), "memory_budget"),
    (dict(backend="cuda-magic"), "backend must be one of"),
])
def test_bad_options_name_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pygpo.fused_linear_logprobs(*_ok(), **kw)


def test_empty_input_returns_empty():
    h, w = torch.randn(0, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    out = pygpo.fused_linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    out.logprobs.sum().backward()
    assert h.grad.shape == h.shape and torch.count_nonzero(w.grad) == 0


def test_all_ignored_gives_zeros_and_zero_gradients():
    h, w = torch.randn(N, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    out = pygpo.fused_linear_logprobs(h, w, torch.full((N,), -100), bias=b)
    assert torch.equal(out, torch.zeros(N))
    (out * torch.randn(N)).sum().backward()
    for t in (h, w, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_extreme_logits_stay_finite_and_exact():
    """|z| ~ 1e4: the online log-sum-exp must not overflow; values match float64."""
    h = torch.tensor([[1e4, 0.0], [-1e4, 3e3], [5e3, -5e3]])
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    y = torch.tensor([0, 1, 3])
    h.requires_grad_(True)
    out = pygpo.fused_linear_logprobs(h, w, y, return_entropy=True, return_lse=True, return_log_sum_p2=True,
                                      memory_budget=24)  # one vocabulary column per tile: maximal rescaling
    z = (h.detach().double() @ w.double().T)
    ref_lp = torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0]
    for t in out:
        assert torch.isfinite(t).all()
    assert torch.allclose(out.logprobs.double(), ref_lp, rtol=1e-6, atol=1e-3)
    assert torch.allclose(out.lse.double(), torch.logsumexp(z, -1), rtol=1e-6)
    out.logprobs.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_env_override_and_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("PYGPO_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("PYGPO_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("PYGPO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PYGPO_BACKEND"):
        resolve_backend("auto", cpu)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(pygpo.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


def test_imports_and_runs_without_triton():
    """A fresh interpreter that cannot import triton still imports pygpo and runs the torch backend, and
    asking for triton names the package to install."""
    res = run_without("triton", """
        import torch, pygpo
        assert 'triton' not in sys.modules
        out = pygpo.fused_linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))
        assert out.shape == (3,)
        try:
            pygpo.fused_linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]), backend='triton')
        except pygpo.BackendUnavailableError as e:
            assert 'pip install' in str(e), e
            print('ok')
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert "triton" not in res.stderr
