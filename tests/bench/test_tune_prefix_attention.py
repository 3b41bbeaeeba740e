"""bench.tune_prefix_attention in the Triton interpreter: the sweep, its checks and its report."""

import json

import pytest

from bench import tune_prefix_attention as tune


@pytest.fixture
def small(monkeypatch):
    # a ragged S (not a multiple of any tile); one bad candidate (block_n not a power of two)
    candidates = {**tune.CPU_CANDIDATES, "dq": tune.CPU_CANDIDATES["dq"] + [(16, 24, 4, 1)]}
    monkeypatch.setattr(tune, "CPU_CANDIDATES", candidates)
    return dict(device="cpu", S=40, d=16, batch=1, heads=2, repeats=1)


def test_sweep_times_checks_and_picks(small, tmp_path):
    report = tune.run(**small, out=str(tmp_path))
    (path,) = tmp_path.glob("tune_prefix_attention_*.json")
    assert json.loads(path.read_text())["layouts"][0]["layout"] == report["layouts"][0]["layout"]
    assert report["sdpa_causal"]["fwd_bwd_ms"] > 0
    assert [r["layout"] for r in report["layouts"]] == ["causal", "shared"]
    for layout in report["layouts"]:
        for name, kernel in layout["kernels"].items():
            good = [c for c in kernel["candidates"] if c.get("ok")]
            assert good and all(c["rel_err"] < 1e-4 for c in good), name  # fp32 in the interpreter
            assert kernel["best"]["ms"] == min(c["ms"] for c in good)
        bad = layout["kernels"]["dq"]["candidates"][-1]
        assert bad["ok"] is False and "error" in bad and "ms" not in bad
        assert layout["total_best_ms"] <= layout["total_default_ms"]
        assert layout["total_best_vs_sdpa"] == pytest.approx(layout["total_best_ms"] / report["sdpa_causal"]["fwd_bwd_ms"])


def test_wrong_outputs_are_never_chosen(small, monkeypatch):
    monkeypatch.setattr(tune, "REL_TOLERANCE", -1.0)  # every candidate now counts as wrong
    report = tune.run(**small, out=None)
    for layout in report["layouts"]:
        assert all(k["best"] is None for k in layout["kernels"].values())
        assert layout["total_best_ms"] is None and layout["total_best_vs_sdpa"] is None


def test_spent_budget_times_only_the_defaults(small):
    report = tune.run(**small, out=None, budget_s=0.0)
    assert report["setup"]["budget_s"] == 0.0
    for layout in report["layouts"]:
        for kernel in layout["kernels"].values():
            first, *rest = kernel["candidates"]
            assert first["ok"] and "ms" in first  # the default is always timed
            assert rest and all(c["skipped"] == "time budget spent" and not c["ok"] and "ms" not in c for c in rest)
            assert kernel["best"] is first
        assert layout["total_default_ms"] == layout["total_best_ms"] is not None


def test_each_sweep_and_layout_gets_an_even_share_of_the_time_left(monkeypatch):
    """Cumulative deadlines: a share one sweep leaves unused carries to the next, and the last ends at the
    deadline itself."""
    monkeypatch.setattr(tune.time, "monotonic", lambda: 100.0)
    assert tune._slices(180.0, 4) == [120.0, 140.0, 160.0, 180.0]
    assert tune._slices(None, 3) == [None, None, None]
