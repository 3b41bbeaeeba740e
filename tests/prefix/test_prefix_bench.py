"""bench/prefix_sharing.py runs end to end on a tiny CPU setup and reports consistent numbers."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench import prefix_sharing as bench  # noqa: E402
from prefix_reference import single_torch_thread  # noqa: F401, E402


def test_sampled_profiles_have_the_stated_prompt_ratio():
    for profile, target in (("ultrafeedback", 0.4), ("capybara", 1.6)):
        prompts, responses = bench.sample_examples(profile, 400, 100, seed=0)
        p = sum(map(len, prompts))
        r = sum(len(y) for ys in responses for y in ys)
        assert abs(p / r - target) < 0.1 * target
        assert len({len(x) for x in prompts}) > 50  # sampled, not fixed


def test_tiny_cpu_run_writes_json(tmp_path):
    setup = bench.Setup("cpu", torch.float32, hidden=32, layers=1, heads=2, kv_heads=1, vocab=64, examples=2,
                        max_tokens=128, scale=0.05, repeats=1, batches=1, backend="torch")
    report = bench.run(setup, str(tmp_path), kernel=False)
    files = list(tmp_path.glob("prefix_sharing_cpu_*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert [p["profile"] for p in saved["profiles"]] == ["ultrafeedback", "capybara"]
    for p in report["profiles"]:
        assert p["ceiling"] == pytest.approx(p["tokens_unshared"] / p["tokens_shared"])
        assert p["fraction_of_ceiling"] == pytest.approx(p["speedup"] / p["ceiling"])
        assert p["shared_cpu_ms"] > 0 and p["padded_cpu_ms"] > 0
        assert p["shared_pack_ms"] > 0 and p["unshared_pack_ms"] > 0  # timed apart from the step


def test_attention_kernel_comparison_runs_in_the_interpreter():
    """The GPU kernel comparison at a tiny size on CPU: every layout (the windowed one with sinks too)
    runs the Triton kernels and agrees with the torch backend."""
    from bench.prefix_sharing import bench_attention_kernel

    rows = bench_attention_kernel(S=64, d=16, batch=1, heads=2, kv_heads=2, dtype=torch.float32, repeats=1,
                                  device="cpu")
    assert [r["layout"] for r in rows] == ["causal", "shared", "causal_window_sinks"]
    assert rows[2]["sliding_window"] == 2 and rows[2]["sinks"] is True
    assert all(r["max_abs_err_vs_torch_fp32"] < 1e-5 and r["prefix_ms"] > 0 for r in rows)
