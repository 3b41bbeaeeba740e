"""Fingerprints (sha256 hex digests) of a model's weights, of its config and adapter state, of a token-id
preference dataset, and of named tensors (:func:`fingerprint_tensors`, the integrity digest of a stored file).

They key :mod:`pygpo.ref_cache`: reference scores computed once are reused only while all match.

* :func:`fingerprint_model` hashes every entry of the unwrapped model's ``state_dict`` (parameters and
  persistent buffers) in name order: name, dtype, shape and raw bytes; the weights of disabled or
  inactive PEFT adapters, which cannot act on the outputs, are left out. Each tensor is hashed on its own
  (in a thread pool; ``hashlib`` releases the GIL) and the per-tensor digests are hashed together, so
  the result does not depend on the number of threads. A plain tensor that aliases an earlier entry
  (tied embeddings: same storage, offset, shape, stride and dtype) is recorded as an alias instead of
  being hashed twice. FSDP2 parameters (``DTensor``) are gathered on the calling thread, one at a time in
  name order (a gather is a collective: every rank must issue them in the same order), then hashed in the
  pool, so a sharded model has the fingerprint of the same model unsharded. Throughput is that of sha256
  on the host plus a device-to-host copy for GPU weights: 2 GiB of bf16 weights hashed in 2.4-2.5 s
  (0.8 GiB/s) on a busy 2-core x86 host with SHA extensions, 512 MiB in 0.3 s (1.6 GiB/s) with both
  cores free; a reference model of a few GB takes seconds.
* :func:`fingerprint_config` hashes what decides the outputs besides the tensors (:func:`config_state`):
  the model class, its ``config.to_dict()`` without the keys in :data:`IGNORED_CONFIG_KEYS`, and the
  state of PEFT adapter layers (active and merged adapters, the disabled flag, and per-adapter ``r``,
  ``lora_alpha``, ``scaling`` and the like). Buffers that are not in the ``state_dict`` (rotary
  ``inv_freq``, causal masks) are derived from the config when the model is built, so the config covers
  them.
* :func:`fingerprint_examples` hashes the canonical form of the examples (see
  :func:`canonical_examples`): for each example in order, its prompt and its responses as int64 ids
  with their lengths. ``{"chosen_ids", "rejected_ids"}`` and ``{"responses": [chosen, rejected]}`` are
  the same data and give the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

_MODEL_TAG = b"pygpo-model-weights-v1"
_CONFIG_TAG = b"pygpo-model-config-v1"
_DATA_TAG = b"pygpo-token-examples-v1"
_TENSORS_TAG = b"pygpo-named-tensors-v1"

#: Example fields that are model inputs the reference scores cannot honour: the cache runs every
#: ``[prompt | response]`` row with full causal attention, positions ``0..n-1`` and no other input, so an
#: example that carries one of these (alone or with a prefix, e.g. ``chosen_attention_mask``) is refused
#: rather than scored as if it were absent.
MODEL_INPUT_FIELDS = frozenset({
    "attention_mask", "position_ids", "token_type_ids", "cache_position", "inputs_embeds", "pixel_values",
    "pixel_attention_mask", "image_sizes", "image_grid_thw", "video_grid_thw", "input_features",
})

#: ``config.to_dict()`` keys left out of :func:`fingerprint_config`, because no forward reads them (at the
#: top level and in nested sub-configs, i.e. dicts with a ``model_type``):
#:
#: * ``_name_or_path``, ``_commit_hash``, ``transformers_version``, ``architectures``: where the files
#:   came from and which classes wrote them (``save_pretrained`` rewrites ``architectures``); the class
#:   that runs is recorded on its own;
#: * ``dtype``, ``torch_dtype``: a loading default; the dtype of every tensor is in the weight fingerprint;
#: * ``use_cache``, ``output_attentions``, ``output_hidden_states``, ``return_dict``, ``torchscript``:
#:   which outputs a forward returns (and the generation KV cache), not their values;
#: * ``id2label``, ``label2id``, ``problem_type``, ``finetuning_task``, ``task_specific_params``,
#:   ``tokenizer_class``, ``prefix``: classification heads and pipeline settings a causal LM never reads;
#: * ``initializer_range``: random initialisation only;
#: * ``_attn_implementation`` and its variants, ``_experts_implementation`` (not in ``to_dict()`` today;
#:   dropped should they appear): eager, sdpa, flash and pygpo's prefix-sharing attention compute the same
#:   masked softmax attention (and MoE kernels the same expert sums), differing by rounding only, so a
#:   cache computed with one is valid with another.
#:
#: Everything else is kept, special-token ids included (RoBERTa-style models derive position ids from
#: ``pad_token_id``). A key added by a newer transformers makes the config differ: the mismatch names it.
IGNORED_CONFIG_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "id2label",
    "label2id", "problem_type", "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    "initializer_range", "_attn_implementation", "_attn_implementation_internal",
    "_attn_implementation_autoset", "attn_implementation", "_experts_implementation",
})

# PEFT tuner-layer attributes read besides ``other_param_names``: both change the forward.
_ADAPTER_EXTRA_ATTRS = ("fan_in_fan_out", "lora_variant")


class Example(NamedTuple):
    """One example in canonical form: the prompt and its ``K >= 1`` responses, as int64 arrays."""

    prompt: np.ndarray
    responses: tuple[np.ndarray, ...]


def _ids(value: Any, where: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{where} must be a sequence of token ids, got {type(value).__name__}")
    arr = np.asarray(value)
    if arr.size == 0:
        raise ValueError(f"{where} is empty: every prompt and response needs at least one token")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{where} must be a flat sequence of integer token ids, got dtype {arr.dtype} "
                        f"and shape {arr.shape}")
    if arr.min() < 0:
        raise ValueError(f"{where} holds a negative token id ({int(arr.min())})")
    return arr.astype(np.int64, copy=False)


def _model_input_field(key: Any) -> bool:
    key = str(key)
    return any(key == f or key.endswith("_" + f) for f in MODEL_INPUT_FIELDS)


def _one(example: Any, i: int) -> Example:
    where = f"examples[{i}]"
    if not isinstance(example, Mapping):
        raise TypeError(f"{where} must be a dict with 'prompt_ids' and 'responses' (or 'chosen_ids' and "
                        f"'rejected_ids'), got {type(example).__name__}")
    inputs = sorted(str(k) for k in example if _model_input_field(k))
    if inputs:
        raise ValueError(f"{where} has the model input field(s) {inputs}, which reference scores cannot honour: "
                         "every [prompt | response] row is scored with full causal attention, positions 0..n-1 "
                         "and token ids only. Remove the field(s), or score such examples with the reference "
                         "model itself")
    if "prompt_ids" not in example:
        raise KeyError(f"{where} has no field 'prompt_ids' (fields: {sorted(map(str, example))})")
    paired = "chosen_ids" in example or "rejected_ids" in example
    if paired and "responses" in example:
        raise ValueError(f"{where} has both 'responses' and 'chosen_ids'/'rejected_ids': give one form")
    if paired:
        for name in ("chosen_ids", "rejected_ids"):
            if name not in example:
                raise KeyError(f"{where} has no field {name!r} (a pair needs 'chosen_ids' and 'rejected_ids')")
        responses = (_ids(example["chosen_ids"], f"{where}['chosen_ids']"),
                     _ids(example["rejected_ids"], f"{where}['rejected_ids']"))
    elif "responses" in example:
        given = example["responses"]
        if isinstance(given, (str, bytes, Tensor)) or not isinstance(given, Sequence):
            raise TypeError(f"{where}['responses'] must be a list of token-id lists, got {type(given).__name__}")
        if len(given) == 0:
            raise ValueError(f"{where}['responses'] is empty: give at least one response")
        responses = tuple(_ids(r, f"{where}['responses'][{k}]") for k, r in enumerate(given))
    else:
        raise KeyError(f"{where} has no field 'responses' (or 'chosen_ids' and 'rejected_ids')")
    return Example(_ids(example["prompt_ids"], f"{where}['prompt_ids']"), responses)


def canonical_examples(examples: Iterable[Any]) -> list[Example]:
    """Validate ``examples`` and return them as :class:`Example` tuples (chosen before rejected).

    Each example is ``{"prompt_ids": [...], "responses": [[...], ...]}`` (``K >= 1`` responses, ``K`` may
    vary) or ``{"prompt_ids", "chosen_ids", "rejected_ids"}``; ids are lists, 1-D integer arrays or
    tensors. Other fields are ignored, except model inputs (:data:`MODEL_INPUT_FIELDS`, e.g.
    ``attention_mask``, ``position_ids``, ``pixel_values``), which would change the scores and are refused.
    Raises ``KeyError``/``TypeError``/``ValueError`` naming the example index and the field.
    """
    if isinstance(examples, Mapping) or isinstance(examples, (str, bytes)):
        raise TypeError("examples must be a sequence of dicts (one per example), got a single "
                        f"{type(examples).__name__}")
    out = [_one(ex, i) for i, ex in enumerate(examples)]
    if not out:
        raise ValueError("examples is empty")
    return out


def fingerprint_examples(examples: Iterable[Any]) -> str:
    """sha256 hex digest of the examples' token ids, in order (``examples`` as in :func:`canonical_examples`,
    or already canonical)."""
    if isinstance(examples, list) and examples and all(isinstance(e, Example) for e in examples):
        canon = examples
    else:
        canon = canonical_examples(examples)
    h = hashlib.sha256(_DATA_TAG)
    for ex in canon:
        lengths = np.array([len(ex.responses), len(ex.prompt)] + [len(r) for r in ex.responses], dtype=np.int64)
        h.update(lengths.tobytes())
        h.update(ex.prompt.tobytes())
        for r in ex.responses:
            h.update(r.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ tensors


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def _gathered(t: Tensor) -> Tensor:
    """The whole tensor: a sharded ``DTensor`` is all-gathered (a collective every rank must call in the
    same order, so only ever from the calling thread)."""
    return t.detach().full_tensor() if _is_dtensor(t) else t


def _host_bytes(t: Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def _tensor_digest(t: Tensor) -> bytes:
    return hashlib.sha256(_host_bytes(t)).digest()


def fingerprint_tensors(tensors: Mapping[str, Tensor]) -> str:
    """sha256 hex digest of named tensors, in name order: each name, dtype, shape and raw bytes (the
    integrity check of a stored file, e.g. :mod:`pygpo.ref_cache`; any flipped byte changes it)."""
    h = hashlib.sha256(_TENSORS_TAG)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_digest(_gathered(t)))
    return h.hexdigest()


def _alias_key(t: Tensor) -> Any:
    """What makes two ``state_dict`` entries one tensor, or None when it cannot be told.

    A ``DTensor`` (FSDP2) reports ``data_ptr() == 0``, so it is keyed by identity: tied weights are one
    Parameter object, on every rank alike (the set of gathered tensors must agree across ranks). A plain
    tensor is keyed by its storage, offset, shape, stride and dtype; tensors without storage
    (``data_ptr() == 0``: meta, other wrapper subclasses) are never aliases.
    """
    if _is_dtensor(t):
        return ("object", id(t))
    if t.numel() == 0:
        return None
    try:
        if t.data_ptr() == 0:
            return None
        storage = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ("storage", str(t.device), storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _digests(named: list[tuple[str, Tensor]], workers: int) -> dict[str, bytes]:
    """sha256 of each tensor's bytes, hashed in a pool of ``workers`` threads. Sharded tensors are gathered
    here, on the calling thread, in the order given; at most ``2 * workers`` gathered tensors wait for the
    pool, so a sharded model is never held whole."""
    out: dict[str, bytes] = {}
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, t in named:
            if _is_dtensor(t):
                while len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    out[done] = future.result()
                t = _gathered(t)
            pending.append((name, pool.submit(_tensor_digest, t)))
        for done, future in pending:
            out[done] = future.result()
    return out


def fingerprint_model(model: nn.Module, *, threads: int | None = None) -> str:
    """sha256 hex digest of ``model``'s weights: every ``state_dict`` entry's name, dtype, shape and bytes.

    Wrappers (DDP, PEFT, ``torch.compile``) are removed first, so a wrapped and a bare model agree; an
    FSDP2-sharded model agrees with the same model unsharded (every rank must call this, in step). Two
    models agree exactly when they hold bit-identical tensors under the same names, leaving out the
    weights of PEFT adapters that cannot act on the outputs (:func:`_idle_adapter_prefixes`: a PEFT
    reference is usually the base model with its adapters disabled, and training the adapters must not
    invalidate its scores). What else decides the outputs (config, class, PEFT adapter state, including
    which adapters are active or disabled) is :func:`fingerprint_config`.

    Args:
        model: any ``nn.Module``.
        threads: hashing threads (default ``min(8, os.cpu_count())``).
    """
    from .integrations.hidden_states import unwrap_model

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    lm = unwrap_model(model)
    state = lm.state_dict(keep_vars=True)
    idle = _idle_adapter_prefixes(lm)
    dotted = tuple(p + "." for p in idle)
    first_of: dict[Any, str] = {}
    to_hash: list[tuple[str, Tensor]] = []
    headers: list[tuple[str, str, tuple, str | None]] = []
    for name in sorted(state):
        if _is_idle(name, idle, dotted):
            continue
        t = state[name]
        key = _alias_key(t)
        alias = first_of.get(key) if key is not None else None
        if alias is None:
            if key is not None:
                first_of[key] = name
            to_hash.append((name, t))
        headers.append((name, str(t.dtype), tuple(t.shape), alias))
    with torch.no_grad():
        digests = _digests(to_hash, threads or min(8, os.cpu_count() or 1))
    h = hashlib.sha256(_MODEL_TAG)
    for name, dtype, shape, alias in headers:
        h.update(f"{name}\0{dtype}\0{shape}\0".encode())
        h.update(f"alias:{alias}".encode() if alias is not None else digests[name])
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ config


def _jsonable(value: Any) -> Any:
    """``value`` as JSON types (dict keys as str), deterministically: modules by class and settings,
    tensors by dtype, shape and digest, other objects by ``repr`` unless it holds a memory address."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (Mapping, nn.ModuleDict, nn.ParameterDict)):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=_canonical_json)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Tensor):
        t = _gathered(value)
        return f"tensor {t.dtype} {tuple(t.shape)} sha256:{_tensor_digest(t).hex()}"
    if isinstance(value, nn.Module):
        return f"{type(value).__name__}({value.extra_repr()})"
    text = repr(value)
    return f"<{type(value).__qualname__}>" if " at 0x" in text else text


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _class_name(module: nn.Module) -> str:
    """The class name, through the subclass FSDP2 swaps in (``FSDPLlamaForCausalLM``: a torch.distributed
    module class first, the model's class second)."""
    cls = type(module)
    while (len(cls.__bases__) == 2 and cls.__bases__[0].__module__.startswith("torch.distributed")
           and cls.__name__.endswith(cls.__bases__[1].__name__)):
        cls = cls.__bases__[1]
    return cls.__name__


def _without_ignored(value: Any, top: bool = True) -> Any:
    if isinstance(value, dict):
        drop = top or "model_type" in value  # nested sub-configs carry the same bookkeeping keys
        return {k: _without_ignored(v, False) for k, v in value.items() if not (drop and k in IGNORED_CONFIG_KEYS)}
    if isinstance(value, list):
        return [_without_ignored(v, False) for v in value]
    return value


def _config_dict(config: Any) -> Any:
    if config is None:
        return None
    if callable(getattr(config, "to_dict", None)):
        raw = config.to_dict()
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raw = dict(getattr(config, "__dict__", {}))
    return _without_ignored(_jsonable(raw))


def _is_adapter_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (``BaseTunerLayer``) or auxiliary wrapper (``modules_to_save``): the classes that
    declare ``adapter_layer_names``/``other_param_names`` and expose the active and disabled adapters."""
    cls = type(module)
    return (isinstance(getattr(cls, "adapter_layer_names", None), tuple)
            and isinstance(getattr(cls, "other_param_names", None), tuple)
            and hasattr(cls, "active_adapters") and hasattr(cls, "disable_adapters"))


def _idle_adapter_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``state_dict`` name prefixes of adapter weights that cannot change ``model``'s outputs: in every
    PEFT adapter layer without merged adapters, the per-adapter entries (``<layer>.lora_A.<adapter>``, ...)
    of adapters that are disabled (the layer's ``disable_adapters``) or not active. A layer with merged
    adapters keeps them all (its base weights hold their products)."""
    prefixes = []
    for name, module in model.named_modules():
        if not _is_adapter_layer(module) or getattr(module, "merged_adapters", None):
            continue
        acting = set() if module.disable_adapters else set(module.active_adapters)
        for attr in type(module).adapter_layer_names:
            per_adapter = getattr(module, attr, None)
            if isinstance(per_adapter, (nn.ModuleDict, nn.ParameterDict)):
                prefixes += [f"{name}.{attr}.{adapter}" for adapter in per_adapter.keys() if adapter not in acting]
    return tuple(prefixes)


def _is_idle(name: str, idle: tuple[str, ...], dotted: tuple[str, ...]) -> bool:
    """Whether ``state_dict`` key ``name`` is an idle adapter prefix itself (a ``ParameterDict`` entry) or
    lies under one (a submodule's tensor); ``dotted`` is ``idle`` with a ``.`` appended to each."""
    return bool(idle) and (name.startswith(dotted) or name in idle)


def _adapter_state(module: nn.Module) -> dict[str, Any]:
    state = {"active": _jsonable(list(module.active_adapters)), "disabled": bool(module.disable_adapters),
             "merged": _jsonable(list(getattr(module, "merged_adapters", None) or []))}
    for attr in (*type(module).other_param_names, *_ADAPTER_EXTRA_ATTRS):
        try:
            value = getattr(module, attr)
        except AttributeError:
            continue
        state[attr] = _jsonable(value)
    return state


def config_state(model: nn.Module) -> dict[str, Any]:
    """What decides ``model``'s outputs besides its tensors, as JSON types: ``{"class": name, "config":
    config.to_dict() without IGNORED_CONFIG_KEYS (None without a config), "adapters": {module name:
    state}}``, the last for every PEFT adapter layer (active, merged and disabled adapters, and its
    per-adapter settings such as ``r``, ``lora_alpha``, ``scaling``, ``use_dora``). Wrappers are removed
    first (:func:`pygpo.integrations.hidden_states.unwrap_model`)."""
    from .integrations.hidden_states import unwrap_model

    lm = unwrap_model(model)
    adapters = {name: _adapter_state(m) for name, m in lm.named_modules() if _is_adapter_layer(m)}
    state = {"class": _class_name(lm), "config": _config_dict(getattr(lm, "config", None)), "adapters": adapters}
    return json.loads(_canonical_json(state))  # exactly what a JSON round trip (a stored file) gives back


def config_state_digest(state: Mapping[str, Any]) -> str:
    """sha256 hex digest of a :func:`config_state` (canonical JSON: sorted keys, no spaces)."""
    return hashlib.sha256(_CONFIG_TAG + _canonical_json(state).encode()).hexdigest()


def fingerprint_config(model: nn.Module) -> str:
    """sha256 hex digest of :func:`config_state`: the model class, its config (less
    :data:`IGNORED_CONFIG_KEYS`) and its PEFT adapter state. Two models with bit-identical tensors give the
    same outputs exactly when this agrees too (up to the attention implementation's rounding)."""
    return config_state_digest(config_state(model))


def _leaves(value: Any, path: tuple = ()) -> Iterable[tuple[tuple, Any]]:
    """(path, value) of every non-dict value; an empty dict has no leaves (a model without adapters)."""
    if isinstance(value, dict):
        for key in sorted(value):
            yield from _leaves(value[key], path + (key,))
    else:
        yield path, value


_ABSENT = object()


def _shown(value: Any) -> str:
    text = "absent" if value is _ABSENT else _canonical_json(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Where two :func:`config_state` dicts differ, leaf by leaf in key order, as ``(part, description)``:
    ``part`` is ``"class"``, ``"config"`` or ``"adapters"``; the description reads ``"key: stored X,
    current Y"`` with the dotted key inside the part (for adapters, the module name then the setting)."""
    a, b = dict(_leaves(dict(stored))), dict(_leaves(dict(current)))
    out = []
    for path in sorted(set(a) | set(b)):
        x, y = a.get(path, _ABSENT), b.get(path, _ABSENT)
        if x is _ABSENT or y is _ABSENT or _canonical_json(x) != _canonical_json(y):
            key = ".".join(map(str, path[1:])) or str(path[0])
            out.append((str(path[0]), f"{key}: stored {_shown(x)}, current {_shown(y)}"))
    return out
