"""FusedDPOTrainer against TRL's DPOTrainer where ld_alpha meets a term on raw token log-probs.

TRL applies the LD weighting to the preference log-ratios only: its SFT term and its WPO weights read
the raw per-token log-probs, and IPO divides the LD-weighted log-ratio by the full completion length.
Same losses, metrics and parameters after real training steps (tiny random Llama, SGD).
"""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")

from test_trl_adapter import _compare  # noqa: E402


@pytest.mark.parametrize("overrides", [
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5},
    {"use_weighting": True, "ld_alpha": 0.5},
    {"loss_type": ["ipo"], "ld_alpha": 0.3},
], ids=["ld+sft", "ld+wpo", "ld+ipo"])
def test_ld_alpha_with_raw_token_terms_trains_like_trl(tmp_path, overrides):
    _compare(tmp_path, **overrides)
