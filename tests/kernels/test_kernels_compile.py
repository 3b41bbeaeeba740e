"""The kernels compile for real GPUs (sm_90 Hopper, sm_80 Ampere), checked without a GPU.

The interpreter runs kernels as numpy code and accepts programs the compiler would reject (loop-carried
type changes, unsupported dot shapes, ...). Triton can compile ahead of time for a named target with
its bundled ``ptxas``, so this test lowers the forward and both backward modes, all optional features
on, down to a cubin for each architecture. It runs in a subprocess because this process already
imported the kernels in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import sys
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from pygpo.kernels.linear_logprob_bwd import linear_logprob_bwd_kernel
    from pygpo.kernels.linear_logprob_fwd import linear_logprob_fwd_kernel

    arch = int(sys.argv[1])
    blocks = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)
    ints = {"N", "V", "D", "V_PER_SPLIT", "stride_stat", "stride_hn", "stride_hd", "stride_wv", "stride_wd"}

    def build(kernel, pointers, constexprs):
        fn = kernel.fn  # the jitted function under the autotuner
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = pointers[name]
            else:
                sig[name] = "i32" if name in ints else "fp32"
        out = compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                      options=dict(num_warps=8, num_stages=3))
        assert out.asm["cubin"], kernel

    common = dict(HAS_BIAS=True, HAS_SOFTCAP=True, UPCAST=False, INPUT_PRECISION="ieee", **blocks)
    build(linear_logprob_fwd_kernel,
          dict(H="*bf16", W="*bf16", B="*bf16", Y="*i64", PART="*fp32"),
          dict(WANT_ENTROPY=True, WANT_SUM_P2=True, WANT_MEAN=True, **common))
    for write in (False, True):
        pointers = {k: "*fp32" for k in ("LSE", "A", "B2", "GENT", "GLP", "C", "DH", "DW", "DB")}
        pointers.update(H="*bf16", W="*bf16", B="*bf16", Y="*i64", DRAW="*bf16" if write else "*fp32")
        build(linear_logprob_bwd_kernel, pointers,
              dict(HAS_L2=True, HAS_ENT=True, HAS_LP=True, HAS_MZ=True, NEED_DH=not write,
                   NEED_DW=not write, NEED_DB=True, WRITE_DRAW=write, **common))
    print("compiled for sm", arch)
    """
)


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # pragma: no cover - layout differs between triton versions
        return False


@pytest.mark.skipif(not _has_cuda_backend(), reason="triton without its CUDA backend")
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; 1 is its default
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"compiled for sm {arch}" in proc.stdout
