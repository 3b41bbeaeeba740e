"""Checkpoints that resume a run exactly, and never unpickle untrusted data.

A checkpoint directory ``<output_dir>/checkpoint-<step>/`` holds

* ``model.safetensors`` (and ``reference.safetensors`` when TR-DPO moves the reference): weights;
* ``trainer_state.pt``: optimizer, LR scheduler, the loss module's state (beta-DPO / BCO statistics) and
  the torch RNG states, read back with ``torch.load(weights_only=True)`` (tensors, numbers and
  containers only);
* ``state.json``: the step, the data iterator's position and the identity a resume must match: the
  model source and architecture, the loss (its registry components) and the loss state's layout.

A checkpoint file that cannot be read back is a :class:`ResumeError` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

MODEL_FILE, REF_FILE, STATE_FILE, TENSORS_FILE = "model.safetensors", "reference.safetensors", "state.json", "trainer_state.pt"


class ResumeError(ValueError):
    """The checkpoint cannot continue this run (missing, or written for another model)."""


def loss_identity(components: list[str], loss_fn: nn.Module) -> dict[str, Any]:
    """The loss part of a checkpoint's identity: registry keys and ``{state name: shape}`` of its state."""
    return {"loss": list(components), "loss_state": {k: list(v.shape) for k, v in loss_fn.state_dict().items()}}


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


def check_identity(path: Path, saved: dict[str, Any], identity: dict[str, Any]) -> None:
    """Raise :class:`ResumeError` naming the option where ``saved`` (from ``state.json``) and this run's
    ``identity`` differ; keys a checkpoint does not record (older checkpoints) are not checked."""
    where = f"resume: {str(path)!r}"
    if saved.get("model") != identity.get("model") or saved.get("config") != identity.get("config"):
        raise ResumeError(
            f"{where} was written for model {saved.get('model')!r} with architecture {saved.get('config')}, but this "
            f"run has {identity.get('model')!r} with {identity.get('config')}; resume with the configuration of that run"
        )
    if "loss" in saved and saved["loss"] != identity.get("loss"):
        raise ResumeError(
            f"{where} was written with loss {'+'.join(saved['loss'])!r}, but this run has loss "
            f"{'+'.join(identity.get('loss', []))!r}; resume with --loss {'+'.join(saved['loss'])}"
        )
    if "loss_state" in saved and saved["loss_state"] != identity.get("loss_state"):
        raise ResumeError(
            f"{where} holds loss state {saved['loss_state']}, but this run's loss keeps {identity.get('loss_state')}; "
            "resume with the loss and loss_args of that run"
        )


def _read(path: Path, what: str, reader):
    """``reader()``, with any failure to read a checkpoint file turned into a :class:`ResumeError`."""
    try:
        return reader()
    except (OSError, EOFError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        raise ResumeError(
            f"resume: cannot read {what} {str(path)!r} ({type(exc).__name__}: {str(exc)[:200]}); the checkpoint is "
            "damaged or incomplete: resume from another checkpoint-* directory, or start afresh without --resume"
        ) from None


def load_checkpoint(
    path: Path, *, model: nn.Module, reference: Optional[nn.Module], optimizer, scheduler, loss_fn: nn.Module,
    identity: dict[str, Any],
) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns ``state.json``'s content.

    Raises :class:`ResumeError` when the checkpoint belongs to another model or loss, or a file is unreadable.
    """
    path = Path(path)
    state = _read(path / STATE_FILE, "the checkpoint state", lambda: json.loads((path / STATE_FILE).read_text()))
    if not isinstance(state, dict) or not {"step", "data", "identity"} <= set(state):
        raise ResumeError(f"resume: {str(path / STATE_FILE)!r} lacks step, data or identity; the checkpoint is "
                          "damaged: resume from another checkpoint-* directory")
    check_identity(path, state["identity"], identity)
    if model is not None:
        _read(path / MODEL_FILE, "the model weights", lambda: load_model(model, str(path / MODEL_FILE)))
    if reference is not None and (path / REF_FILE).is_file():
        _read(path / REF_FILE, "the reference weights", lambda: load_model(reference, str(path / REF_FILE)))
    tensors = _read(path / TENSORS_FILE, "the trainer state", lambda: torch.load(path / TENSORS_FILE, weights_only=True))

    def restore() -> None:
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        loss_fn.load_state_dict(tensors["loss"])
        _set_rng_state(tensors["rng"])

    _read(path / TENSORS_FILE, "the trainer state", restore)
    return state
