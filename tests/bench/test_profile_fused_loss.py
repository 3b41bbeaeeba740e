"""bench.profile_fused_loss at a tiny size on the CPU: one profiled step per chosen contender, written out."""

from __future__ import annotations

import glob

import pytest

from bench.profile_fused_loss import main


def test_quick_profile_writes_a_table_per_contender(tmp_path) -> None:
    assert main(["--quick", "--contenders", "pygpo,pygpo_eager", "--rows", "5", "--out", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "profile_fused_loss_cpu_*.txt"))
    text = open(path).read()
    for name in ("## pygpo:", "## pygpo_eager:"):
        assert name in text
    assert text.count("Self CPU time total") == 2
    assert "## naive" not in text  # naive comes along with the contenders but is not profiled unless asked


def test_unknown_contender_is_an_error(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--quick", "--contenders", "pygpo,nope", "--out", str(tmp_path)])
