"""Build hook for the optional CUDA extension ``pygpo._C`` (metadata lives in pyproject.toml).

``pygpo._C`` is built with nvcc through ninja when a CUDA toolkit is found (``$CUDA_HOME/bin/nvcc``,
``$CUDA_PATH/bin/nvcc``, ``nvcc`` on ``PATH`` or ``/usr/local/cuda/bin/nvcc``); without one this is a
pure-Python install, and the build says so. Environment:

- ``PYGPO_BUILD_CUDA=1``: the extension is required (the build fails without a toolkit);
  ``PYGPO_BUILD_CUDA=0``: never build it (pure Python even where a toolkit exists).
- ``PYGPO_CUDA_ARCHS``: ``;``-separated SM versions (default ``80;86;89;90``); PTX of the highest one
  is embedded too, so newer GPUs JIT-compile it.
- ``PYGPO_BUILD_JOBS``: parallel compile jobs (default: the number of CPUs).

The extension uses pybind11 and the CUDA runtime only (linked statically), never torch's C++ ABI, so a
wheel works with any torch version. Objects and the ``build.ninja`` live in ``build/pygpo_C/`` of the
source tree, shared by every build from it (wheel, editable install): ninja recompiles a CUDA source
only when it or its compile command changed, so a checkout compiles its kernels once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
BUILD_DIR = os.path.join(HERE, "build", "pygpo_C")
DEFAULT_ARCHS = "80;86;89;90"


def _csrc(*suffixes: str) -> list[str]:
    """Files of csrc/ ending in ``suffixes``, relative to this folder, sorted."""
    return sorted(os.path.join("csrc", f) for f in os.listdir(CSRC) if f.endswith(suffixes))


def _say(msg: str) -> None:
    print(f"pygpo setup: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    """Path of nvcc, or ``None`` when no CUDA toolkit is found."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def cuda_requested() -> str | None:
    """nvcc's path if ``pygpo._C`` is to be built, else ``None`` (and a message saying why)."""
    flag = os.environ.get("PYGPO_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"PYGPO_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        _say("PYGPO_BUILD_CUDA=0: building pure-Python pygpo without pygpo._C (backend='cuda' unavailable)")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if flag == "1":
            raise SystemExit("PYGPO_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
        _say("no CUDA toolkit found (no nvcc): building pure-Python pygpo without pygpo._C "
             "(backend='cuda' unavailable; install a toolkit or set CUDA_HOME to build it)")
        return None
    return nvcc


def find_ninja() -> str:
    try:
        import ninja  # the PyPI package, a build requirement

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    found = shutil.which("ninja")
    if not found:
        raise SystemExit("building pygpo._C needs ninja: pip install ninja (or PYGPO_BUILD_CUDA=0)")
    return found


def _archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("PYGPO_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"PYGPO_CUDA_ARCHS must list SM versions like '80;90', got {os.environ.get('PYGPO_CUDA_ARCHS')!r}")
    return archs


def cuda_home_of(nvcc: str) -> str:
    """The toolkit root of ``nvcc`` (which may be a wrapper script): ask nvcc for its ``TOP``."""
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.isfile(os.path.join(guess, "include", "cuda_runtime.h")):
        return guess
    probe = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True)
    for line in (probe.stdout + probe.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line.split("=", 1)[1].strip())
    return guess


def _cuda_lib_dir(cuda_home: str) -> str:
    for sub in ("lib64", os.path.join("targets", "x86_64-linux", "lib"), "lib"):
        path = os.path.join(cuda_home, sub)
        if os.path.isfile(os.path.join(path, "libcudart_static.a")):
            return path
    raise SystemExit(f"libcudart_static.a not found under {cuda_home}")


def write_ninja(nvcc: str, out_name: str) -> str:
    """Write ``build/pygpo_C/build.ninja``; returns the path of the linked module it builds."""
    import pybind11

    cuda_home = cuda_home_of(nvcc)
    archs = _archs()
    gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
    gencode += f" -gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"
    cxx = os.environ.get("CXX", "c++")
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"cxx = {cxx}",
        f"nvcc_flags = -O3 -std=c++17 -Xcompiler=-fPIC,-fvisibility=hidden {gencode}",
        "cxx_flags = -O3 -std=c++17 -fPIC -fvisibility=hidden",
        # Only the bindings see pybind11 and Python: their paths differ between isolated build environments,
        # and in any other command they would make ninja recompile the kernels for every build.
        f"py_flags = -DPYGPO_CUDA_ARCHS='\"{';'.join(archs)}\"' -isystem {pybind11.get_include()}"
        f" -isystem {sysconfig.get_paths()['include']}",
        f"ldflags = -shared -L{_cuda_lib_dir(cuda_home)} -l:libcudart_static.a -lpthread -ldl -lrt",
        "rule nvcc",
        "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule cxx",
        "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule cxx_py",
        "  command = $cxx $cxx_flags $py_flags -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = c++ $in",
        "rule link",
        "  command = $cxx $in -o $out $ldflags",
        "  description = link $out",
    ]
    objects = []
    for src in _csrc(".cu", ".cpp"):
        src = os.path.basename(src)
        obj = src + ".o"
        objects.append(obj)
        rule = "nvcc" if src.endswith(".cu") else "cxx_py" if src == "bindings.cpp" else "cxx"
        lines.append(f"build {obj}: {rule} {os.path.join(CSRC, src)}")
    lines.append(f"build {out_name}: link {' '.join(objects)}")
    os.makedirs(BUILD_DIR, exist_ok=True)
    with open(os.path.join(BUILD_DIR, "build.ninja"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return os.path.join(BUILD_DIR, out_name)


class NinjaCudaBuild(build_ext):
    """Builds ``pygpo._C`` with ninja in the shared build folder, then copies it where setuptools wants it."""

    nvcc: str = ""

    def build_extension(self, ext: Extension) -> None:
        out_name = "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
        module = write_ninja(self.nvcc, out_name)
        jobs = os.environ.get("PYGPO_BUILD_JOBS") or str(max(os.cpu_count() or 1, 1))
        _say(f"building pygpo._C with {self.nvcc} for sm_{', sm_'.join(_archs())} in {BUILD_DIR}")
        if subprocess.run([find_ninja(), "-C", BUILD_DIR, "-j", jobs]).returncode != 0:
            raise SystemExit("ninja failed to build pygpo._C (output above); PYGPO_BUILD_CUDA=0 installs without it")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(module, target)


def _extensions() -> tuple[list[Extension], dict[str, type]]:
    nvcc = cuda_requested()
    if nvcc is None:
        return [], {}
    NinjaCudaBuild.nvcc = nvcc
    # sources are listed for sdists and setuptools' bookkeeping; NinjaCudaBuild compiles them
    ext = Extension("pygpo._C", _csrc(".cu", ".cpp"), depends=_csrc(".cuh", ".h"))
    return [ext], {"build_ext": NinjaCudaBuild}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
