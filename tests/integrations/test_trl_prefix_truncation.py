"""FusedDPOTrainer(prefix_sharing=True) with TRL's keep_end truncation: rows whose prompts were cut
differently are not prefix-shared, so training matches TRL's own DPOTrainer."""

from __future__ import annotations

import warnings

import pytest

trl = pytest.importorskip("trl")

from pygpo.integrations.trl import _prefix_batch  # noqa: E402

from test_trl_adapter import _compare  # noqa: E402


def test_keep_end_prompts_cut_differently_are_not_shared():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ex = [{"prompt_ids": [11, 12, 13, 14, 15, 16], "chosen_ids": [21, 22], "rejected_ids": [31, 32, 33, 34, 35]}]
    out = DataCollatorForPreference(pad_token_id=0, max_length=8, truncation_mode="keep_end")(ex)
    assert _prefix_batch(out["input_ids"], out["attention_mask"], out["completion_mask"], 0) is None
    same = DataCollatorForPreference(pad_token_id=0)(ex)
    batch = _prefix_batch(same["input_ids"], same["attention_mask"], same["completion_mask"], 0)
    assert batch is not None
    assert batch.input_ids[0].tolist()[:13] == [11, 12, 13, 14, 15, 16, 21, 22, 31, 32, 33, 34, 35]
    # both prompts cut away entirely: nothing to share
    gone = DataCollatorForPreference(pad_token_id=0, max_length=2, truncation_mode="keep_end")(ex)
    assert _prefix_batch(gone["input_ids"], gone["attention_mask"], gone["completion_mask"], 0) is None


def test_keep_end_prefix_sharing_trains_like_trl(tmp_path):
    # max_length=8: many examples (prompt 2-7 words + completion 1-6 words + eos) are truncated from the left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compare(tmp_path, fused_kwargs={"prefix_sharing": True}, max_length=8, truncation_mode="keep_end")
    msgs = [str(w.message) for w in caught if "prefix_sharing is skipped" in str(w.message)]
    assert len(msgs) == 1 and "keep_end" in msgs[0], msgs
