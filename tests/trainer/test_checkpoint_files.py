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


# -- the recipe a resume must match -------------------------------------------------------------------------

from pygpo import FusedPreferenceLoss  # noqa: E402
from pygpo.trainer.checkpoint import check_identity, loss_identity  # noqa: E402

MODEL = {"model": "demo", "config": {"hidden_size": 32}}


def _identity(loss="dpo", *, dtype="fp32", schedule=None, **options):
    keys = list(loss) if isinstance(loss, dict) else loss.split("+")
    fn = FusedPreferenceLoss(loss, **options)
    # what state.json holds: the identity written as JSON and read back
    return json.loads(json.dumps({**MODEL, "dtype": dtype, **loss_identity(keys, fn, schedule=schedule)}))


def test_loss_identity_records_resolved_hyper_parameters_weights_and_reducer():
    ident = _identity({"dpo": 1.0, "sft": 0.5}, **{"dpo.beta": 0.2}, reducer="mean")
    assert ident["loss_hparams"] == {"dpo": {"beta": 0.2}, "sft": {"alpha": 1.0}}  # defaults filled in
    assert ident["loss_weights"] == {"dpo": 1.0, "sft": 0.5}
    assert ident["reducer"] == {"name": "mean", "args": {}}
    # the default value given explicitly is the same recipe
    assert _identity("dpo", beta=0.1) == _identity("dpo")
    assert "loss_schedule" not in _identity() and _identity(schedule={})["loss_schedule"] == {}


@pytest.mark.parametrize(
    "now,needles",
    [
        (dict(dtype="bf16"), ["other dtype", "dtype: 'fp32' -> 'bf16'", "dtype of that run"]),
        (dict(beta=0.2), ["other loss hyper-parameters", "dpo.beta: 0.1 -> 0.2", "loss_args"]),
        (dict(loss={"dpo": 1.0, "sft": 0.5}), ["loss 'dpo', but this run has loss 'dpo+sft'"]),
        (dict(reducer="ld", reducer_args={"alpha": 0.5}), ["other reducer", "reducer.name: 'sum' -> 'ld'",
                                                            "reducer.args.alpha: 'absent' -> 0.5"]),
        (dict(schedule={"beta": {"start": 0.1, "end": 0.3, "kind": "linear"}}),
         ["other hyper-parameter schedules", "loss_schedule.beta: 'absent' -> "]),
    ],
)
def test_resume_refuses_another_recipe_naming_what_differs(tmp_path, now, needles):
    saved = _identity(schedule={})
    current = _identity(**{"schedule": {}, **now})
    with pytest.raises(ResumeError) as info:
        check_identity(tmp_path, saved, current)
    message = str(info.value)
    assert "\n" not in message
    assert "start a new run in another output_dir" in message or "resume with --loss dpo" in message
    for needle in needles:
        assert needle in message, (needle, message)
    check_identity(tmp_path, saved, _identity(schedule={}))  # the same recipe resumes


def test_loss_weights_of_a_combined_loss_are_part_of_the_recipe(tmp_path):
    with pytest.raises(ResumeError, match=r"other loss weights \(loss_weights.sft: 0.5 -> 0.25;"):
        check_identity(tmp_path, _identity({"dpo": 1.0, "sft": 0.5}), _identity({"dpo": 1.0, "sft": 0.25}))


def test_a_checkpoint_from_before_the_recipe_was_recorded_resumes_with_a_warning(tmp_path):
    old = {**MODEL, "loss": ["dpo"], "loss_state": {}}
    with pytest.warns(UserWarning, match=r"predates the recording of its dtype, loss weights, loss hyper-parameters, "
                                         r"reducer, so they are not checked"):
        check_identity(tmp_path, old, _identity(beta=0.3))
    with pytest.raises(ResumeError, match="was written for model"):  # what it does record is still checked
        check_identity(tmp_path, old, {**_identity(), "model": "/models/llama"})
