"""The kernels compile for real GPUs (sm_90 Hopper, sm_80 Ampere), checked without a GPU.

The interpreter accepts programs the compiler would reject, so this test lowers the forward and both
backward modes, all optional features on, down to a cubin for each architecture (how, and why in a
subprocess: ``tests/gpu_compile.py``).
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from gpu_compile import assert_compiles, has_cuda_backend  # noqa: E402

SCRIPT = """
    from pygpo.kernels.linear_logprob_bwd import linear_logprob_bwd_kernel
    from pygpo.kernels.linear_logprob_fwd import linear_logprob_fwd_kernel

    arch = int(sys.argv[1])
    blocks = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)
    common = dict(HAS_BIAS=True, HAS_SOFTCAP=True, UPCAST=False, INPUT_PRECISION="ieee", **blocks)
    build(linear_logprob_fwd_kernel,
          dict(H="*bf16", W="*bf16", B="*bf16", Y="*i64", PART="*fp32"),
          dict(WANT_ENTROPY=True, WANT_SUM_P2=True, WANT_MEAN=True, **common), arch)
    for write in (False, True):
        pointers = {k: "*fp32" for k in ("LSE", "A", "B2", "GENT", "GLP", "C", "DH", "DW", "DB")}
        pointers.update(H="*bf16", W="*bf16", B="*bf16", Y="*i64", DRAW="*bf16" if write else "*fp32")
        build(linear_logprob_bwd_kernel, pointers,
              dict(HAS_L2=True, HAS_ENT=True, HAS_LP=True, HAS_MZ=True, NEED_DH=not write,
                   NEED_DW=not write, NEED_DB=True, WRITE_DRAW=write, **common), arch)
    print("compiled for sm", arch)
"""


@pytest.mark.skipif(not has_cuda_backend(), reason="triton without its CUDA backend")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu(arch):
    assert_compiles(SCRIPT, arch)
