"""Build hook for the optional CUDA extension ``pygpo._C``.

Metadata lives in pyproject.toml. The extension is only built when ``PYGPO_BUILD_CUDA=1`` and a CUDA
toolkit is present; otherwise this is a pure-Python install.
"""

import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("PYGPO_BUILD_CUDA") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.path.isdir("csrc"):
        return [], {}
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cu", ".cpp"))]
    if not sources:
        return [], {}
    return [CUDAExtension("pygpo._C", sources)], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
