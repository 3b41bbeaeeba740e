import importlib.util
import os
import sys

import numpy
import pytest
import torch

# Without a GPU the Triton kernels run in triton's interpreter; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared float64 references (tests/reference.py) are importable from every test folder.
sys.path.insert(0, os.path.dirname(__file__))

#: Tests that run pygpo's Triton kernels without "triton" in their node id (the interpreter's bench).
TRITON_TESTS = ("tests/prefix/test_prefix_bench.py::test_attention_kernel_comparison_runs_in_the_interpreter",)
#: Tests that compile the kernels ahead of time: they do not use the interpreter.
COMPILE_TESTS = ("tests/kernels/test_kernels_compile.py", "tests/prefix/test_prefix_kernels_compile.py",
                 "tests/kernels/test_policy_ref_triton.py::test_kernels_compile_for_gpu")


def triton_skip_reasons() -> tuple[str | None, str | None]:
    """``(kernels, interpreter)``: why pygpo's Triton kernels cannot run here at all, and why they cannot
    run in triton's interpreter; ``None`` where they can (or where triton is absent, which the tests'
    own ``importorskip`` / ``skipif`` report)."""
    from pygpo.ops.dispatch import triton_problem, triton_version
    from pygpo.versions import major_minor

    if importlib.util.find_spec("triton") is None:
        return None, None
    problem = triton_problem()
    if problem:
        return f"the triton backend {problem}", None
    version = triton_version()
    numpy_version = major_minor(numpy.__version__)
    if os.environ.get("TRITON_INTERPRET") == "1" and version is not None and version < (3, 7) \
            and numpy_version >= (2, 4):
        return None, (f"triton {version[0]}.{version[1]}'s interpreter converts 1-element arrays to Python ints, "
                      f"which numpy {numpy.__version__} refuses: pip install 'numpy<2.4' (or triton >= 3.7)")
    return None, None


def pytest_collection_modifyitems(config, items):
    kernels, interpreter = triton_skip_reasons()
    for item in items:
        uses_triton = "triton" in item.nodeid.lower() or item.nodeid.startswith(TRITON_TESTS + COMPILE_TESTS)
        if kernels and uses_triton:
            item.add_marker(pytest.mark.skip(reason=kernels))
        elif interpreter and uses_triton and not item.nodeid.startswith(COMPILE_TESTS):
            item.add_marker(pytest.mark.skip(reason=interpreter))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
