"""Row compaction where torch has no ``nonzero_static`` kernel for the device (CUDA before torch 2.6)."""

from __future__ import annotations

import torch

import pygpo
from pygpo.ops import token_rows


def test_nonzero_rows_falls_back_to_nonzero_once(monkeypatch):
    mask = torch.tensor([True, False, False, True, True, False])
    assert token_rows.nonzero_rows(mask, 3).tolist() == [0, 3, 4]

    calls = []

    def missing(*args, **kwargs):
        calls.append(1)
        raise NotImplementedError("Could not run 'aten::nonzero_static' with arguments from the 'CPU' backend")

    monkeypatch.setattr(torch, "nonzero_static", missing)
    monkeypatch.setattr(token_rows, "_NO_NONZERO_STATIC", set())
    assert token_rows.nonzero_rows(mask, 3).tolist() == [0, 3, 4]
    assert token_rows.nonzero_rows(~mask, 3).tolist() == [1, 2, 5]
    assert calls == [1] and token_rows._NO_NONZERO_STATIC == {"cpu"}  # tried once per device type


def test_fused_logprobs_exact_without_nonzero_static(monkeypatch):
    def missing(*args, **kwargs):
        raise NotImplementedError("no kernel")

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.tensor([3, -100, 0, 10, -100, -100, 7])
    expected = pygpo.fused_linear_logprobs(h, w, y, backend="torch")
    monkeypatch.setattr(torch, "nonzero_static", missing)
    monkeypatch.setattr(token_rows, "_NO_NONZERO_STATIC", set())
    got = pygpo.fused_linear_logprobs(h, w, y, backend="torch")
    logp = torch.log_softmax(h @ w.T, -1)
    valid = y != -100
    reference = torch.where(valid, logp.gather(1, y.clamp(min=0)[:, None])[:, 0], torch.zeros(()))
    torch.testing.assert_close(got, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert token_rows._NO_NONZERO_STATIC == {"cpu"}
