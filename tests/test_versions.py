"""The versions pygpo supports, enforced: triton older than 3.2 is refused by name (auto falls back to the
torch backend), FSDP2 on CPU below torch 2.7 is refused before torch fails inside, and the checkout's
``kernels/`` folder, imported as a top-level ``kernels`` package (transformers probes for one), loads
nothing."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

from pygpo.ops import dispatch
from pygpo.ops.dispatch import BackendUnavailableError, resolve_backend
from pygpo.versions import fsdp2_on_cpu_problem, major_minor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text,expected", [("2.6.0+cu124", (2, 6)), ("3.2", (3, 2)), ("1.16.0.dev0", (1, 16)),
                                           ("10.0.1", (10, 0))])
def test_major_minor(text, expected):
    assert major_minor(text) == expected


def test_major_minor_refuses_what_is_not_a_version():
    with pytest.raises(ValueError, match="not a version string: 'nightly'"):
        major_minor("nightly")


@pytest.fixture(autouse=True)
def _fresh_triton_version():
    """``triton_version`` is read once per process: each test reads the metadata it sets up."""
    dispatch.triton_version.cache_clear()
    yield
    dispatch.triton_version.cache_clear()


def _installed_triton(monkeypatch, version: str) -> None:
    """Make the metadata say triton ``version`` is installed (the spec check sees the real package)."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: version if dist == "triton" else real(dist))
    dispatch.triton_version.cache_clear()


def test_triton_older_than_3_2_is_refused_by_name(monkeypatch):
    pytest.importorskip("triton")
    _installed_triton(monkeypatch, "3.1.0")
    assert dispatch.triton_version() == (3, 1)
    assert not dispatch.triton_available()
    with pytest.raises(BackendUnavailableError, match=r"backend='triton' needs triton >= 3\.2, found triton 3\.1 "
                                                      r".*torch 2\.5 brings triton 3\.1.*; or use backend='torch'"):
        resolve_backend("triton", torch.device("cpu"))
    # auto never picks it: on CUDA tensors it falls back to the torch backend
    assert resolve_backend("auto", torch.device("cuda")) in ("torch", "cuda")


def test_triton_3_2_and_newer_are_accepted(monkeypatch):
    pytest.importorskip("triton")
    for version in ("3.2.0", "3.6.0", "4.0.0"):
        _installed_triton(monkeypatch, version)
        assert dispatch.triton_problem() is None, version


def test_fsdp2_on_cpu_below_torch_2_7_is_refused_before_torch_fails(monkeypatch):
    from pygpo.trainer.loop import shard_fsdp2

    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    assert fsdp2_on_cpu_problem() == "FSDP2 on CPU needs torch >= 2.7, this is torch 2.6.0+cpu"
    with pytest.raises(ValueError, match=r"fsdp: FSDP2 on CPU needs torch >= 2\.7.*without --fsdp \(DDP\)"):
        shard_fsdp2(torch.nn.Linear(2, 2), torch.device("cpu"))
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    assert fsdp2_on_cpu_problem() is None


def test_the_checkouts_kernels_folder_as_a_top_level_package_loads_nothing():
    """transformers probes for the Hugging Face ``kernels`` package by importing ``kernels``; with a source
    checkout first on ``sys.path`` it finds this folder, which must then import neither triton nor pygpo."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels; "
            "assert kernels.__all__ == [], kernels.__all__; "
            "assert 'triton' not in sys.modules and not any(m.startswith('pygpo') for m in sys.modules); print('ok')")
    done = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
