"""Lowering Triton kernels to GPU binaries without a GPU, for the compile tests of ``tests/kernels``.

The interpreter runs kernels as numpy code and accepts programs the compiler would reject (loop-carried
type changes, unsupported dot shapes, ...). Triton can compile ahead of time for a named target with
its bundled ``ptxas``; a test writes a short script that calls ``build`` (defined by ``PRELUDE``) for
each kernel and prints ``compiled for sm <arch>``, and runs it with :func:`run_compile_script`, in a
subprocess because the test process already imported the kernels in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

#: Put before every script. ``build(kernel, pointers, constexprs, arch)`` lowers one autotuned kernel to
#: a cubin for ``sm_<arch>``: ``pointers`` maps pointer arguments to types such as ``"*bf16"``,
#: ``constexprs`` gives the ``tl.constexpr`` values; the other arguments are ``i32`` (sizes and
#: ``stride*``) or ``fp32`` (softcap, inverse temperature, attention scales). ``ttgir(kernel, pointers,
#: values, constexprs, arch, num_warps, num_stages)`` returns the TTGIR of a launch specialised on
#: given int argument values, as the JIT would.
PRELUDE = textwrap.dedent(
    """
    import sys
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    INTS = {"N", "V", "D", "D_REF", "V_PER_SPLIT", "S", "HQ", "HKV", "GROUP", "NQB", "NKB"}

    def build(kernel, pointers, constexprs, arch):
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap an autotuner
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name] = pointers[name]
            else:
                sig[name] = "i32" if name in INTS or name.startswith("stride") else "fp32"
        out = compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                      options=dict(num_warps=8, num_stages=3))
        assert out.asm["cubin"], kernel

    def ttgir(kernel, pointers, values, constexprs, arch, num_warps, num_stages):
        # The TTGIR of `kernel` compiled as the JIT specialises a launch with these argument values:
        # ints equal to 1 become constants, multiples of 16 and all pointers are marked 16-divisible
        # (what lets the compiler vectorise and pipeline loads). `values` holds every int argument;
        # other arguments not in `pointers` or `constexprs` are fp32.
        fn = kernel.fn if hasattr(kernel, "configs") else kernel
        sig, consts, attrs = {}, dict(constexprs), {}
        for i, name in enumerate(fn.arg_names):
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in pointers:
                sig[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
            elif name not in values:
                sig[name] = "fp32"
            elif values[name] == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if values[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        try:  # triton 3.2 takes the attributes as a descriptor (argument indices per property)
            from triton.backends.compiler import AttrsDescriptor
        except ImportError:
            pass
        else:
            attrs = AttrsDescriptor.from_dict({"arg_properties": {"tt.divisibility": [i for (i,) in attrs]},
                                               "cls": "AttrsDescriptor"})
        out = compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                      options=dict(num_warps=num_warps, num_stages=num_stages))
        return out.asm["ttgir"]
    """
)


def has_cuda_backend() -> bool:
    """Whether this Triton ships its CUDA backend (what ``build`` compiles with)."""
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:  # pragma: no cover - layout differs between triton versions
        return False


def run_compile_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``PRELUDE`` + ``script`` (dedented) with ``args`` in a fresh interpreter that compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; 1 is its default
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def assert_compiles(script: str, arch: int = 90) -> None:
    """Run ``script`` (which builds its kernels for ``sys.argv[1]`` and prints ``compiled for sm <arch>``)."""
    proc = run_compile_script(script, str(arch))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"compiled for sm {arch}" in proc.stdout
