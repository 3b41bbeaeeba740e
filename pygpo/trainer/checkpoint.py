"""Checkpoints that resume a run exactly, and never unpickle untrusted data.

A checkpoint directory ``<output_dir>/checkpoint-<step>/`` holds

* ``model.safetensors`` (and ``reference.safetensors`` when TR-DPO moves the reference): weights;
* ``trainer_state.pt``: optimizer, LR scheduler, the loss module's state (beta-DPO / BCO statistics) and
  the torch RNG states, read back with ``torch.load(weights_only=True)`` (tensors, numbers and
  containers only);
* ``state.json``: the step, the data iterator's position and the model identity a resume must match.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

MODEL_FILE, REF_FILE, STATE_FILE, TENSORS_FILE = "model.safetensors", "reference.safetensors", "state.json", "trainer_state.pt"


class ResumeError(ValueError):
    """The checkpoint cannot continue this run (missing, or written for another model)."""


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: Path, *, step: int, model: nn.Module, reference: Optional[nn.Module], optimizer, scheduler,
    loss_fn: nn.Module, data_state: dict[str, Any], identity: dict[str, Any], extra: Optional[dict[str, Any]] = None,
    model_state: Optional[dict[str, Any]] = None,
) -> Path:
    """Write the checkpoint of ``step`` into ``directory/checkpoint-<step>`` (atomically: a temp dir renamed)."""
    final = Path(directory) / f"checkpoint-{step}"
    tmp = Path(directory) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model_state is None:
        save_model(model, str(tmp / MODEL_FILE))
    else:  # a gathered (e.g. FSDP2) full state dict; tied weights are stored once per tensor
        save_file(_unshared(model_state), str(tmp / MODEL_FILE))
    if reference is not None:
        save_model(reference, str(tmp / REF_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "loss": loss_fn.state_dict(), "rng": _rng_state()}, tmp / TENSORS_FILE)
    state = {"step": step, "data": data_state, "identity": identity, **(extra or {})}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _unshared(state: dict[str, Any]) -> dict[str, Any]:
    """Contiguous tensors, each storage at most once under any name (safetensors refuses shared memory)."""
    out, seen = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = t.detach().clone().contiguous() if key in seen else t.detach().contiguous()
        seen[key] = name
    return out


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def resolve_resume(resume: str, output_dir: Path) -> Path:
    path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if path is None:
        raise ResumeError(f"resume: latest, but {str(output_dir)!r} holds no checkpoint-* directory")
    if not (path / STATE_FILE).is_file():
        raise ResumeError(f"resume: {str(path)!r} is not a checkpoint directory (no {STATE_FILE})")
    return path


def load_checkpoint(
    path: Path, *, model: nn.Module, reference: Optional[nn.Module], optimizer, scheduler, loss_fn: nn.Module,
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns ``state.json``'s content."""
    state = json.loads((path / STATE_FILE).read_text())
    if state["identity"] != identity:
        raise ResumeError(
            f"resume: {str(path)!r} was written for model {state['identity']['model']!r} with architecture "
            f"{state['identity']['config']}, but this run has {identity['model']!r} with {identity['config']}; "
            "resume with the configuration of that run"
        )
    if model is not None:
        load_model(model, str(path / MODEL_FILE))
    if reference is not None and (path / REF_FILE).is_file():
        load_model(reference, str(path / REF_FILE))
    tensors = torch.load(path / TENSORS_FILE, weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    loss_fn.load_state_dict(tensors["loss"])
    _set_rng_state(tensors["rng"])
    return state
