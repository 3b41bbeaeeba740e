"""The prefix-attention kernels compile for real GPUs (sm_90, sm_80), checked without a GPU (see tests/gpu_compile.py)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from gpu_compile import assert_compiles, has_cuda_backend  # noqa: E402

SCRIPT = """
    from pygpo.kernels.prefix_attention_bwd import prefix_attention_dkdv_kernel, prefix_attention_dq_kernel
    from pygpo.kernels.prefix_attention_fwd import prefix_attention_fwd_kernel

    arch = int(sys.argv[1])
    layout = dict(BOUNDS="*i32", FULL_CNT="*i32", FULL_IDX="*i32", PART_CNT="*i32", PART_IDX="*i32")
    for even_d, block_d in ((True, 128), (False, 128)):
        const = dict(EVEN_D=even_d, UPCAST=False, PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d)
        build(prefix_attention_fwd_kernel, dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE2="*fp32", **layout),
              const, arch)
        grads = dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", LSE2="*fp32", DELTA="*fp32", **layout)
        build(prefix_attention_dkdv_kernel, dict(DK="*bf16", DV="*bf16", **grads), const, arch)
        build(prefix_attention_dq_kernel, dict(DQ="*bf16", **grads), const, arch)
    print("compiled for sm", arch)
"""


@pytest.mark.skipif(not has_cuda_backend(), reason="triton without its CUDA backend")
@pytest.mark.parametrize("arch", [90, 80])
def test_prefix_kernels_compile_for_gpu(arch):
    assert_compiles(SCRIPT, arch)
