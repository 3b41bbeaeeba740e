"""Reference-model scores computed once per dataset, stored in a safetensors file, reused while they match.

Offline preference losses need the frozen reference model's log-probs of every response (DPO, "Direct
Preference Optimization", Rafailov et al., 2023, eq. 7, uses ``log pi_ref(y | x)``). They do not change
during training, so the reference forward can run once::

    cache = open_reference_cache("ref.safetensors", ref_model, examples)   # computes, or reuses the file
    ref = cache.sequence_logps(batch_indices)                               # (B, K) float32
    tok, mask = cache.token_logps(batch_indices)                            # (B, K, T) + bool mask

Examples are token ids: ``{"prompt_ids": [...], "responses": [[...], ...]}`` (``K >= 1`` responses, ``K``
may vary) or ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (``K = 2``, chosen first); see
:func:`pygpo.fingerprint.canonical_examples`.

What is stored (safetensors, never pickle). Responses are ordered by example, then by rank ``k``:

* ``token_logps`` float32 ``(total_tokens,)``: ``log p_ref(y_t | x, y_<t)`` of every response token,
  responses back to back; ``token_offsets`` int64 ``(num_responses + 1,)`` delimits them;
* ``sequence_logps`` float32 ``(num_responses,)``: per-response sums (accumulated in float64);
* ``response_example``, ``response_rank`` int64 ``(num_responses,)``; ``example_offsets`` int64
  ``(num_examples + 1,)``: the responses of example ``i`` are rows ``example_offsets[i]:example_offsets[i+1]``;
* metadata key ``"pygpo_ref_cache"``: JSON with the format version (:data:`FORMAT_VERSION`), the weight
  fingerprint (:func:`pygpo.fingerprint.fingerprint_model`), the config fingerprint
  (:func:`pygpo.fingerprint.fingerprint_config`: model class, config, PEFT adapter state) and the state
  it hashes (``model_config``, so a mismatch can name the keys), the data fingerprint
  (:func:`pygpo.fingerprint.fingerprint_examples`), the temperature, the model class and config name,
  ``num_examples``, ``num_responses``, and ``tensor_sha256``: the digest of the stored tensors
  (:func:`pygpo.fingerprint.fingerprint_tensors`).

A file is reused only when the format version, the weight fingerprint, the config fingerprint, the
data fingerprint and the temperature all match what the caller passes; otherwise
:class:`FingerprintMismatchError` says what differs (for the config, the first differing keys with both
values). A damaged file (truncated, not safetensors, metadata that is not the JSON above or lacks a key,
a missing tensor, shapes or offsets that disagree with ``num_examples``/``num_responses``, bytes that no
longer match ``tensor_sha256``) raises :class:`CorruptCacheError` naming the file: delete it and the
scores are recomputed. Files of format version 1 (written before the config fingerprint, some without
``tensor_sha256``) are refused by their version: nothing in them shows which config the scores came
from. Scores are computed with right-padded ``[prompt | response]`` rows (causal attention never
lets a real token see the padding after it), the model's final hidden states
(:func:`pygpo.integrations.hidden_states.final_hidden_states`) and :func:`pygpo.fused_linear_logprobs`
on the response positions only, so no ``B x T x V`` logits are formed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .fingerprint import (
    Example,
    canonical_examples,
    config_differences,
    config_state,
    config_state_digest,
    fingerprint_examples,
    fingerprint_model,
    fingerprint_tensors,
)

#: Version 2 files carry ``config_fingerprint``/``model_config`` and ``tensor_sha256``, all required.
FORMAT_VERSION = 2
_META_KEY = "pygpo_ref_cache"
_TENSORS = ("token_logps", "token_offsets", "sequence_logps", "response_example", "response_rank",
            "example_offsets")


_META_REQUIRED = ("format_version", "model_fingerprint", "config_fingerprint", "model_config", "data_fingerprint",
                  "temperature", "num_examples", "num_responses", "tensor_sha256")
_FLOAT_TENSORS = ("token_logps", "sequence_logps")
_REMEDY = "Delete the file (or pass a new path) to recompute the reference scores."


class ReferenceCacheError(ValueError):
    """A reference cache file that cannot be used; the message names the file and the remedy."""


class FingerprintMismatchError(ReferenceCacheError):
    """A reference cache does not match the model, data, temperature or format it is used with."""


class CorruptCacheError(ReferenceCacheError):
    """A reference cache file that is damaged: unreadable, incomplete, inconsistent, or altered bytes."""


def _corrupt(path: Optional[str], what: str) -> CorruptCacheError:
    return CorruptCacheError(f"reference cache {path!r} is damaged: {what}. {_REMEDY}")


def _short(fp: Optional[str]) -> str:
    return "none" if fp is None else str(fp)[:12]


def _first(items: list[str], shown: int = 3) -> str:
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def _check_path(path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; pass a file path such as 'ref.safetensors'")
    return path


def _check_writable(path: str) -> None:
    """Refuse a ``path`` whose directory is missing or cannot take a new file, before any forward runs.
    Creating (and removing) a file is the test: permission bits alone miss read-only and special file
    systems, and a root process passes them all."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path {path!r}: its directory {folder!r} does not exist (or is not a directory); "
                                "create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pygpo-write-test-", dir=folder)
    except OSError as exc:
        raise PermissionError(f"path {path!r}: cannot write a file in its directory {folder!r} "
                              f"({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def _check_indices(indices: Any, n: int) -> Tensor:
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or (idx.numel() and (idx.dtype.is_floating_point or idx.dtype == torch.bool)):
        raise TypeError(f"example_indices must be a 1-D sequence of integers, got shape {tuple(idx.shape)} "
                        f"dtype {idx.dtype}")
    idx = idx.to(torch.int64).cpu()
    bad = (idx < 0) | (idx >= n)
    if bool(bad.any()):
        raise IndexError(f"example index {int(idx[bad][0])} is out of range: the cache holds {n} examples "
                         f"(indices 0..{n - 1})")
    return idx


class ReferenceCache:
    """Reference scores of a dataset, loaded from (or just written to) a safetensors file.

    ``len(cache)`` is the number of examples; :attr:`num_responses` the number of responses in all.
    Lookups return CPU float32 tensors laid out by example and rank, ``K`` = the largest number of
    responses among the requested examples.
    """

    def __init__(self, tensors: dict[str, Tensor], meta: dict[str, Any], path: Optional[str] = None):
        missing = [k for k in _TENSORS if k not in tensors]
        if missing:
            raise ValueError(f"reference cache {path!r} lacks the tensors {missing}")
        self._t = tensors
        self.meta = meta
        self.path = path

    # ---------------------------------------------------------------- metadata
    @property
    def model_fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    @property
    def config_fingerprint(self) -> str:
        return self.meta["config_fingerprint"]

    @property
    def data_fingerprint(self) -> str:
        return self.meta["data_fingerprint"]

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    def __len__(self) -> int:
        return int(self._t["example_offsets"].numel()) - 1

    @property
    def num_responses(self) -> int:
        """Number of responses over all examples."""
        return int(self._t["sequence_logps"].numel())

    @property
    def responses_per_example(self) -> Tensor:
        """``(E,)`` int64 number of responses ``K_i`` of each example."""
        return self._t["example_offsets"].diff()

    @property
    def response_example(self) -> Tensor:
        return self._t["response_example"]

    @property
    def response_rank(self) -> Tensor:
        return self._t["response_rank"]

    # ---------------------------------------------------------------- lookups
    def _rows(self, example_indices: Any) -> tuple[Tensor, Tensor]:
        """``(B, K)`` response rows of the requested examples (clamped) and their validity mask."""
        idx = _check_indices(example_indices, len(self))
        offsets = self._t["example_offsets"]
        start, count = offsets[idx], offsets[idx + 1] - offsets[idx]
        k = int(count.max()) if idx.numel() else 0
        ranks = torch.arange(k)
        valid = ranks[None, :] < count[:, None]
        rows = torch.where(valid, start[:, None] + ranks[None, :], torch.zeros((), dtype=torch.int64))
        return rows, valid

    def sequence_logps(self, example_indices: Any) -> Tensor:
        """``(B, K)`` float32 reference log-probs ``sum_t log p_ref(y_t | x, y_<t)``; NaN where an example has
        fewer than ``K`` responses. Column 0 is the chosen and column 1 the rejected response of a pair."""
        rows, valid = self._rows(example_indices)
        return self._t["sequence_logps"][rows].masked_fill(~valid, math.nan)

    def token_logps(self, example_indices: Any) -> tuple[Tensor, Tensor]:
        """``(B, K, T)`` float32 per-token reference log-probs in completion order, 0 on padding, and the
        ``(B, K, T)`` bool mask of real tokens (``T`` = longest requested response)."""
        rows, valid = self._rows(example_indices)
        offsets = self._t["token_offsets"]
        start = offsets[rows]
        length = torch.where(valid, offsets[rows + 1] - start, torch.zeros((), dtype=torch.int64))
        t = int(length.max()) if length.numel() else 0
        pos = torch.arange(t)
        mask = pos < length[..., None]
        where = torch.where(mask, start[..., None] + pos, torch.zeros((), dtype=torch.int64))
        return self._t["token_logps"][where].masked_fill(~mask, 0.0), mask

    # ---------------------------------------------------------------- verification
    def verify(self, *, model: Optional[nn.Module] = None, examples: Any = None,
               temperature: Optional[float] = None) -> "ReferenceCache":
        """Check the cache against whichever of ``model``, ``examples``, ``temperature`` is given.

        Raises:
            FingerprintMismatchError: naming each thing that differs, with the stored and current values.
        """
        problems = []
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:  # the rest of another format's metadata cannot be compared
            problems.append(f"format version differs (stored {version}, this pygpo reads {FORMAT_VERSION})")
            model = examples = temperature = None
        if temperature is not None:
            temperature = _check_temperature(temperature)
            if temperature != self.temperature:
                problems.append(f"temperature differs (stored {self.temperature}, current {temperature})")
        if examples is not None:
            current = fingerprint_examples(examples)
            if current != self.data_fingerprint:
                problems.append(f"data differs (stored fingerprint {_short(self.data_fingerprint)}, "
                                f"current {_short(current)})")
        if model is not None:
            current = fingerprint_model(model)
            config_problems = self._config_problems(config_state(model))
            if current != self.model_fingerprint:
                # disabled and inactive adapters' weights are not fingerprinted: switching adapters changes
                # which weights count, whether or not any tensor changed
                switched = any(p.startswith("PEFT adapter state") for p in config_problems)
                problems.append(f"model weights {'in use ' if switched else ''}differ (stored fingerprint "
                                f"{_short(self.model_fingerprint)}, current {_short(current)}"
                                f"{'; the adapters that act changed' if switched else ''})")
            problems += config_problems
        if problems:
            raise FingerprintMismatchError(
                f"reference cache {self.path!r} does not match: " + "; ".join(problems) + ". " + _REMEDY
            )
        return self

    def _config_problems(self, current: dict[str, Any]) -> list[str]:
        """How the stored config state differs from ``current``: the class and config keys, then the PEFT
        adapter settings, the first few of each with both values."""
        digest = config_state_digest(current)
        if digest == self.config_fingerprint:
            return []
        found = config_differences(self.meta["model_config"], current)
        config = [d for part, d in found if part in ("class", "config")]
        adapters = [d for part, d in found if part == "adapters"]
        problems = [f"{what} differs ({_first(items)})" for what, items in
                    (("model config", config), ("PEFT adapter state", adapters)) if items]
        return problems or [f"model config differs (stored fingerprint {_short(self.config_fingerprint)}, "
                            f"current {_short(digest)})"]

    def check_integrity(self) -> "ReferenceCache":
        """Check the tensors against the metadata: dtypes, shapes (``num_examples``, ``num_responses``),
        offsets that start at 0, never decrease and end at the tensor lengths, and the digest
        ``tensor_sha256``.

        Raises:
            CorruptCacheError: naming the file and the first inconsistency found.
        """
        t, meta = self._t, self.meta
        num_examples, num_responses = meta["num_examples"], meta["num_responses"]
        for name in _TENSORS:
            want = torch.float32 if name in _FLOAT_TENSORS else torch.int64
            if t[name].dtype != want or t[name].dim() != 1:
                raise _corrupt(self.path, f"tensor {name!r} has dtype {t[name].dtype} and shape "
                                          f"{tuple(t[name].shape)}, expected a 1-D {want} tensor")
        lengths = {"token_offsets": num_responses + 1, "sequence_logps": num_responses,
                   "response_example": num_responses, "response_rank": num_responses,
                   "example_offsets": num_examples + 1}
        for name, n in lengths.items():
            if t[name].numel() != n:
                raise _corrupt(self.path, f"tensor {name!r} holds {t[name].numel()} values, expected {n} "
                                          f"(num_examples={num_examples}, num_responses={num_responses})")
        for name, total in (("token_offsets", t["token_logps"].numel()), ("example_offsets", num_responses)):
            offsets = t[name]
            if int(offsets[0]) != 0 or int(offsets[-1]) != total or bool((offsets.diff() < 0).any()):
                raise _corrupt(self.path, f"tensor {name!r} is not a list of offsets from 0 to {total}")
        stored = meta["tensor_sha256"]
        if fingerprint_tensors(t) != stored:
            raise _corrupt(self.path, f"the stored tensors do not match their digest (stored {_short(stored)}, "
                                      f"read {_short(fingerprint_tensors(t))}): bytes were altered")
        return self

    # ---------------------------------------------------------------- file io
    def save(self, path: Any) -> None:
        """Write the cache to ``path`` (atomically: a temporary file is renamed into place), with the
        digest of its tensors in the metadata (``tensor_sha256``)."""
        from safetensors.torch import save_file

        path = _check_path(path)
        self.meta["tensor_sha256"] = fingerprint_tensors({k: self._t[k] for k in _TENSORS})
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({k: self._t[k].contiguous() for k in _TENSORS}, tmp, metadata={_META_KEY: json.dumps(self.meta)})
        os.replace(tmp, path)
        self.path = path

    @classmethod
    def load(cls, path: Any, *, model: Optional[nn.Module] = None, examples: Any = None,
             temperature: Optional[float] = None) -> "ReferenceCache":
        """Read a cache written by :func:`compute_reference_cache` and :meth:`verify` it against whichever of
        ``model``, ``examples`` and ``temperature`` is given (the metadata is checked before the tensors
        are read)."""
        from safetensors import safe_open

        path = _check_path(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no reference cache at {path!r}")
        try:
            with safe_open(path, framework="pt") as f:
                raw, names = (f.metadata() or {}).get(_META_KEY), set(f.keys())
        except OSError:  # permissions, I/O: the file may be whole
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            raise _corrupt(path, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
        if raw is None:
            raise ReferenceCacheError(f"{path!r} is not a pygpo reference cache (no {_META_KEY!r} metadata). "
                                      + _REMEDY)
        cache = cls({k: torch.empty(0) for k in _TENSORS}, _parse_meta(raw, path), path)
        cache.verify(model=model, examples=examples, temperature=temperature)
        missing = [k for k in _TENSORS if k not in names]
        if missing:
            raise _corrupt(path, f"the tensors {missing} are missing")
        try:
            with safe_open(path, framework="pt") as f:
                cache._t = {k: f.get_tensor(k) for k in _TENSORS}
        except OSError:
            raise
        except Exception as exc:
            raise _corrupt(path, f"its tensors cannot be read ({type(exc).__name__}: {exc})") from exc
        return cache.check_integrity()


def _parse_meta(raw: str, path: str) -> dict[str, Any]:
    """The JSON metadata, with every key the reader relies on (:data:`_META_REQUIRED`) present."""
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise _corrupt(path, f"its {_META_KEY!r} metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _corrupt(path, f"its {_META_KEY!r} metadata is not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        return meta  # another format: ReferenceCache.verify refuses it by its version
    missing = [k for k in _META_REQUIRED if k not in meta]
    if missing:
        raise _corrupt(path, f"its metadata lacks {missing}")
    for key in ("num_examples", "num_responses"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise _corrupt(path, f"its metadata {key}={meta[key]!r} is not a count")
    try:
        _check_temperature(meta["temperature"])
    except ValueError:
        raise _corrupt(path, f"its metadata temperature={meta['temperature']!r} is not a positive number") from None
    state = meta["model_config"]
    if not isinstance(state, dict) or config_state_digest(state) != meta["config_fingerprint"]:
        raise _corrupt(path, "its metadata model_config does not match its config_fingerprint")
    return meta


# -------------------------------------------------------------------- computing


def _batches(examples: Sequence[Example], batch_size: int) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """All (example, rank) responses, and batches of their positions grouped by similar total length."""
    flat = [(i, k) for i, ex in enumerate(examples) for k in range(len(ex.responses))]
    lengths = [len(examples[i].prompt) + len(examples[i].responses[k]) for i, k in flat]
    order = sorted(range(len(flat)), key=lambda j: -lengths[j])  # stable: ties keep dataset order
    return flat, [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _padded(examples: Sequence[Example], flat, members: list[int], device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``[prompt | response]`` ids, attention mask, and labels aligned with hidden row ``t``
    (the token at ``t + 1`` where it is a response token, else -100)."""
    seqs = [np.concatenate([examples[flat[j][0]].prompt, examples[flat[j][0]].responses[flat[j][1]]])
            for j in members]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    labels = torch.full((len(seqs), width - 1), -100, dtype=torch.int64)
    for b, (s, j) in enumerate(zip(seqs, members)):
        ids[b, :len(s)] = torch.from_numpy(s)
        mask[b, :len(s)] = 1
        p = len(examples[flat[j][0]].prompt)
        labels[b, p - 1:len(s) - 1] = ids[b, p:len(s)]
    return ids.to(device), mask.to(device), labels.to(device)


def _config_name(model: nn.Module) -> str:
    from .integrations.hidden_states import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or "")


def compute_reference_cache(
    model: nn.Module,
    examples: Any,
    path: Any,
    *,
    batch_size: int = 8,
    device: Optional[torch.device | str] = None,
    temperature: float = 1.0,
    progress: bool = True,
) -> ReferenceCache:
    """Score every response of ``examples`` under ``model`` once and write the cache to ``path``.

    ``path``'s directory must exist and take a new file; that is checked before any forward runs. The
    model runs in eval mode under ``no_grad`` (its training flag is restored afterwards) on batches
    of ``batch_size`` padded ``[prompt | response]`` rows, grouped by length. The score of token ``y_t``
    is ``log softmax(logits / temperature)[y_t]`` with the model's own logit transforms (softcap, scale).

    Args:
        model: a transformers ``*ForCausalLM`` (possibly wrapped, see
            :mod:`pygpo.integrations.hidden_states`).
        examples: sequence of example dicts (module docstring).
        path: file to write (an existing file is replaced).
        batch_size: rows per forward.
        device: where the batches go; default the device of the model's first parameter.
        temperature: positive divisor of the logits, as the training loss will use it.
        progress: show a tqdm progress bar (responses scored).

    Returns:
        The :class:`ReferenceCache`, already saved.
    """
    from tqdm.auto import tqdm

    from .integrations.hidden_states import final_hidden_states, lm_head_of

    path = _check_path(path)
    temperature = _check_temperature(temperature)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    canon = canonical_examples(examples)
    vocab = int(lm_head_of(model).weight.shape[0])
    for i, ex in enumerate(canon):
        top = max(int(ex.prompt.max()), *(int(r.max()) for r in ex.responses))
        if top >= vocab:
            raise ValueError(f"examples[{i}] holds token id {top}, outside the model's vocabulary of {vocab}")
    _check_writable(path)
    if device is None:
        device = next(iter(model.parameters())).device
    flat, batches = _batches(canon, batch_size)
    scores: list[Optional[np.ndarray]] = [None] * len(flat)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(flat), desc="reference scores", unit="resp",
                                   disable=not progress) as bar:
            for members in batches:
                ids, mask, labels = _padded(canon, flat, members, device)
                hidden = final_hidden_states(model, ids, attention_mask=mask)[:, :-1]
                logp = lm_head_of(model).logprobs(hidden, labels, temperature=temperature)
                logp = logp.float().cpu().numpy()
                for b, j in enumerate(members):
                    p = len(canon[flat[j][0]].prompt)
                    scores[j] = logp[b, p - 1:p - 1 + len(canon[flat[j][0]].responses[flat[j][1]])].copy()
                bar.update(len(members))
    finally:
        model.train(was_training)
    token_lengths = torch.tensor([len(s) for s in scores], dtype=torch.int64)
    counts = torch.tensor([len(ex.responses) for ex in canon], dtype=torch.int64)
    tensors = {
        "token_logps": torch.from_numpy(np.concatenate(scores).astype(np.float32)),
        "token_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), token_lengths.cumsum(0)]),
        "sequence_logps": torch.tensor([float(s.sum(dtype=np.float64)) for s in scores], dtype=torch.float32),
        "response_example": torch.tensor([i for i, _ in flat], dtype=torch.int64),
        "response_rank": torch.tensor([k for _, k in flat], dtype=torch.int64),
        "example_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]),
    }
    state = config_state(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "model_fingerprint": fingerprint_model(model),
        "config_fingerprint": config_state_digest(state),
        "model_config": state,
        "data_fingerprint": fingerprint_examples(canon),
        "temperature": temperature,
        "model_class": state["class"],
        "model_config_name": _config_name(model),
        "num_examples": len(canon),
        "num_responses": len(flat),
    }
    cache = ReferenceCache(tensors, meta)
    cache.save(path)
    return cache


def open_reference_cache(path: Any, model: nn.Module, examples: Any, **kwargs: Any) -> ReferenceCache:
    """The cache at ``path``: computed (:func:`compute_reference_cache`, with ``kwargs``) when the file is
    absent, loaded when it matches ``model``, ``examples`` and the temperature, refused otherwise
    (:class:`FingerprintMismatchError`).

    In a multi-process run, open it on one rank first and on the others after a barrier (``pygpo train``
    does): every rank that finds no file computes one (the write is atomic, so the file stays whole, but
    the work repeats).
    """
    path = _check_path(path)
    unknown = set(kwargs) - {"batch_size", "device", "temperature", "progress"}
    if unknown:
        raise TypeError(f"open_reference_cache got unexpected keyword arguments {sorted(unknown)}")
    if not os.path.exists(path):
        return compute_reference_cache(model, examples, path, **kwargs)
    return ReferenceCache.load(path, model=model, examples=examples,
                               temperature=_check_temperature(kwargs.get("temperature", 1.0)))
