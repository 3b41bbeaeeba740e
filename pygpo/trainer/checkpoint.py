"""Checkpoints that resume a run exactly, and never unpickle untrusted data.

A checkpoint directory ``<output_dir>/checkpoint-<step>/`` holds

* ``model.safetensors`` (and ``reference.safetensors`` when TR-DPO moves the reference): weights;
* ``trainer_state.pt``: optimizer, LR scheduler, the loss module's state (beta-DPO / BCO statistics) and
  the torch RNG states, read back with ``torch.load(weights_only=True)`` (tensors, numbers and
  containers only);
* ``state.json``: the step, the data iterator's position and the identity a resume must match: the
  model source and architecture, the ``dtype`` option, the loss (its registry components), each
  component's weight and hyper-parameters (defaults filled in, at the start of training), the
  reducer and its options, the hyper-parameter schedules, and the loss state's layout.

A resume that differs in any of them is refused (:class:`ResumeError`, one line naming what differs):
the optimizer state, the loss statistics and the schedules' progress belong to the recipe they were
built with, so continuing under another one is a new run (another ``output_dir``), not a resume; no
option overrides this. A checkpoint written before some of these were recorded is accepted, with a
warning naming what cannot be checked (refusing it would leave no way to continue such a run).

A checkpoint file that cannot be read back is a :class:`ResumeError` naming the file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

MODEL_FILE, REF_FILE, STATE_FILE, TENSORS_FILE = "model.safetensors", "reference.safetensors", "state.json", "trainer_state.pt"


class ResumeError(ValueError):
    """The checkpoint cannot continue this run (missing, or written for another model)."""


#: Identity entries of the training recipe: ``(key, what it is called in messages, the options to give,
#: the prefix of the names of its differences)``.
RECIPE_KEYS = (
    ("dtype", "dtype", "dtype", "dtype"),
    ("loss_weights", "loss weights", "loss_weights", "loss_weights"),
    ("loss_hparams", "loss hyper-parameters", "loss_args (and loss_schedule starts)", ""),
    ("loss_schedule", "hyper-parameter schedules", "loss_schedule", "loss_schedule"),
    ("reducer", "reducer", "reducer and reducer_args", "reducer"),
)


def _plain(value: Any) -> Any:
    """``value`` as ``state.json`` stores it (tuples as lists, ...), so that a fresh identity compares
    equal to one read back."""
    return json.loads(json.dumps(value, default=repr))


def loss_identity(components: list[str], loss_fn: nn.Module, *,
                  schedule: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The loss part of a checkpoint's identity: registry keys, ``{state name: shape}`` of its state,
    each component's weight and resolved hyper-parameters (as ``loss_fn`` holds them now: call it
    before training moves a schedule), the reducer with its options, and the ``schedule`` if given."""
    from ..losses.validation import resolve_hparams

    identity = {"loss": list(components), "loss_state": {k: list(v.shape) for k, v in loss_fn.state_dict().items()}}
    specs = getattr(loss_fn, "components", None)
    if specs is not None:  # a FusedPreferenceLoss: [(spec, weight)] in the order of ``components``
        identity["loss_weights"] = _plain({k: w for k, (_, w) in zip(components, specs)})
        identity["loss_hparams"] = _plain({k: resolve_hparams(spec, loss_fn._component_hparams(spec))
                                           for k, (spec, _) in zip(components, specs)})
        identity["reducer"] = _plain({"name": loss_fn.reducer, "args": loss_fn.reducer_args})
    if schedule is not None:
        identity["loss_schedule"] = _plain(dict(schedule))
    return identity


def _differences(saved: Any, now: Any, name: str = "") -> list[str]:
    """``name: saved -> now`` for every leaf where two JSON-like values differ (``"dpo.beta: 0.1 -> 0.2"``)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in list(saved) + [k for k in now if k not in saved]:
            out += _differences(saved.get(key, "absent"), now.get(key, "absent"), f"{name}.{key}" if name else str(key))
        return out
    return [] if saved == now else [f"{name or 'value'}: {saved!r} -> {now!r}"]


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
    ``identity`` differ; keys a checkpoint does not record (older checkpoints) are not checked, and the
    recipe keys among them (:data:`RECIPE_KEYS`) are named in a warning."""
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
    for key, what, option, prefix in RECIPE_KEYS:
        if key in saved and key in identity and saved[key] != _plain(identity[key]):
            diffs = "; ".join(_differences(saved[key], _plain(identity[key]), prefix))
            raise ResumeError(f"{where} was written with other {what} ({diffs}; checkpoint -> this run); resume with "
                              f"the {option} of that run, or start a new run in another output_dir")
    if "loss_state" in saved and saved["loss_state"] != identity.get("loss_state"):
        raise ResumeError(
            f"{where} holds loss state {saved['loss_state']}, but this run's loss keeps {identity.get('loss_state')}; "
            "resume with the loss and loss_args of that run"
        )
    unchecked = [what for key, what, _, _ in RECIPE_KEYS if key in identity and key not in saved]
    if unchecked:
        warnings.warn(f"{where} predates the recording of its {', '.join(unchecked)}, so they are not checked: "
                      "resume only with the options that run was started with", stacklevel=3)


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
