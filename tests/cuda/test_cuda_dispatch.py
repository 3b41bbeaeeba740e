"""backend='cuda': how it is chosen, and the errors without the extension, without a GPU, or on a GPU the
build has no kernels for."""

import importlib.util

import pytest
import torch

import pygpo
from pygpo.ops import dispatch
from pygpo.ops.dispatch import BackendUnavailableError, load_backend, resolve_backend
from blocked_import import run_without

HAS_C = importlib.util.find_spec("pygpo._C") is not None
NO_GPU = not torch.cuda.is_available()


def test_auto_picks_cuda_only_for_the_ops_measured_faster(monkeypatch):
    """The GPU run of 2026-11-27 measured the cuda loss head faster, the token statistics not (see dispatch)."""
    monkeypatch.delenv("PYGPO_BACKEND", raising=False)
    assert dispatch.PREFER_CUDA == frozenset({"loss_head"})
    expected = "triton" if dispatch.triton_available() else "torch"
    assert resolve_backend("auto", torch.device("cuda")) == expected
    assert resolve_backend("auto", torch.device("cuda"), op="token_stats") == expected
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), op="loss_head") == "torch"
    head_on_gpu = "cuda" if dispatch.cuda_extension_runs_on(torch.device("cuda")) else expected
    assert resolve_backend("auto", torch.device("cuda"), op="loss_head") == head_on_gpu


@pytest.mark.skipif(not HAS_C, reason="pygpo._C not built")
def test_prefer_switch_makes_auto_pick_cuda_on_cuda_devices(monkeypatch):
    monkeypatch.delenv("PYGPO_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "PREFER_CUDA", frozenset({"token_stats", "loss_head"}))
    # on a GPU the build has code for (pygpo._cuda.supports; this machine may have none)
    monkeypatch.setattr(dispatch, "cuda_extension_runs_on", lambda device: device.type == "cuda")
    assert resolve_backend("auto", torch.device("cuda")) == "cuda"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    # on one it has no code for, auto falls back instead of failing at launch
    monkeypatch.setattr(dispatch, "cuda_extension_runs_on", lambda device: False)
    assert resolve_backend("auto", torch.device("cuda")) == ("triton" if dispatch.triton_available() else "torch")


def test_cuda_backend_lacks_policy_ref():
    with pytest.raises(BackendUnavailableError, match="does not implement policy_ref"):
        load_backend("cuda", "policy_ref")


@pytest.mark.skipif(not (HAS_C and NO_GPU), reason="needs pygpo._C and no GPU")
def test_no_gpu_gives_a_clear_error_from_the_api_and_from_the_extension(monkeypatch):
    h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        pygpo.fused_linear_logprobs(h, w, y, backend="cuda")
    monkeypatch.setenv("PYGPO_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        pygpo.fused_linear_logprobs(h, w, y)
    from pygpo import _C

    assert _C.device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _C.epilogue_fwd(0, 0, _C.EpilogueArgs(), _C.FoldArgs())
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _C.head_fwd(0, 0, _C.HeadArgs(), _C.HeadOutputs())


def test_without_the_extension_cuda_names_how_to_build_it():
    """A fresh interpreter that cannot import pygpo._C runs the torch backend and explains backend='cuda'."""
    res = run_without("pygpo._C", """
        import torch, pygpo
        h, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
        assert pygpo.fused_linear_logprobs(h, w, y).shape == (3,)
        try:
            pygpo.fused_linear_logprobs(h, w, y, backend='cuda')
        except pygpo.BackendUnavailableError as e:
            assert 'pygpo._C' in str(e) and 'PYGPO_BUILD_CUDA=1' in str(e), e
            print('ok')
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_cuda_backend_refuses_float64():
    from pygpo.ops.backends import cuda_logprobs
    from pygpo.ops.token_stats import StatRequest

    h = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="hidden \\(backend='cuda'\\) must have dtype in"):
        cuda_logprobs.compute_token_stats(h, h, None, torch.tensor([0, 1]), StatRequest())


@pytest.mark.skipif(not HAS_C, reason="pygpo._C not built")
@pytest.mark.parametrize("capability,archs,runs", [
    ((8, 0), (80, 86, 89, 90), True),
    ((8, 7), (80, 86, 89, 90), True),  # sm_86 machine code runs on 8.7 (same major, newer minor)
    ((9, 0), (80, 86, 89, 90), True),
    ((12, 0), (80, 86, 89, 90), True),  # PTX of compute_90, compiled by the driver
    ((7, 5), (80, 86, 89, 90), False),  # older than every build target
    ((8, 9), (90,), False),  # sm_90 code does not run on 8.9, its PTX neither
    ((9, 0), (90, 80), True),  # the PTX is the last arch's (compute_80): newer GPUs compile it
    ((7, 5), (), True),  # a build that does not say is not refused
])
def test_arch_problem_follows_cuda_binary_compatibility(capability, archs, runs):
    from pygpo import _cuda

    assert (_cuda.arch_problem(capability, archs) is None) == runs


@pytest.mark.skipif(not HAS_C, reason="pygpo._C not built")
def test_an_unsupported_gpu_is_named_with_the_fix():
    """A GPU the build has no kernels for gets the archs, its own sm and the rebuild command, not a launch
    failure ('no kernel image'); CPU tensors run the host twins."""
    from pygpo import _cuda

    problem = _cuda.arch_problem((7, 5), (80, 86, 89, 90))
    assert "sm_80, sm_86, sm_89, sm_90" in problem and "7.5 (sm_75)" in problem
    assert "PYGPO_CUDA_ARCHS=75" in problem and "backend='triton'" in problem
    assert _cuda.built_archs() and all(a >= 50 for a in _cuda.built_archs())
    assert _cuda.supports(torch.device("cpu"))
    _cuda.check_device(torch.device("cpu"))


def test_backend_override_leaves_ops_without_that_backend_to_auto(monkeypatch):
    """PYGPO_BACKEND=cuda serves a whole run: prefix attention and the policy/reference pass have no cuda
    backend and run auto's choice; an explicit backend='cuda' for them is an error naming the op."""
    torch.manual_seed(0)
    batch = pygpo.prefix.pack([[1, 2, 3]], [[[4, 5], [6]]])
    q, k, v = (torch.randn(1, 2, batch.input_ids.shape[1], 8, dtype=torch.float64) for _ in range(3))
    h, w, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64), torch.tensor([0, 1, 6, 2, 3])
    h_ref, w_ref = h + 0.1, w - 0.1
    monkeypatch.delenv("PYGPO_BACKEND", raising=False)
    want_att = pygpo.prefix_attention(q, k, v, batch, backend="torch")
    want_kl = pygpo.fused_linear_kl(h, w, h_ref, w_ref, y, backend="torch")
    monkeypatch.setenv("PYGPO_BACKEND", "cuda")
    assert resolve_backend("auto", torch.device("cpu"), op="prefix_attention") == "torch"
    assert resolve_backend("auto", torch.device("cpu"), op="policy_ref") == "torch"
    torch.testing.assert_close(pygpo.prefix_attention(q, k, v, batch), want_att, rtol=0, atol=0)
    got_kl = pygpo.fused_linear_kl(h, w, h_ref, w_ref, y)
    for got, want in zip(got_kl, want_kl):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(BackendUnavailableError, match="backend='cuda' does not implement prefix_attention"):
        pygpo.prefix_attention(q, k, v, batch, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' does not implement policy_ref"):
        pygpo.fused_linear_kl(h, w, h_ref, w_ref, y, backend="cuda")


def test_errors_name_the_override_that_chose_the_backend(monkeypatch):
    monkeypatch.setenv("PYGPO_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="PYGPO_BACKEND='triton' runs on CUDA tensors.*PYGPO_BACKEND=torch"):
        resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(BackendUnavailableError, match="backend='triton' runs on CUDA tensors.*backend='torch'"):
        resolve_backend("triton", torch.device("cpu"))
