"""The DPO-loss benchmark (``bench.fused_loss``) at tiny sizes: contenders, the CLI's JSON, the targets.

Run with ``python -m pytest tests/bench -q`` (the main test command collects only ``tests/``; CI runs the
benchmark's tiny CPU step through ``bench/gpu_check.sh --cpu``). The pytest-benchmark entries check each
contender against a float64 DPO loss written out here before timing it; timings are never asserted.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench.fused_loss import (CONTENDER_NAMES, LossInputs, LossProblem, loss_contenders, main, make_loss_inputs,
                              targets)
from bench.measure import fwd_bwd

PROBLEM = LossProblem(pairs=2, seq=24, prompt=10, d=32, v=300)


def dpo_float64(inputs: LossInputs, problem: LossProblem) -> torch.Tensor:
    """Per-row loops in float64: sum over completion tokens of log softmax(h W^T)[label], then
    ``-mean log sigmoid(beta * ((c - c_ref) - (r - r_ref)))`` over the pairs (Rafailov et al., 2023, eq. 7)."""
    s = inputs.step
    h, w = s.hidden.double(), s.weight.double()
    rh, rw = inputs.ref_hidden.double(), inputs.ref_weight.double()

    def row_logp(hid: torch.Tensor, wt: torch.Tensor, row: int) -> torch.Tensor:
        total = hid.new_zeros(())
        for t in range(problem.seq):
            label = int(s.labels[row, t])
            if label != problem.ignore_index:
                total = total + torch.log_softmax(hid[row, t] @ wt.T, dim=-1)[label]
        return total

    b = problem.pairs
    terms = []
    for i in range(b):
        margin = (row_logp(h, w, i) - row_logp(rh, rw, i)) - (row_logp(h, w, b + i) - row_logp(rh, rw, b + i))
        terms.append(-F.logsigmoid(problem.beta * margin))
    return torch.stack(terms).mean()


@pytest.fixture(scope="module")
def inputs() -> LossInputs:
    return make_loss_inputs(PROBLEM, "cpu")


@pytest.fixture(scope="module")
def reference(inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = inputs.step
    h = s.hidden.detach().double().requires_grad_(True)
    w = s.weight.detach().double().requires_grad_(True)
    loss = dpo_float64(LossInputs(s._replace(hidden=h, weight=w), inputs.ref_hidden, inputs.ref_weight), PROBLEM)
    g_h, g_w = torch.autograd.grad(loss, (h, w))
    return loss.detach(), g_h, g_w


def test_inputs_layout(inputs: LossInputs) -> None:
    s = inputs.step
    assert s.hidden.shape == (4, 24, 32) and s.weight.shape == (300, 32) and s.labels.shape == (4, 24)
    assert (s.labels[:, :10] == -100).all() and (s.labels[:, 10:] >= 0).all()
    assert s.hidden.requires_grad and s.weight.requires_grad and not inputs.ref_hidden.requires_grad
    again = make_loss_inputs(PROBLEM, "cpu")  # a worker process rebuilds the same tensors
    assert torch.equal(again.step.hidden, s.hidden) and torch.equal(again.ref_weight, inputs.ref_weight)


@pytest.mark.parametrize("name", CONTENDER_NAMES)
def test_fused_loss_fwd_bwd(benchmark, name: str, inputs: LossInputs, reference) -> None:
    ready, skipped = loss_contenders(PROBLEM, inputs[1:], only=[name], liger_compiled=False)
    if name in skipped:
        pytest.skip(skipped[name])
    contender = next(c for c in ready if c.name == name)
    loss, g_h, g_w = fwd_bwd(contender.fn, inputs.step, PROBLEM.ignore_index)
    assert abs(float(loss) - float(reference[0])) < 1e-5, name
    for got, want in ((g_h, reference[1]), (g_w, reference[2])):
        assert float((got.double() - want).norm() / want.norm()) < 1e-4, name

    benchmark.group = f"fused DPO loss fwd+bwd cpu {PROBLEM.tag()}"
    benchmark.extra_info.update(notes=contender.notes)
    benchmark.pedantic(lambda: fwd_bwd(contender.fn, inputs.step, PROBLEM.ignore_index), rounds=3, warmup_rounds=1,
                       iterations=1)


def test_cli_quick_writes_json_and_plot(tmp_path) -> None:
    rc = main(["--quick", "--liger-eager", "--pairs", "2", "--seq", "16", "--prompt", "6", "--d", "16", "--v", "200",
               "--repeats", "1", "--warmup", "0", "--skip-memory", "--check-at-size", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = glob.glob(str(tmp_path / "fused_loss_*_b2-t16-p6-d16-v200-float32.json"))
    assert glob.glob(str(tmp_path / "fused_loss_*.png"))
    with open(path) as f:
        result = json.load(f)
    for key in ("machine", "versions", "git", "settings", "method", "contenders", "ratios", "targets", "load_average"):
        assert key in result, key
    assert result["targets"] == {}  # set for the issue's sizes only
    assert result["ratios"]["vs_pygpo"]["pygpo"]["time"] == pytest.approx(1.0)
    for name, record in result["contenders"].items():
        if record["status"] == "unavailable":
            assert record["reason"]
            continue
        assert record["status"] == "ok", (name, record)
        assert record["correctness"]["ok"] is True, (name, record["correctness"])
        assert record["correctness_at_size"]["ok"] is True, (name, record["correctness_at_size"])
        assert all(math.isfinite(t) and t > 0 for t in record["times_ms"])


def test_a_contender_wrong_only_at_the_timed_size_is_caught(monkeypatch) -> None:
    """The small float64 check passes, the timed size differs: the at-size check marks it incorrect."""
    import bench.fused_loss as fused_loss
    from bench.loss_problem import CHECK

    real = fused_loss.loss_contenders

    def contenders(problem, *args, **kwargs):
        found, skipped = real(problem, *args, **kwargs)
        if problem.seq == CHECK["seq"]:
            return found, skipped
        wrong = [c for c in found if c.name == "pygpo"]
        fixed = [dataclasses.replace(c, fn=lambda *a, fn=c.fn: fn(*a) * 1.5) for c in wrong]
        return [c for c in found if c.name != "pygpo"] + fixed, skipped

    monkeypatch.setattr(fused_loss, "loss_contenders", contenders)
    problem = LossProblem(pairs=2, seq=16, prompt=6, d=16, v=200, dtype="float32")
    result = fused_loss.run(problem, torch.device("cpu"), repeats=1, warmup=0, only=["naive", "pygpo"], memory=False,
                            check_at_size=True)
    record = result["contenders"]["pygpo"]
    assert record["correctness"]["ok"] is True  # the small check could not see it
    assert record["status"] == "incorrect" and "timed size" in record["reason"]
    assert "pygpo" not in result["ratios"]["vs_pygpo"]


def _result(device: str, times: dict[str, float], mems: dict[str, int], **sizes) -> dict:
    settings = {**dict(pairs=8, seq=1024, prompt=512, d=1024, v=32000, dtype="float32"), **sizes, "device": device}
    return {"settings": settings,
            "contenders": {n: {"status": "ok", "correctness": {"ok": True}, "median_ms": t, "peak_mem_bytes": mems[n]}
                           for n, t in times.items()}}


def test_targets_cpu_at_the_issue_sizes_only() -> None:
    times = {"pygpo": 10.0, "naive": 20.0, "liger": 15.0, "trl": 8.0}
    mems = {"pygpo": 100, "naive": 400, "liger": 120, "trl": 90}
    out = targets(_result("cpu", times, mems))
    assert out["time_vs_naive"] == {"value": 0.5, "limit": 1.0, "met": True}
    assert out["time_vs_liger"]["value"] == pytest.approx(10 / 15) and out["time_vs_liger"]["met"] is True
    assert out["time_vs_trl"]["value"] == pytest.approx(1.25) and out["time_vs_trl"]["met"] is False
    assert out["memory_vs_lowest"]["value"] == pytest.approx(100 / 90) and out["memory_vs_lowest"]["met"] is False
    assert targets(_result("cpu", times, mems, v=1000)) == {}


def test_targets_gpu() -> None:
    times = {"pygpo": 40.0, "naive": 400.0, "liger": 90.0, "trl": 41.0}
    mems = {"pygpo": 100, "naive": 400, "liger": 99, "trl": 300}
    gpu = dict(seq=2048, prompt=1024, d=4096, v=128256, dtype="bfloat16")
    out = targets(_result("cuda", times, mems, **gpu))
    assert out["time_vs_liger"]["value"] == pytest.approx(40 / 90) and out["time_vs_liger"]["met"] is True
    assert out["time_vs_trl"]["met"] is True
    assert out["memory_vs_liger"]["met"] is False and out["memory_vs_trl"]["met"] is True
    assert targets(_result("cuda", times, mems, **{**gpu, "dtype": "float32"})) == {}


def test_bad_problem_is_named() -> None:
    with pytest.raises(ValueError, match="prompt"):
        LossProblem(seq=8, prompt=8)
    with pytest.raises(ValueError, match="dtype"):
        LossProblem(dtype="int8")


def test_cli_runs_only_the_chosen_contenders(tmp_path) -> None:
    """--contenders picks the timed set too (naive always runs), not only the correctness step's."""
    rc = main(["--quick", "--contenders", "pygpo,pygpo_eager", "--pairs", "2", "--seq", "16", "--prompt", "6", "--d", "16",
               "--v", "200", "--repeats", "1", "--warmup", "0", "--skip-memory", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = glob.glob(str(tmp_path / "fused_loss_*.json"))
    with open(path) as f:
        result = json.load(f)
    assert set(result["contenders"]) == {"naive", "pygpo", "pygpo_eager"}
    assert all(r["status"] == "ok" for r in result["contenders"].values())


def test_option_targets_judge_each_chosen_setting() -> None:
    """pygpo_eager (a setting a user can choose) gets the same checks as the default, reported apart."""
    from bench.loss_report import option_targets

    times = {"pygpo": 100.0, "pygpo_eager": 40.0, "naive": 400.0, "liger": 90.0, "trl": 41.0}
    mems = {"pygpo": 100, "pygpo_eager": 98, "naive": 400, "liger": 99, "trl": 300}
    gpu = dict(seq=2048, prompt=1024, d=4096, v=128256, dtype="bfloat16")
    result = _result("cuda", times, mems, **gpu)
    assert targets(result)["time_vs_liger"]["met"] is False
    eager = option_targets(result)["pygpo_eager"]
    assert eager["time_vs_liger"]["value"] == pytest.approx(40 / 90) and eager["time_vs_liger"]["met"] is True
    assert eager["memory_vs_liger"]["met"] is True
    result["contenders"]["pygpo_eager"]["correctness"]["ok"] = False  # a wrong setting is judged on nothing
    assert option_targets(result) == {}
