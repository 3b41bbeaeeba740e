"""Preference data: read local files, validate rows, tokenize, split, and batch.

Sources (:func:`read_rows`): a ``.jsonl``/``.ndjson`` file (one JSON object per line; blank lines are
ignored), a ``.parquet`` file (pyarrow), or a directory written by ``datasets.Dataset.save_to_disk``
(a ``DatasetDict`` directory reads its ``"train"`` split unless ``split=`` names another); ``"demo"``
names the shipped demo task (:mod:`pygpo.trainer.demo_task`).

Row formats (TRL's preference formats):
    standard        ``{"prompt": str, "chosen": str, "rejected": str}``
    conversational  ``{"prompt": [{"role", "content"}, ...], "chosen": [assistant message(s)],
                    "rejected": [...]}``; the tokenizer's chat template renders them.
    implicit prompt ``{"chosen", "rejected"}`` without ``"prompt"``: the prompt is their common
                    start (the shared leading messages, or the shared leading characters, a space at
                    the split going to the responses).
Other columns are ignored. ``dataset_format="auto"`` decides per row from the type of ``chosen``.

Rows are numbered from 0 in file order (in JSONL, the n-th non-blank line is row n-1; the message
also gives the 1-based line). A malformed row raises :class:`DatasetRowError` naming the source,
row, field and reason, or with ``skip_bad_rows=True`` is dropped and counted by reason in the
:class:`DataSummary`.

Tokenization (as TRL does it): prompt and prompt+response are tokenized whole and the response ids
start where the ids diverge (so a token merge across the boundary is handled); standard rows get the
tokenizer's BOS (if it has one) before the prompt, rendered conversations carry whatever the chat
template puts there; EOS is appended to each response unless it already ends with it. Truncation:
``max_prompt_length`` keeps the prompt's last tokens (and its leading BOS, if it has one);
``max_length`` bounds prompt + each response, cutting the responses' ends; a prompt that leaves no
room for one response token is a bad row.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from .demo_task import data_path as demo_data_path
from .loss_inputs import ColumnError, ExampleInputs, show_value as _show

Example = dict[str, Any]  # {"row": int, "prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}
FIELDS = ("prompt", "chosen", "rejected")
FORMATS = ("auto", "standard", "conversational")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DatasetRowError(ValueError):
    """A malformed row: ``source``, 0-based ``row``, ``field`` (or ``None``) and a ``reason`` key."""

    def __init__(self, source: str, row: int, field: Optional[str], reason: str, detail: str, line: Optional[int] = None):
        self.source, self.row, self.field, self.reason, self.detail, self.line = source, row, field, reason, detail, line
        where = f"row {row} (0-based)" + (f", line {line}" if line is not None else "")
        what = f", field {field!r}" if field else ""
        super().__init__(f"{source}: {where}{what}: {detail} (skip_bad_rows: true skips such rows)")


@dataclass
class DataSummary:
    """What loading did: rows read, kept, skipped (by reason), truncated, per format."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_prompts: int = 0
    truncated_responses: int = 0
    formats: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "truncated_prompts": self.truncated_prompts,
            "truncated_responses": self.truncated_responses,
            "formats": dict(self.formats),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataSummary":
        """The inverse of :meth:`as_dict` (for a summary read back from ``summary.json``)."""
        return cls(**{**data, "skipped": Counter(data.get("skipped", {})), "formats": Counter(data.get("formats", {}))})

    def __str__(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.source}: {self.rows} rows, {self.kept} kept, skipped {sum(self.skipped.values())} ({skipped}); "
            f"truncated prompts {self.truncated_prompts}, responses {self.truncated_responses}"
        )


def describe_data(summaries: Mapping[str, Union[DataSummary, Mapping[str, Any]]],
                  pairs: Optional[Mapping[str, int]] = None) -> list[str]:
    """Lines for the run's output: ``data train: <file>: 100 rows, 98 kept, skipped 2 (...); truncated
    prompts 0, responses 3`` per loaded file (a :class:`DataSummary` or its :meth:`~DataSummary.as_dict`),
    then ``data pairs: train 93, held-out 5`` from ``pairs`` (name -> count) if given."""
    lines = [f"data {name}: {s if isinstance(s, DataSummary) else DataSummary.from_dict(s)}"
             for name, s in summaries.items()]
    if pairs:
        lines.append("data pairs: " + ", ".join(f"{name} {n}" for name, n in pairs.items()))
    return lines


# -- reading ----------------------------------------------------------------------------------------


@dataclass
class RawRow:
    """One record as read; ``value`` is the parsed object or a :class:`DatasetRowError` to raise/skip."""

    row: int
    value: Any
    line: Optional[int] = None


def dataset_path(spec: Union[str, Path], split: str = "train") -> Path:
    """``"demo"`` -> the shipped demo split; anything else -> ``Path(spec)``."""
    return demo_data_path(split) if str(spec) == "demo" else Path(spec)


def read_rows(path: Union[str, Path], *, split: Optional[str] = None) -> list[RawRow]:
    """Records of a JSONL or Parquet file or a saved ``datasets`` directory (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset: no such file or directory {str(path)!r}")
    if path.is_dir():
        return [RawRow(i, r) for i, r in enumerate(_read_datasets_dir(path, split))]
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [RawRow(i, r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise ValueError(
        f"dataset: unsupported file type {path.suffix!r} for {str(path)!r}; expected .jsonl, .ndjson, "
        ".parquet or a directory saved with datasets.Dataset.save_to_disk"
    )


def _read_jsonl(path: Path) -> list[RawRow]:
    rows: list[RawRow] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            i = len(rows)
            try:
                rows.append(RawRow(i, json.loads(line), lineno))
            except json.JSONDecodeError as exc:
                err = DatasetRowError(str(path), i, None, "invalid_json", f"invalid JSON ({exc.msg})", lineno)
                rows.append(RawRow(i, err, lineno))
    return rows


def _read_datasets_dir(path: Path, split: Optional[str]) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ValueError(f"dataset: {str(path)!r} is not a directory saved by datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise ValueError(f"dataset: {str(path)!r} has no split {name!r}; splits: {', '.join(loaded)}")
        loaded = loaded[name]
    elif split is not None:
        raise ValueError(f"dataset: {str(path)!r} is a single Dataset; split={split!r} does not apply")
    return loaded.to_list()


# -- validation -------------------------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, field: Optional[str], reason: str, detail: str):
        self.field, self.reason, self.detail = field, reason, detail


def _check_messages(name: str, value: Any, *, response: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad(name, "empty_response" if response and value == [] else "wrong_type",
                   f"expected a non-empty list of messages, got {_show(value)}")
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise _Bad(name, "bad_message", f"message {j}: expected a mapping with 'role' and 'content', got {_show(m)}")
        if not isinstance(m["role"], str):
            raise _Bad(name, "bad_message", f"message {j}: role must be a string, got {_show(m['role'])}")
        if not isinstance(m["content"], str):
            raise _Bad(name, "wrong_type", f"message {j}: content must be a string, got {_show(m['content'])}")
    if response:
        if any(m["role"] != "assistant" for m in value):
            raise _Bad(name, "bad_message", "response messages must have role 'assistant'")
        if not "".join(m["content"] for m in value).strip():
            raise _Bad(name, "empty_response", "empty response")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _split_implicit(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Prompt = the common start of chosen and rejected (messages, or characters)."""
    chosen, rejected = row["chosen"], row["rejected"]
    both_str = isinstance(chosen, str) and isinstance(rejected, str)
    if both_str or (isinstance(chosen, list) and isinstance(rejected, list)):
        n = _common_prefix(chosen, rejected)
        if both_str and n > 0 and chosen[n - 1] == " ":
            n -= 1  # the separating space starts the responses
        return chosen[:n], chosen[n:], rejected[n:]
    raise _Bad("chosen", "wrong_type", f"chosen and rejected must both be strings or both message lists, got "
               f"{type(chosen).__name__} and {type(rejected).__name__}")


def _loss_inputs(row: Mapping[str, Any], reader: Optional[ExampleInputs]) -> dict[str, Any]:
    """The row's per-example loss inputs, checked against the loss (:class:`ExampleInputs`)."""
    if not reader:
        return {}
    try:
        return reader.read(row)
    except ColumnError as exc:
        raise _Bad(exc.column, exc.reason, exc.detail) from None


def _normalize_row(row: Any, dataset_format: str = "auto") -> tuple[str, Any, Any, Any]:
    """``(format, prompt, chosen, rejected)`` of a valid row; raises ``_Bad`` (internal) otherwise."""
    if not isinstance(row, Mapping):
        raise _Bad(None, "not_a_mapping", f"expected a JSON object / mapping, got {_show(row)}")
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise _Bad(name, "missing_field", f"missing field {name!r}")
    if "prompt" in row and row["prompt"] is not None:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = _split_implicit(row)
    fmt = dataset_format
    if fmt == "auto":
        fmt = "conversational" if isinstance(chosen, list) or isinstance(prompt, list) else "standard"
    if fmt == "standard":
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise _Bad(name, "wrong_type", f"expected a string (standard format), got {_show(value)}")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise _Bad(name, "empty_response", "empty response")
        return fmt, prompt, chosen, rejected
    if fmt != "conversational":
        raise ValueError(f"dataset_format: expected one of {', '.join(FORMATS)}, got {dataset_format!r}")
    prompt = _check_messages("prompt", prompt, response=False) if prompt != [] else []
    return fmt, prompt, _check_messages("chosen", chosen, response=True), _check_messages("rejected", rejected, response=True)


# -- tokenization -----------------------------------------------------------------------------------


def _common_prefix(*seqs: Sequence[Any]) -> int:
    """Length of the longest common start of the sequences (token ids, characters or messages)."""
    n = 0
    while n < min(len(s) for s in seqs) and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _render(tokenizer: Any, messages: list[dict], *, generation: bool) -> str:
    kwargs: dict[str, Any] = {"tokenize": False}
    if generation:
        if messages and messages[-1]["role"] == "assistant":
            kwargs["continue_final_message"] = True  # a prefilled assistant turn the responses continue
        else:
            kwargs["add_generation_prompt"] = True
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (ValueError, TypeError) as exc:
        if "chat_template" in str(exc) or "chat template" in str(exc):
            raise ValueError(f"tokenizer: conversational data needs a chat template, and this tokenizer has none ({exc})") from None
        raise _Bad("prompt", "bad_message", f"the chat template rejected the messages: {exc}") from None


def _tokenize_pair(
    tokenizer: Any,
    fmt: str,
    prompt: Any,
    chosen: Any,
    rejected: Any,
) -> tuple[list[int], list[int], list[int]]:
    """Untruncated ``(prompt_ids, chosen_ids, rejected_ids)``, EOS appended to the responses."""
    encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    if fmt == "standard":
        texts = (prompt, prompt + chosen, prompt + rejected)
    else:
        texts = (
            _render(tokenizer, prompt, generation=True),
            _render(tokenizer, prompt + chosen, generation=False),
            _render(tokenizer, prompt + rejected, generation=False),
        )
    p_ids, pc_ids, pr_ids = (encode(t) for t in texts)
    n = _common_prefix(p_ids, pc_ids, pr_ids)
    prompt_ids, chosen_ids, rejected_ids = p_ids[:n], pc_ids[n:], pr_ids[n:]
    bos = getattr(tokenizer, "bos_token_id", None)
    if fmt == "standard" and bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos] + prompt_ids
    eos = tokenizer.eos_token_id
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if not ids:
            raise _Bad(name, "empty_response", "the response has no tokens of its own after tokenization")
        if ids[-1] != eos:
            ids.append(eos)
    if not prompt_ids:
        raise _Bad("prompt", "empty_prompt", "empty prompt and the tokenizer has no BOS token to condition on")
    return prompt_ids, chosen_ids, rejected_ids


def _truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    *,
    max_length: Optional[int],
    max_prompt_length: Optional[int],
    bos: Optional[int] = None,
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Apply the truncation rules; returns the ids and (prompt truncated, a response truncated).

    A prompt that starts with ``bos`` keeps it when cut: BOS + the last ``max_prompt_length - 1``
    tokens (a model with a BOS token saw it first in every training sequence; it is no part of the
    prompt's text).
    """
    cut_prompt = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if cut_prompt:
        head = prompt_ids[:1] if bos is not None and prompt_ids[0] == bos and max_prompt_length > 1 else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - max_prompt_length + len(head):]
    cut_resp = False
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise _Bad("prompt", "prompt_too_long",
                       f"prompt has {len(prompt_ids)} tokens, leaving no room for a response within max_length={max_length}")
        cut_resp = len(chosen_ids) > room or len(rejected_ids) > room
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return prompt_ids, chosen_ids, rejected_ids, cut_prompt, cut_resp


def tokenize_rows(
    rows: Sequence[RawRow],
    tokenizer: Any,
    *,
    source: str,
    dataset_format: str = "auto",
    max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None,
    skip_bad_rows: bool = False,
    loss_inputs: Optional[ExampleInputs] = None,
) -> tuple[list[Example], DataSummary]:
    """Validate and tokenize records; returns the examples (with their ``row``) and a summary.

    ``loss_inputs`` reads the loss's per-example inputs from the rows' columns into
    ``example["inputs"]``, checking each value's shape, type and range (:class:`ExampleInputs`); a
    value that does not fit, or a missing required column, makes the row bad.
    Raises :class:`DatasetRowError` on the first bad row unless ``skip_bad_rows``.
    """
    if dataset_format not in FORMATS:
        raise ValueError(f"dataset_format: expected one of {', '.join(FORMATS)}, got {dataset_format!r}")
    summary = DataSummary(source=source, rows=len(rows))
    examples: list[Example] = []
    for raw in rows:
        try:
            if isinstance(raw.value, DatasetRowError):
                raise raw.value
            fmt, prompt, chosen, rejected = _normalize_row(raw.value, dataset_format)
            ids = _tokenize_pair(tokenizer, fmt, prompt, chosen, rejected)
            p, c, r, cut_p, cut_r = _truncate_pair(*ids, max_length=max_length, max_prompt_length=max_prompt_length,
                                                   bos=getattr(tokenizer, "bos_token_id", None))
            inputs = _loss_inputs(raw.value, loss_inputs)
        except (_Bad, DatasetRowError) as exc:
            err = exc if isinstance(exc, DatasetRowError) else DatasetRowError(
                source, raw.row, exc.field, exc.reason, exc.detail, raw.line
            )
            if not skip_bad_rows:
                raise err from None
            summary.skipped[err.reason] += 1
            continue
        summary.formats[fmt] += 1
        summary.truncated_prompts += cut_p
        summary.truncated_responses += cut_r
        example = {"row": raw.row, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
        if inputs:
            example["inputs"] = inputs
        examples.append(example)
    summary.kept = len(examples)
    if not examples:
        raise ValueError(f"{source}: no usable rows ({summary})")
    return examples, summary


def load_preference_data(
    path: Union[str, Path],
    tokenizer: Any,
    *,
    split: Optional[str] = None,
    dataset_format: str = "auto",
    max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None,
    skip_bad_rows: bool = False,
    loss_inputs: Optional[ExampleInputs] = None,
) -> tuple[list[Example], DataSummary]:
    """:func:`read_rows` then :func:`tokenize_rows`; ``path="demo"`` reads the shipped ``split``."""
    resolved = dataset_path(path, split or "train")
    rows = read_rows(resolved, split=None if str(path) == "demo" else split)
    return tokenize_rows(
        rows,
        tokenizer,
        source=str(resolved),
        dataset_format=dataset_format,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        skip_bad_rows=skip_bad_rows,
        loss_inputs=loss_inputs,
    )


def load_train_eval(cfg: Any, tokenizer: Any) -> tuple[list[Example], list[Example], dict[str, DataSummary]]:
    """Train and held-out examples of a :class:`~pygpo.trainer.config.TrainConfig`.

    The held-out set is ``cfg.eval_dataset`` if given; else, for ``dataset: demo``, the demo's eval
    split (its first ``eval_size`` pairs if given; none with ``eval_fraction`` 0); else ``eval_size``
    rows (or ``eval_fraction`` of them) split off by ``seed``, none with ``eval_fraction`` 0.
    Returns ``(train, held_out, {"train": summary, "eval": summary})`` (no ``"eval"`` when split off
    or absent). One :class:`ExampleInputs` reads the loss inputs of both files.
    """
    options = dict(
        dataset_format=cfg.dataset_format,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        skip_bad_rows=cfg.skip_bad_rows,
        loss_inputs=ExampleInputs(cfg.loss_components(), cfg.loss_hparams()),
    )
    train, summary = load_preference_data(cfg.dataset, tokenizer, **options)
    summaries = {"train": summary}
    demo = str(cfg.dataset) == "demo" and cfg.eval_dataset is None
    if cfg.eval_dataset is None and not demo:
        train, held = train_eval_split(train, seed=cfg.seed, eval_size=cfg.eval_size, eval_fraction=cfg.eval_fraction)
        return train, held, summaries
    if demo and cfg.eval_size is None and cfg.eval_fraction == 0:
        return train, [], summaries
    source = "demo" if demo else cfg.eval_dataset
    held, summaries["eval"] = load_preference_data(source, tokenizer, split="eval" if source == "demo" else None,
                                                   **options)
    if demo and cfg.eval_size is not None:
        if cfg.eval_size > len(held):
            raise ValueError(f"eval_size: the demo's eval split has {len(held)} pairs, got {cfg.eval_size}")
        held = held[: cfg.eval_size]
    return train, held, summaries


# -- split and batches ------------------------------------------------------------------------------


def train_eval_split(
    examples: Sequence[Example], *, seed: int, eval_size: Optional[int] = None, eval_fraction: float = 0.0
) -> tuple[list[Example], list[Example]]:
    """Hold out ``eval_size`` examples (or ``eval_fraction`` of them, at least 1 when > 0), chosen by
    ``seed``; both parts keep the file order."""
    n = len(examples)
    n_eval = eval_size if eval_size is not None else (max(1, round(eval_fraction * n)) if eval_fraction > 0 else 0)
    if n_eval < 0 or (n_eval and n_eval >= n):
        if eval_size is not None:
            raise ValueError(
                f"eval_size: expected 0 <= eval_size < {n} (the dataset has {n} usable examples), got {eval_size}; "
                "use a smaller eval_size, or give eval_dataset"
            )
        raise ValueError(
            f"eval_fraction: {eval_fraction} of the dataset's {n} usable example(s) holds out {n_eval} (at least 1), "
            "leaving none to train on; use more data, eval_fraction 0 (no held-out evaluation), or give eval_dataset"
        )
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


class BatchIterator:
    """Batches of examples, reshuffled every epoch by ``(seed, epoch)``; resumable mid-epoch.

    ``next_batch()`` returns the next list of up to ``batch_size`` examples and rolls over to the
    next epoch at the end (the last batch of an epoch is smaller unless ``drop_last``);
    ``len(it)`` is the number of batches per epoch. ``state_dict()`` = ``{"epoch", "position", ...}``
    where ``position`` counts examples already served in the epoch.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
        if not examples or (drop_last and len(examples) < batch_size):
            raise ValueError(f"examples: need at least {batch_size if drop_last else 1} examples, got {len(examples)}")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __len__(self) -> int:
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _epoch_end(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.examples)

    def next_batch(self) -> list[Example]:
        if self.position >= self._epoch_end():
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.position: min(self.position + self.batch_size, self._epoch_end())]
        self.position += len(idx)
        return [self.examples[i] for i in idx]

    def __iter__(self) -> Iterator[list[Example]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue where ``state`` left off; the data, seed and batch size must be the same."""
        for key in ("seed", "num_examples", "batch_size"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"state_dict: {key} was {state[key]}, this iterator has {self.state_dict()[key]}; "
                                 "resume with the same data, seed and batch_size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)


def iter_batches(examples: Sequence[Example], batch_size: int) -> Iterator[list[Example]]:
    """Consecutive batches in order, once (for evaluation)."""
    for i in range(0, len(examples), batch_size):
        yield list(examples[i: i + batch_size])
