"""A vocabulary masked through a ``-inf`` bias, in every backend, against a float64 reference.

Masked entries have ``p = 0`` exactly; with the convention ``0 log 0 = 0`` the log-probs, entropy,
logsumexp, ``log sum p^2``, the KL between two models that mask the same entries, and all their
gradients are finite and equal those of the softmax over the unmasked entries alone. The reference
computes exactly that: it drops the masked columns, materialises the remaining float64 logits with
plain torch (``tests/reference.py``), and gives the masked rows of ``weight`` and entries of ``bias``
zero gradient (nothing but a ``p = 0`` factor connects them to the outputs).

The mask covers whole vocabulary tiles (the first and last of the 256-wide tiles the small memory budget
forces, and several 64-wide Triton tiles), so that a tile of only ``-inf`` logits is folded first, as
well as scattered single entries. Upstream gradients are random per token, entropy's included.
Tolerances: fp32 results within 1e-5 (values) and 3e-5 (gradients) of the reference's largest magnitude.
"""

import importlib.util

import pytest
import torch

import pygpo
from pygpo.ops.token_stats import StatRequest
from reference import leaf, naive_policy_ref, naive_token_stats, rel_err

STATS = ("logprobs", "entropy", "lse", "log_sum_p2")
N, D, D_REF, V = 13, 24, 20, 600
SMALL_BUDGET = 2000  # 1 x 256 tiles in the torch and cuda backends: [0, 256) is wholly masked
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _mask() -> torch.Tensor:
    cols = torch.arange(V)
    return (cols < 256) | (cols >= 512) | (cols % 7 == 3)


def _make(seed: int = 0):
    """float64 inputs with a -inf bias on the masked entries, labels among the rest, upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    masked = _mask()
    kept = (~masked).nonzero()[:, 0]
    x = dict(
        hidden=torch.randn(N, D, generator=g, dtype=torch.float64) * 2.0,
        weight=torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5,
        bias=(torch.randn(V, generator=g, dtype=torch.float64) * 0.1).masked_fill(masked, float("-inf")),
        ref_hidden=torch.randn(N, D_REF, generator=g, dtype=torch.float64) * 2.0,
        ref_weight=torch.randn(V, D_REF, generator=g, dtype=torch.float64) / D_REF**0.5,
        ref_bias=(torch.randn(V, generator=g, dtype=torch.float64) * 0.1).masked_fill(masked, float("-inf")),
    )
    labels = kept[torch.randint(0, kept.numel(), (N,), generator=g)]
    upstream = {k: torch.randn(N, generator=g, dtype=torch.float64) for k in STATS + ("kl",)}
    return x, labels, upstream, kept


def _reference_grads(total, h, w, b, kept):
    """Gradients of ``total`` (built on the kept columns) as full-vocabulary tensors."""
    g_h, g_w, g_b = torch.autograd.grad(total, (h, w, b))
    full_w = torch.zeros(V, w.shape[1], dtype=torch.float64).index_copy(0, kept, g_w)
    full_b = torch.zeros(V, dtype=torch.float64).index_copy(0, kept, g_b)
    return g_h, full_w, full_b


def _reference_stats(x, labels, upstream, kept):
    h, w, b = leaf(x["hidden"]), leaf(x["weight"][kept]), leaf(x["bias"][kept])
    local = torch.searchsorted(kept, labels)  # the labels' positions among the kept entries
    ref = naive_token_stats(h, w, local, b)
    total = sum((ref[k] * upstream[k]).sum() for k in STATS)
    return ref, _reference_grads(total, h, w, b, kept)


def _check(ours: dict, grads, ref: dict, ref_grads, names) -> None:
    for k in names:
        assert torch.isfinite(ours[k]).all(), k
        assert rel_err(ours[k], ref[k]) < 1e-5, k
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < 3e-5, name


def _run_stats(fn, x, labels, upstream):
    """fp32 leaves, ``fn(h, w, b) -> dict``, and the gradients of ``sum_k <out_k, upstream_k>``."""
    h, w, b = (leaf(x[k], torch.float32) for k in ("hidden", "weight", "bias"))
    out = fn(h, w, b)
    total = sum((out[k].double() * upstream[k]).sum() for k in STATS)
    return out, torch.autograd.grad(total, (h, w, b))


def _public(labels, backend, memory_budget):
    def fn(h, w, b):
        out = pygpo.fused_linear_logprobs(h, w, labels, bias=b, return_entropy=True, return_lse=True,
                                          return_log_sum_p2=True, backend=backend, memory_budget=memory_budget)
        return out._asdict()

    return fn


@pytest.mark.parametrize("memory_budget", [None, SMALL_BUDGET])  # logits kept / tiles recomputed
def test_torch_backend(memory_budget):
    x, labels, upstream, kept = _make()
    ours, grads = _run_stats(_public(labels, "torch", memory_budget), x, labels, upstream)
    _check(ours, grads, *_reference_stats(x, labels, upstream, kept), STATS)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_backend():
    x, labels, upstream, kept = _make(1)
    ours, grads = _run_stats(_public(labels, "triton", None), x, labels, upstream)
    _check(ours, grads, *_reference_stats(x, labels, upstream, kept), STATS)


@pytest.mark.parametrize("memory_budget", [None, SMALL_BUDGET])
def test_cuda_backend_host_twin(memory_budget):
    pytest.importorskip("pygpo._C", reason="pygpo._C not built (no CUDA toolkit at install time)")
    from pygpo.ops.backends import cuda_logprobs

    x, labels, upstream, kept = _make(2)
    req = StatRequest(entropy=True, log_sum_p2=True)

    def fn(h, w, b):
        return cuda_logprobs.compute_token_stats(h, w, b, labels, req, memory_budget=memory_budget)._asdict()

    ours, grads = _run_stats(fn, x, labels, upstream)
    _check(ours, grads, *_reference_stats(x, labels, upstream, kept), STATS)


@pytest.mark.parametrize("memory_budget", [None, SMALL_BUDGET])
def test_cuda_backend_host_twin_logprob_gradient_alone(memory_budget):
    """The defect as first seen: only log-probs requested and backpropagated (no entropy upstream)."""
    pytest.importorskip("pygpo._C", reason="pygpo._C not built (no CUDA toolkit at install time)")
    from pygpo.ops.backends import cuda_logprobs

    x, labels, upstream, kept = _make(3)
    h, w, b = (leaf(x[k], torch.float32) for k in ("hidden", "weight", "bias"))
    out = cuda_logprobs.compute_token_stats(h, w, b, labels, StatRequest(), memory_budget=memory_budget)
    grads = torch.autograd.grad((out.logprobs.double() * upstream["logprobs"]).sum(), (h, w, b))
    ref, _ = _reference_stats(x, labels, upstream, kept)
    hr, wr, br = leaf(x["hidden"]), leaf(x["weight"][kept]), leaf(x["bias"][kept])
    lp = naive_token_stats(hr, wr, torch.searchsorted(kept, labels), br)["logprobs"]
    ref_grads = _reference_grads((lp * upstream["logprobs"]).sum(), hr, wr, br, kept)
    _check({"logprobs": out.logprobs}, grads, ref, ref_grads, ("logprobs",))


def test_torch_engine_of_the_fused_pass():
    from pygpo.fused.tile_engines import TorchEngine

    x, labels, upstream, kept = _make(4)
    h, w, b = (x[k].float() for k in ("hidden", "weight", "bias"))
    engine = TorchEngine(StatRequest(entropy=True))
    stats = engine.stats(h, w, b, labels)._asdict()
    d_w, d_b = torch.zeros(V, D), torch.zeros(V)
    d_h = engine.grads(upstream["logprobs"].float(), h, w, labels, d_w, d_b, True)
    hr, wr, br = leaf(x["hidden"]), leaf(x["weight"][kept]), leaf(x["bias"][kept])
    ref = naive_token_stats(hr, wr, torch.searchsorted(kept, labels), br)
    ref_grads = _reference_grads((ref["logprobs"] * upstream["logprobs"]).sum(), hr, wr, br, kept)
    _check(stats, (d_h, d_w, d_b), ref, ref_grads, ("logprobs", "entropy", "lse"))


@pytest.mark.parametrize("backend,memory_budget", [("torch", None), ("torch", SMALL_BUDGET)]
                         + ([("triton", None)] if HAS_TRITON else []))
def test_fused_linear_kl_both_models_mask_the_same_entries(backend, memory_budget):
    x, labels, upstream, kept = _make(5)
    h, w, b = (leaf(x[k], torch.float32) for k in ("hidden", "weight", "bias"))
    hr, wr, br = (x[k].float() for k in ("ref_hidden", "ref_weight", "ref_bias"))
    out = pygpo.ops.policy_ref.fused_linear_kl(h, w, hr, wr, labels, bias=b, ref_bias=br, backend=backend,
                                               memory_budget=memory_budget, return_entropy=True)._asdict()
    grads = torch.autograd.grad(sum((out[k].double() * upstream[k]).sum() for k in ("logprobs", "kl")), (h, w, b))

    h64, w64, b64 = leaf(x["hidden"]), leaf(x["weight"][kept]), leaf(x["bias"][kept])
    local = torch.searchsorted(kept, labels)
    ref = naive_policy_ref(h64, w64, x["ref_hidden"], x["ref_weight"][kept], local, b64, x["ref_bias"][kept])
    ref["entropy"] = naive_token_stats(h64, w64, local, b64)["entropy"].detach()
    ref_grads = _reference_grads(sum((ref[k] * upstream[k]).sum() for k in ("logprobs", "kl")), h64, w64, b64, kept)
    _check(out, grads, ref, ref_grads, ("logprobs", "ref_logprobs", "kl", "entropy"))


@pytest.mark.parametrize("memory_budget", [None, SMALL_BUDGET])
def test_nan_inputs_still_give_nan(memory_budget):
    """The floors that make masked entries add 0 must not turn a nan logit into a masked one."""
    x, labels, _, _ = _make(6)
    h = x["hidden"].float()
    h[2, 0] = float("nan")
    out = pygpo.fused_linear_logprobs(h, x["weight"].float(), labels, bias=x["bias"].float(), return_entropy=True,
                                      backend="torch", memory_budget=memory_budget)
    assert torch.isnan(out.logprobs[2]) and torch.isnan(out.entropy[2])
    assert torch.isfinite(out.logprobs[3:]).all() and torch.isfinite(out.entropy[3:]).all()
