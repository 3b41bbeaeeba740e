"""Packaging metadata in pyproject.toml matches the source tree.

An editable install imports straight from the checkout, so a package missing from
``[tool.setuptools] packages`` (or a data file missing from ``package-data``) passes every other
test and only breaks the built wheel. These checks read pyproject.toml and walk the tree instead.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
# Build outputs that live in the source tree but are not sources: bytecode and the compiled pygpo._C.
BUILD_OUTPUTS = ("*.pyc", "*.so")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def _package_dirs(setuptools_cfg: dict) -> dict[str, Path]:
    """Each listed package's folder, resolved through ``package-dir`` (longest matching prefix)."""
    mapping = setuptools_cfg.get("package-dir", {})
    out = {}
    for pkg in setuptools_cfg["packages"]:
        parts = pkg.split(".")
        for cut in range(len(parts), -1, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping or cut == 0:
                base = Path(mapping.get(prefix, ""))
                out[pkg] = (ROOT / base).joinpath(*parts[cut:])
                break
    return out


def _source_files(folder: Path) -> list[str]:
    return [f for f in os.listdir(folder) if (folder / f).is_file()
            and not any(fnmatch.fnmatch(f, pat) for pat in BUILD_OUTPUTS)]


def test_license_is_an_spdx_expression_with_its_file(pyproject):
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # setuptools>=77 rejects License :: classifiers next to an SPDX expression, and is the first
    # release that reads project.license-files.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    assert any(req.replace(" ", "").startswith("setuptools>=77") for req in pyproject["build-system"]["requires"])


def test_every_source_folder_is_a_listed_package(pyproject):
    listed = _package_dirs(pyproject["tool"]["setuptools"])
    for pkg, folder in listed.items():
        assert folder.is_dir(), f"package {pkg!r} maps to {folder}, which does not exist"
    roots = set(listed.values())
    needed = set()
    for root in roots:  # every folder below a listed one, pygpo/ and kernels/ included
        for dirpath, dirnames, _ in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if _source_files(Path(dirpath)):
                needed.add(Path(dirpath))
    missing = sorted(str(p.relative_to(ROOT)) for p in needed - roots)
    assert not missing, f"folders with files but not in [tool.setuptools] packages: {missing}"


def test_every_data_file_is_package_data(pyproject):
    cfg = pyproject["tool"]["setuptools"]
    patterns = cfg.get("package-data", {})
    unshipped = []
    for pkg, folder in _package_dirs(cfg).items():
        globs = patterns.get(pkg, []) + patterns.get("*", [])
        for name in _source_files(folder):
            if not name.endswith(".py") and not any(fnmatch.fnmatch(name, g) for g in globs):
                unshipped.append(f"{pkg}: {name}")
    assert not unshipped, f"data files not matched by [tool.setuptools.package-data]: {unshipped}"
