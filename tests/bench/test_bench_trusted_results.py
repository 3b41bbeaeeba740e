"""A contender that fails its correctness check is timed and shown, but enters no ratio and no target."""

from bench import loss_report, report


def _record(ms, mem, ok=True, status="ok"):
    return {"status": status, "median_ms": ms, "peak_mem_bytes": mem, "median_cpu_ms": ms,
            "correctness": {"ok": ok}}


def test_logprobs_ratios_and_targets_skip_wrong_contenders():
    contenders = {"naive": _record(100.0, 1000), "pygpo_torch": _record(1.0, 10, ok=False),
                  "torch_lce": _record(90.0, 1000), "torch_lce_chunked": _record(200.0, 100),
                  "trl_chunked": _record(150.0, 2000)}
    result = {"contenders": contenders,
              "settings": {"device": "cpu", "n": 4096, "d": 1024, "v": 32000, "ignore_frac": 0.5}}
    assert "pygpo_torch" not in report.ratios(contenders)["vs_naive"]
    targets = report.targets(result)
    assert targets["time_vs_naive"]["met"] is None and targets["time_vs_naive"]["value"] is None
    contenders["pygpo_torch"] = _record(50.0, 500)
    assert report.targets(result)["time_vs_naive"]["met"] is True


def test_fused_loss_ratios_and_targets_skip_wrong_contenders():
    size = dict(loss_report.SIZES["cpu"])
    records = {"naive": _record(100.0, 1000), loss_report.OURS: _record(1.0, 10),
               "liger": _record(80.0, 900, ok=False), "trl": _record(90.0, 800)}
    result = {"contenders": records, "settings": {**size, "device": "cpu"}}
    assert "liger" not in loss_report.ratios_vs(records)
    targets = loss_report.targets(result)
    assert targets["time_vs_liger"]["met"] is None  # no trustworthy Liger figure to beat
    assert targets["time_vs_trl"]["met"] is True


def test_logprobs_option_targets_name_each_setting_and_its_lines():
    contenders = {"naive": _record(50.0, 1000), "pygpo_triton": _record(32.0, 200),
                  "pygpo_cuda_kept": _record(20.0, 300), "pygpo_cuda": _record(30.0, 250, ok=False),
                  "trl_chunked": _record(29.0, 400)}
    result = {"contenders": contenders,
              "settings": {"device": "cuda", "n": 8192, "d": 4096, "v": 128256, "ignore_frac": 0.5}}
    result["targets"] = report.targets(result)
    result["option_targets"] = report.option_targets(result)
    assert result["targets"]["time_vs_trl_chunked"]["met"] is False  # the default, pygpo_triton
    assert list(result["option_targets"]) == ["pygpo_cuda_kept"]  # a wrong setting is judged on nothing
    kept = result["option_targets"]["pygpo_cuda_kept"]
    assert kept["time_vs_trl_chunked"]["met"] is True and kept["time_ms"]["contender"] == "pygpo_cuda_kept"
    lines = report.target_lines(result)
    assert "target time_vs_trl_chunked: pygpo_triton" in lines[1]
    assert any(line.startswith("option target time_vs_trl_chunked: pygpo_cuda_kept 0.689") for line in lines)
