"""``pack``: prompts and their K responses -> one prefix-shared :class:`PrefixBatch`.

Every example becomes one document ``[prompt | response_1 | ... | response_K]`` (the layout of
"Accelerating Direct Preference Optimization with Prefix Sharing", Wang & Hegde, 2024). Without
``max_tokens`` each document gets its own row. With ``max_tokens`` several documents share a row,
placed by *first-fit decreasing*: documents sorted by length, longest first, each into the first row
that still has room (at most 11/9 OPT + 6/9 rows, Dosa 2007).

Examples longer than ``max_tokens`` follow ``truncation``:

* ``"error"`` (default): ``ValueError`` naming the example;
* ``"keep_start"``: responses are cut to a common cap ``L`` (the largest with
  ``P + sum_k min(R_k, L) <= max_tokens``), keeping their first tokens; an example whose prompt plus one
  token per response does not fit is dropped. Both are counted in the batch
  (``truncated_responses``, ``truncated_tokens``, ``dropped_examples``).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .batch import PrefixBatch
from .layout import PrefixLayout

TRUNCATION_POLICIES = ("error", "keep_start")


def _token_list(name: str, seq: Any) -> list[int]:
    """``seq`` (a 1-D integer tensor or a sequence of ints) as a list of non-negative ints."""
    if isinstance(seq, Tensor):
        if seq.dim() != 1 or seq.dtype.is_floating_point or seq.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {seq.dtype} {tuple(seq.shape)}")
        seq = seq.tolist()
    if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__"):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(seq).__name__}")
    out = []
    for x in seq:
        if isinstance(x, bool) or not hasattr(x, "__index__"):  # ints, numpy / torch integer scalars
            raise TypeError(f"{name} must hold integer token ids, got {type(x).__name__}")
        if int(x) < 0:
            raise ValueError(f"{name} holds a negative token id ({int(x)})")
        out.append(int(x))
    return out


def _check_int(name: str, value: Any, least: int, alternative: str = "") -> None:
    """``value`` must be an integer type (not merely ``int()``-able: 4.7 would silently become 4) ``>= least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        kind = "a positive int" if least == 1 else f"an int >= {least}"
        raise ValueError(f"{name} must be {kind}{alternative}, got {value!r}")


def _cap_responses(prompt_len: int, lens: list[int], budget: int) -> list[int]:
    """Largest common cap ``L`` with ``prompt_len + sum(min(R, L)) <= budget``, applied to ``lens``."""
    room = budget - prompt_len
    lo, hi = 1, max(lens)
    while lo < hi:  # largest L in [1, max(lens)] with sum(min(R, L)) <= room
        mid = (lo + hi + 1) // 2
        if sum(min(r, mid) for r in lens) <= room:
            lo = mid
        else:
            hi = mid - 1
    return [min(r, lo) for r in lens]


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (rows) of item indices; items sorted by decreasing length, each in the first bin with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int]]],
    *,
    max_tokens: Optional[int] = None,
    truncation: str = "error",
    min_responses: int = 2,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
) -> PrefixBatch:
    """Pack ``prompts[i]`` with its responses ``responses[i] = [y_1, ..., y_K]`` into shared rows.

    Args:
        prompts: ``E`` non-empty sequences (lists or 1-D integer tensors) of token ids.
        responses: ``E`` lists of ``K_i >= min_responses`` non-empty token-id sequences; ``K`` may differ
            per example. For DPO pass ``[chosen, rejected]``.
        max_tokens: row capacity; several examples share a row (first-fit decreasing). ``None``: one
            example per row.
        truncation: ``"error"`` or ``"keep_start"`` for examples longer than ``max_tokens`` (module docstring).
        min_responses: smallest ``K`` accepted (2: a preference pair; 1 gives unshared sequences, used by
            the benchmark as the baseline).
        pad_token_id: id written on padding.
        pad_to_multiple_of: round the row length ``S`` up to a multiple of this (which may take ``S`` past
            ``max_tokens``: ``max_tokens`` bounds the tokens of a row, the rounding adds padding after them).

    Returns:
        A :class:`PrefixBatch`; ``S`` is the longest row (rounded up), ``B`` the number of rows.

    Raises:
        ValueError: empty prompt or response, fewer than ``min_responses`` responses, mismatched
            lengths, ``max_tokens`` smaller than an example under ``truncation="error"``, nothing left.
        TypeError: token ids that are not integers.
    """
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError(f"prompts must be a sequence of token-id sequences, got {type(prompts).__name__}")
    if isinstance(responses, (str, bytes)) or not hasattr(responses, "__len__"):
        raise TypeError(f"responses must be a sequence of lists of responses, got {type(responses).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to pack")
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    _check_int("min_responses", min_responses, 1)
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 1, " or None")
    _check_int("pad_to_multiple_of", pad_to_multiple_of, 1)
    _check_int("pad_token_id", pad_token_id, 0)  # a negative id would fail inside the embedding lookup

    examples: list[tuple[int, list[int], list[list[int]]]] = []
    dropped: list[int] = []
    truncated_responses = truncated_tokens = 0
    for i, (prompt, resp) in enumerate(zip(prompts, responses)):
        p = _token_list(f"prompts[{i}]", prompt)
        if not p:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if isinstance(resp, (str, bytes)) or isinstance(resp, Tensor) or not hasattr(resp, "__len__"):
            raise TypeError(f"responses[{i}] must be a list of token-id sequences, got {type(resp).__name__}")
        if len(resp) < min_responses:
            raise ValueError(
                f"responses[{i}] has {len(resp)} response(s); prefix sharing needs at least {min_responses} "
                f"per prompt (K >= {min_responses}, e.g. [chosen, rejected])"
            )
        rs = [_token_list(f"responses[{i}][{k}]", r) for k, r in enumerate(resp)]
        for k, r in enumerate(rs):
            if not r:
                raise ValueError(f"responses[{i}][{k}] is empty: every response needs at least one token")
        total = len(p) + sum(len(r) for r in rs)
        if max_tokens is not None and total > max_tokens:
            if truncation == "error":
                raise ValueError(
                    f"max_tokens={max_tokens} is smaller than example {i} ({len(p)} prompt + "
                    f"{total - len(p)} response tokens = {total}); raise max_tokens or pass truncation='keep_start'"
                )
            if len(p) + len(rs) > max_tokens:
                dropped.append(i)
                continue
            capped = _cap_responses(len(p), [len(r) for r in rs], int(max_tokens))
            truncated_responses += sum(c < len(r) for c, r in zip(capped, rs))
            truncated_tokens += sum(len(r) - c for c, r in zip(capped, rs))
            rs = [r[:c] for r, c in zip(rs, capped)]
        examples.append((i, p, rs))
    if not examples:
        raise ValueError(
            f"every example was dropped: no prompt fits max_tokens={max_tokens} with one token per response"
        )

    lengths = [len(p) + sum(len(r) for r in rs) for _, p, rs in examples]
    if max_tokens is None:
        rows = [[e] for e in range(len(examples))]
    else:
        rows = _first_fit_decreasing(lengths, int(max_tokens))
    return _assemble(examples, rows, tuple(dropped), truncated_responses, truncated_tokens,
                     int(pad_token_id), int(pad_to_multiple_of))


def _assemble(
    examples: list[tuple[int, list[int], list[list[int]]]],
    rows: list[list[int]],
    dropped: tuple[int, ...],
    truncated_responses: int,
    truncated_tokens: int,
    pad_token_id: int,
    pad_to_multiple_of: int,
) -> PrefixBatch:
    """Write the rows' tokens, the layout and the targets (examples keep caller order in the response index)."""
    longest = max(sum(len(examples[e][1]) + sum(len(r) for r in examples[e][2]) for e in row) for row in rows)
    seq_len = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    ids = torch.full((B, seq_len), pad_token_id, dtype=torch.int64)

    # Where each example lands: (row, start offset).
    place: dict[int, tuple[int, int]] = {}
    for b, row in enumerate(rows):
        offset = 0
        for e in row:
            _, p, rs = examples[e]
            place[e] = (b, offset)
            tokens = p + [t for r in rs for t in r]
            ids[b, offset:offset + len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
            offset += len(tokens)

    # Documents, responses and targets in caller order (examples are already ascending).
    doc_row, doc_start, prompt_len = [], [], []
    resp_doc, resp_start, resp_len, resp_example, resp_rank = [], [], [], [], []
    t_index: list[int] = []
    t_labels: list[int] = []
    t_resp: list[int] = []
    for d, (orig, p, rs) in enumerate(examples):
        b, start = place[d]
        doc_row.append(b)
        doc_start.append(start)
        prompt_len.append(len(p))
        last_prompt_row = b * seq_len + start + len(p) - 1
        offset = start + len(p)
        for k, r in enumerate(rs):
            rid = len(resp_doc)
            resp_doc.append(d)
            resp_start.append(offset)
            resp_len.append(len(r))
            resp_example.append(orig)
            resp_rank.append(k)
            # y_0 is read at the last prompt row, y_t at the row of y_{t-1}.
            t_index.append(last_prompt_row)
            t_index.extend(range(b * seq_len + offset, b * seq_len + offset + len(r) - 1))
            t_labels.extend(r)
            t_resp.extend([rid] * len(r))
            offset += len(r)

    # Rows were filled in placement order; the layout needs documents sorted by (row, start) only for
    # overlap checks, which it does itself. Responses are grouped by document, as required.
    layout = PrefixLayout(B, seq_len, doc_row, doc_start, prompt_len, resp_doc, resp_start, resp_len)
    as_long = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return PrefixBatch(
        input_ids=ids,
        position_ids=layout.position_ids("cpu").clone(),
        layout=layout,
        target_index=as_long(t_index),
        target_labels=as_long(t_labels),
        target_response=as_long(t_resp),
        response_example=as_long(resp_example),
        response_rank=as_long(resp_rank),
        response_lengths=as_long(resp_len),
        prompt_lengths=as_long(prompt_len),
        example_index=as_long([orig for orig, _, _ in examples]),
        dropped_examples=dropped,
        truncated_responses=truncated_responses,
        truncated_tokens=truncated_tokens,
    )
