"""``bench/gpu_check.sh --cpu`` runs end to end and writes valid benchmark JSON.

The script's CPU mode is its rehearsal before it meets a GPU: the same steps (versions, wheels,
install, benchmarks, ``gpu`` tests) at tiny shapes under Triton's interpreter. Only the JSON's
structure and the finiteness of the times are checked; timing is never asserted.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_gpu_check_cpu_mode_writes_valid_json(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in --cpu mode
    proc = subprocess.run(["bash", SCRIPT, "--cpu", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, f"gpu_check.sh --cpu failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "all steps passed" in log

    paths = sorted(glob.glob(str(tmp_path / "logprobs_*.json")))
    assert len(paths) == 2, f"expected the ign50 and ign0 JSON files, found {paths}"
    assert glob.glob(str(tmp_path / "logprobs_*.png")), "no plot written"
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        for key in ("machine", "versions", "git", "settings", "method", "contenders", "ratios"):
            assert key in result, f"{os.path.basename(path)} lacks {key!r}"
        assert result["settings"]["device"] == "cpu"
        for name in ("naive", "pygpo_torch"):
            record = result["contenders"][name]
            assert record["status"] == "ok", record
            assert record["correctness"]["ok"] is True
            assert record["times_ms"] and all(math.isfinite(t) and t > 0 for t in record["times_ms"])
            assert math.isfinite(record["median_ms"])
        assert result["ratios"]["vs_naive"]["naive"]["time"] == pytest.approx(1.0)
        # every contender is either measured or carries the reason it was not
        for name, record in result["contenders"].items():
            assert record.get("median_ms") is not None or record.get("reason"), (name, record)

    with open(tmp_path / "loss_head_cpu.json") as f:
        heads = json.load(f)
    for name in ("torch_expression", "preference_loss", "pygpo_head_torch"):
        for b in ("8", "512"):
            assert math.isfinite(heads["results"][name][b]["median_us"]), (name, b)
    assert "CUDA" in heads["skipped"]["pygpo_head_cuda"]  # the compiled head runs on GPUs only

    (tune_path,) = glob.glob(str(tmp_path / "tune_prefix_attention_*.json"))
    with open(tune_path) as f:
        tune = json.load(f)
    assert all(layout["total_best_ms"] is not None for layout in tune["layouts"])

    (loss_path,) = glob.glob(str(tmp_path / "fused_loss_*.json"))
    with open(loss_path) as f:
        loss = json.load(f)
    for name in ("naive", "pygpo"):
        record = loss["contenders"][name]
        assert record["status"] == "ok" and record["correctness"]["ok"] is True, record
        assert math.isfinite(record["median_ms"])
