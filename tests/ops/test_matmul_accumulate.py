"""pygpo.ops.matmul_accumulate: acc += a @ b into a float32 accumulator, against float64."""

import pytest
import torch

from pygpo.ops import matmul_accumulate
from pygpo.ops.matmul_accumulate import accumulate_mode, add_matmul_


def _chunks(dtype, device, m=37, k=48, n=29, chunks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(k, m, generator=g).to(device, dtype).t(),  # a transposed view, as dRaw^T
             torch.randn(k, n, generator=g).to(device, dtype)) for _ in range(chunks)]


def _float64_sum(pairs, start):
    out = start.double().cpu().clone()
    for a, b in pairs:
        out += a.double().cpu() @ b.double().cpu()
    return out


def test_same_dtype_is_addmm_in_place():
    pairs = _chunks(torch.float32, "cpu")
    acc = torch.randn(37, 29, dtype=torch.float32)
    expected = _float64_sum(pairs, acc)
    ptr = acc.data_ptr()
    for a, b in pairs:
        assert add_matmul_(acc, a, b) is acc
    assert acc.data_ptr() == ptr
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_on_cpu_round_each_product_once(dtype):
    """On the CPU (no out_dtype kernels) each product is rounded once to the inputs' dtype, then summed in fp32."""
    assert accumulate_mode(torch.device("cpu")) == 3
    pairs = _chunks(dtype, "cpu")
    acc = torch.zeros(37, 29)
    for a, b in pairs:
        add_matmul_(acc, a, b)
    rounded = sum((a.float() @ b.float()).to(dtype).double() for a, b in pairs)
    # the CPU's half matmul may round differently from fp32-then-round by one unit in the last place
    torch.testing.assert_close(acc.double(), rounded, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(acc.double(), _float64_sum(pairs, torch.zeros(37, 29)), rtol=5e-2, atol=5e-1)


def test_float64_accumulator_with_float32_inputs():
    pairs = _chunks(torch.float32, "cpu")
    acc = torch.zeros(37, 29, dtype=torch.float64)
    for a, b in pairs:
        add_matmul_(acc, a, b)
    torch.testing.assert_close(acc, _float64_sum(pairs, torch.zeros(37, 29)), rtol=1e-5, atol=1e-4)


def test_the_probe_trusts_only_an_overload_that_gives_the_exact_result(monkeypatch):
    """On the CPU both out_dtype overloads raise, so the probe settles on the rounded product; an
    in-place overload that drops the accumulator (beta = 0) is rejected, a correct fp32 product accepted."""
    cpu = torch.device("cpu")
    assert matmul_accumulate._probe(cpu) == 3
    real_mm = torch.mm

    def addmm_dropping_acc(acc, a, b, *, out_dtype=None, out=None):
        return out.copy_(real_mm(a.float(), b.float()))

    def mm_with_out_dtype(a, b, *, out_dtype=None):
        return real_mm(a.float(), b.float()) if out_dtype is torch.float32 else real_mm(a, b)

    monkeypatch.setattr(torch, "addmm", addmm_dropping_acc)
    monkeypatch.setattr(torch, "mm", mm_with_out_dtype)
    assert matmul_accumulate._probe(cpu) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("contiguous", [True, False])
def test_cuda_accumulates_in_fp32_without_a_temporary(contiguous):
    dev = torch.device("cuda")
    mode = accumulate_mode(dev)
    assert mode in (1, 2, 3)
    pairs = _chunks(torch.bfloat16, dev, m=512, k=1024, n=768, chunks=4)
    base = torch.zeros(768, 512, device=dev).t() if not contiguous else torch.zeros(512, 768, device=dev)
    acc = base
    for a, b in pairs:
        add_matmul_(acc, a, b)
    exact = _float64_sum(pairs, torch.zeros(512, 768))
    # fp32 accumulation (modes 1, 2) of bf16 operands: only the fp32 sums' rounding remains
    tol = dict(rtol=1e-4, atol=1e-3) if mode < 3 else dict(rtol=2e-2, atol=5e-1)
    torch.testing.assert_close(acc.double().cpu(), exact, **tol)
    if mode == 1 and contiguous:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        add_matmul_(acc, *pairs[0])
        torch.cuda.synchronize()
        # in place: no accumulator-sized temporary (cuBLAS workspace aside)
        assert torch.cuda.max_memory_allocated() - before < acc.numel() * 4 // 2
