"""The prefix-attention kernels compile for real GPUs (sm_90, sm_80), checked without a GPU (see tests/gpu_compile.py)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from gpu_compile import assert_compiles, has_cuda_backend  # noqa: E402

SCRIPT = """
    from pygpo.kernels.prefix_attention_bwd import prefix_attention_dkdv_kernel, prefix_attention_dq_kernel
    from pygpo.kernels.prefix_attention_fwd import prefix_attention_fwd_kernel

    arch = int(sys.argv[1])
    layout = dict(BOUNDS="*i32", FULL_CNT="*i32", FULL_RUNS="*i32", PART_CNT="*i32", PART_RUNS="*i32")
    for even_d, block_d in ((True, 128), (False, 128)):
        const = dict(EVEN_D=even_d, UPCAST=False, PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d)
        for sinks in (False, True):
            build(prefix_attention_fwd_kernel, dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE2="*fp32",
                                                    SINKS="*fp32", **layout), dict(const, HAS_SINKS=sinks), arch)
        grads = dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", LSE2="*fp32", DELTA="*fp32", **layout)
        for atomic_dq in (False, True):
            build(prefix_attention_dkdv_kernel, dict(DK="*bf16", DV="*bf16", DQ_ACC="*fp32", **grads),
                  dict(const, ATOMIC_DQ=atomic_dq), arch)
        build(prefix_attention_dq_kernel, dict(DQ="*bf16", **grads), const, arch)
    print("compiled for sm", arch)
"""


@pytest.mark.skipif(not has_cuda_backend(), reason="triton without its CUDA backend")
@pytest.mark.parametrize("arch", [90, 80])
def test_prefix_kernels_compile_for_gpu(arch):
    assert_compiles(SCRIPT, arch)


PIPELINE_SCRIPT = """
    import json
    from pygpo.kernels.prefix_attention_bwd import prefix_attention_dkdv_kernel, prefix_attention_dq_kernel
    from pygpo.kernels.prefix_attention_fwd import prefix_attention_fwd_kernel
    from pygpo.kernels.prefix_blocks import default_config

    B, H, S, D = 2, 16, 4096, 128  # bf16 (B, S, H, D) memory seen as (B, H, S, D), as transformers gives it
    values = dict(S=S, D=D, HQ=H, HKV=H, GROUP=1, NQB=S // 64, NKB=S // 64)
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        values.update({f"stride_{t}b": S * H * D, f"stride_{t}h": D, f"stride_{t}s": H * D, f"stride_{t}d": 1})
    ptrs = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update(LSE2="*fp32", DELTA="*fp32", SINKS="*fp32", DQ_ACC="*fp32", BOUNDS="*i32", FULL_CNT="*i32", FULL_RUNS="*i32",
                PART_CNT="*i32", PART_RUNS="*i32")
    cfg = default_config(D, __import__("torch").bfloat16)
    base = dict(EVEN_D=True, UPCAST=False, PRECISION="ieee", BLOCK_D=D)
    kernels = {
        "fwd": (prefix_attention_fwd_kernel, cfg.fwd_m, cfg.fwd_n, cfg.fwd_warps, cfg.fwd_stages),
        "dq": (prefix_attention_dq_kernel, cfg.dq_m, cfg.dq_n, cfg.dq_warps, cfg.dq_stages),
        "dkdv": (prefix_attention_dkdv_kernel, cfg.kv_m, cfg.kv_n, cfg.kv_warps, cfg.kv_stages),
    }
    out = {}
    for name, (kernel, bm, bn, warps, stages) in kernels.items():
        flag = {"fwd": {"HAS_SINKS": False}, "dkdv": {"ATOMIC_DQ": False}}.get(name, {})
        const = dict(base, BLOCK_M=bm, BLOCK_N=bn, **flag)
        ir = ttgir(kernel, ptrs, values, const, int(sys.argv[1]), warps, stages)
        # waits of the loops nested two deep (the runs of full tiles), as (indent, num) pairs
        out[name] = [(len(line) - len(line.lstrip()), int(line.split("num = ")[1].split(" ")[0]))
                     for line in ir.splitlines() if "async_wait %" in line]  # ttg. (triton_gpu. before 3.3)
    print(json.dumps(out))
    print("compiled for sm", sys.argv[1])
"""


@pytest.mark.skipif(not has_cuda_backend(), reason="triton without its CUDA backend")
def test_tile_loops_are_software_pipelined_on_hopper():
    """The runs of full and partial tiles compile, for sm_90 with the default tiles, into loops that
    wait for a tile while later tiles' copies stay in flight (``async_wait`` with ``num`` >= 1).
    Walking an index list instead compiled into copy-then-wait-for-all (``num = 0``) for the full tiles
    of all three kernels: no overlap of memory and compute."""
    import json

    from gpu_compile import run_compile_script

    proc = run_compile_script(PIPELINE_SCRIPT, "90")
    assert proc.returncode == 0, proc.stderr[-4000:]
    waits = json.loads(proc.stdout.splitlines()[0])
    for name, pairs in waits.items():
        inner = [num for indent, num in pairs if indent >= 8]  # inside a run loop's inner loop
        assert len(inner) >= 2 and all(num >= 1 for num in inner), (name, pairs)  # full and partial runs


SHARED_MEMORY_SCRIPT = """
    import torch
    from pygpo.kernels.prefix_attention_bwd import prefix_attention_dkdv_kernel
    from pygpo.kernels.prefix_blocks import block_d, default_config

    arch, head_dim = int(sys.argv[1]), int(sys.argv[2])
    cfg = default_config(head_dim, torch.float32)
    ptrs = dict(Q="*fp32", K="*fp32", V="*fp32", DO="*fp32", LSE2="*fp32", DELTA="*fp32", DK="*fp32", DV="*fp32",
                DQ_ACC="*fp32", BOUNDS="*i32", FULL_CNT="*i32", FULL_RUNS="*i32", PART_CNT="*i32", PART_RUNS="*i32")
    const = dict(EVEN_D=True, UPCAST=False, PRECISION="ieee", ATOMIC_DQ=False, BLOCK_M=cfg.kv_m, BLOCK_N=cfg.kv_n,
                 BLOCK_D=block_d(head_dim))
    fn = prefix_attention_dkdv_kernel
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32" if n in INTS or n.startswith("stride") else "fp32")
           for n in fn.arg_names}
    out = compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                  options=dict(num_warps=cfg.kv_warps, num_stages=cfg.kv_stages))
    print(out.metadata.shared)
"""


@pytest.mark.skipif(not has_cuda_backend(), reason="triton without its CUDA backend")
@pytest.mark.parametrize("arch, head_dim, limit", [(80, 256, 166912)], ids=["a100-d256"])
def test_fp32_dkdv_fits_shared_memory(arch, head_dim, limit):
    """The fp32 ``dK/dV`` kernel with the default tiles fits the opt-in shared memory per block of the
    GPU (A100: 163 KiB); with 32 x 64 tiles it needed 205 KiB at head dim 256 (Gemma) and could not launch."""
    from gpu_compile import run_compile_script

    proc = run_compile_script(SHARED_MEMORY_SCRIPT, str(arch), str(head_dim))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert int(proc.stdout.split()[-1]) <= limit
