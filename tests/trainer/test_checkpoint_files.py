"""Checkpoint helpers on their own: resume targets, damaged state, tied weights written once each."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pygpo.trainer.checkpoint import ResumeError, _unshared, latest_checkpoint, load_checkpoint, resolve_resume


def test_resume_latest_needs_a_checkpoint(tmp_path):
    with pytest.raises(ResumeError, match=r"resume: latest, but .* holds no checkpoint-\* directory"):
        resolve_resume("latest", tmp_path)
    (tmp_path / "checkpoint-3").mkdir()  # a directory without state.json is not a checkpoint
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ResumeError, match=r"is not a checkpoint directory \(no state.json\)"):
        resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path)


def test_latest_is_the_highest_step_not_the_last_name(tmp_path):
    for step in (9, 10, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert resolve_resume("latest", tmp_path).name == "checkpoint-10"


def test_state_without_its_fields_is_named_damaged(tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(ResumeError, match=r"lacks step, data or identity; the checkpoint is damaged"):
        load_checkpoint(ckpt, model=None, reference=None, optimizer=None, scheduler=None, loss_fn=None,
                        identity={})


def test_tied_weights_are_written_once_each(tmp_path):
    emb = torch.randn(5, 3)
    state = {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.ones(3)}
    out = _unshared(state)
    assert out["embed.weight"].untyped_storage().data_ptr() != out["lm_head.weight"].untyped_storage().data_ptr()
    save_file(out, str(tmp_path / "m.safetensors"))  # safetensors refuses tensors sharing memory
    back = load_file(str(tmp_path / "m.safetensors"))
    for name, value in state.items():
        assert torch.equal(back[name], value), name
