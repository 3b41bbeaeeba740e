"""``ResponseLayout``: which scored token belongs to which response, and where it sits in ``(B, K, T)``.

The fused loss scores the *completion tokens* of ``B * K`` responses (``K`` per example: 2 for a
preference pair, chosen first; 1 for unpaired data; ``K`` for multi-response losses). Its inputs come
in three forms, all reduced here to one description:

* **rows** - ``hidden (R, T, D)``, ``labels (R, T)`` (already shifted: ``labels[r, t]`` is the token
  predicted from ``hidden[r, t]``), ``-100`` on prompt and padding. Row ``r`` is response
  ``response_index[r]``; by default the rows are rank-major, ``row = k * B + b`` (for ``K = 2`` the
  concatenated layout of TRL: all chosen rows, then all rejected rows).
* **tokens** - ``hidden (N, D)``, ``labels (N,)`` and ``response_index (N,)``: the response of each row.
* **prefix** - a :class:`pygpo.prefix.PrefixBatch`: its targets, responses, examples and ranks.

Response ids are ``b * K + k`` (example ``b``, rank ``k``). The ``M`` valid tokens (label not
``ignore_index``) keep their order within a response, which is their position ``t`` in ``(B, K, T)``;
``T`` is the longest response. :meth:`ResponseLayout.dense` scatters per-token values there,
differentiably, with zeros elsewhere; :attr:`mask` marks the real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor

from ..ops.token_rows import RowSelection, nonzero_rows
from ..ops.transfer import to_device
from ..ops.validation import host_ints, label_counts, raise_label_range
from ..prefix.batch import PrefixBatch


class ResponseIndexError(ValueError):
    """The response index does not describe the batch (shape, range, or a response without tokens)."""


def _int_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(x).__name__}")
    if not _is_integer(x):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x


@dataclass(frozen=True)
class ResponseLayout:
    """Valid tokens of a batch of ``B * K`` responses and their place in ``(B, K, T)``.

    Attributes:
        token_index: ``(M,)`` int64 positions of the valid tokens in the flattened labels.
        token_response: ``(M,)`` int64 response id ``b * K + k`` of each valid token.
        token_position: ``(M,)`` int64 position ``t`` of each valid token within its response.
        lengths: ``(B, K)`` int64 completion-token count of every response (0 where absent).
        present: ``(B, K)`` bool, responses that exist (all, except in a prefix batch with varying K).
        num_labels: number of label positions (the flattened labels' length).
        max_length: ``T``, the longest response's token count (at least 1), a host int.
        host_lengths: ``lengths`` flattened (response id ``b * K + k``) as host ints.
        all_present: whether every one of the ``B * K`` responses exists, a host int read with the rest.
        labels_vocab: the vocabulary size the labels were range-checked against while the layout was
            built (``None``: not checked; the fused passes then check them).

    The host values (``M``, ``T``, ...) come from one device read when the layout is built
    (:func:`_build`), so nothing downstream synchronises to learn a shape.
    """

    token_index: Tensor
    token_response: Tensor
    token_position: Tensor
    lengths: Tensor
    present: Tensor
    num_labels: int
    max_length: int = 1
    host_lengths: tuple[int, ...] = ()
    all_present: bool = True
    labels_vocab: Optional[int] = None

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def responses_per_example(self) -> int:
        return int(self.lengths.shape[1])

    @cached_property
    def mask(self) -> Tensor:
        """``(B, K, T)`` bool: True at completion tokens."""
        t = torch.arange(self.max_length, device=self.lengths.device)
        return t < self.lengths[..., None]

    def dense(self, values: Tensor) -> Tensor:
        """``(B, K, T)`` from per-valid-token ``values (M,)``: zeros off the mask; differentiable."""
        b, k, t = self.batch_size, self.responses_per_example, self.max_length
        out = values.new_zeros(b * k, t)
        out = out.index_put((self.token_response, self.token_position), values)
        return out.view(b, k, t)

    def rows(self, labels: Tensor) -> Optional[tuple[RowSelection, Tensor]]:
        """The valid rows of ``labels`` for the fused passes (:func:`pygpo.ops.token_rows.select_rows`'s
        order) with their labels, when the layout has range-checked them; else ``None`` (the pass checks)."""
        if self.labels_vocab is None:
            return None
        flat = labels.reshape(-1)
        return RowSelection(self.token_index, flat.numel(), labels.shape), flat.index_select(0, self.token_index).long()

    def valid(self, per_label: Tensor) -> Tensor:
        """``(M,)``: the valid tokens' entries of a tensor of the labels' shape."""
        return per_label.reshape(-1).index_select(0, self.token_index.to(per_label.device))

    def to(self, device: torch.device) -> "ResponseLayout":
        return replace(
            self, token_index=self.token_index.to(device), token_response=self.token_response.to(device),
            token_position=self.token_position.to(device), lengths=self.lengths.to(device),
            present=self.present.to(device),
        )


def _is_integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _positions(response: Tensor, counts: Tensor) -> Tensor:
    """Rank of each token among its response's tokens (stable order), given the token count per response."""
    order = torch.sort(response, stable=True).indices
    starts = counts.cumsum(0) - counts
    pos_sorted = torch.arange(response.numel(), device=response.device) - starts[response[order]]
    pos = torch.empty_like(response)
    pos[order] = pos_sorted
    return pos


def _build(
    valid_labels: Tensor, token_response: Tensor, batch_size: int, k: int, present: Optional[Tensor], *, what: str,
    labels: Optional[Tensor] = None, vocab: Optional[int] = None, ignore_index: int = -100,
) -> ResponseLayout:
    """Layout from the flattened labels' validity and each label position's response id.

    With ``labels`` and ``vocab``, the labels' range check rides along: one device read gives the token
    count of every response (hence ``M`` and ``T``), the empty and absent responses and the labels out of
    range (errors, in that order, are raised after it).
    """
    n_resp = batch_size * k
    counts = torch.zeros(n_resp, dtype=torch.int64, device=valid_labels.device)
    counts.index_add_(0, token_response, valid_labels.to(torch.int64))  # bincount would read its max back
    lengths = counts.view(batch_size, k)
    if present is None:
        present = torch.ones(batch_size, k, dtype=torch.bool, device=lengths.device)
    empty = present & (lengths == 0)
    # integer labels only: other dtypes are refused, with their own message, by the fused passes' checks
    check = labels is not None and vocab is not None and _is_integer(labels)
    n_bad = label_counts(labels, vocab, ignore_index=ignore_index)[1] if check else counts.new_zeros(())
    *host_lengths, n_empty, n_absent, n_bad = host_ints(counts, empty.sum(), (~present).sum(), n_bad)
    n_valid = sum(host_lengths)
    if n_empty:
        b, r = (int(x) for x in empty.nonzero()[0])
        raise ResponseIndexError(
            f"response {r} of example {b} has no target token (every label of its {what} is ignore_index); "
            "every response needs at least one completion token"
        )
    if n_bad:
        raise_label_range(labels, vocab, ignore_index=ignore_index)
    if n_valid == valid_labels.numel():
        token_index = torch.arange(n_valid, device=valid_labels.device)
    else:
        token_index = nonzero_rows(valid_labels, n_valid)
    response = token_response.index_select(0, token_index)
    return ResponseLayout(token_index, response, _positions(response, counts), lengths, present,
                          int(valid_labels.numel()), max(max(host_lengths, default=1), 1), tuple(host_lengths),
                          n_absent == 0, vocab if check else None)


def layout_from_rows(
    labels: Tensor, response_index: Optional[Tensor], *, responses_per_example: int, ignore_index: int,
    vocab: Optional[int] = None,
) -> ResponseLayout:
    """Layout of ``labels (R, T)`` whose row ``r`` is response ``response_index[r]`` (``b * K + k``).

    ``response_index=None`` means rank-major rows: ``row = k * B + b``. ``vocab``: range-check the
    labels while building (see :func:`_build`).
    """
    k = int(responses_per_example)
    rows = labels.shape[0]
    if rows % k:
        raise ResponseIndexError(
            f"labels have {rows} rows, which is not a multiple of responses_per_example={k}; for pairs pass "
            "the chosen rows then the rejected rows (2B rows), or give response_index"
        )
    b = rows // k
    dev = labels.device
    if response_index is None:
        slot = torch.arange(rows, device=dev)
        row_response = (slot % b) * k + slot // b
    else:
        row_response = _int_tensor("response_index", response_index).to(dev).long()
        if row_response.shape != (rows,):
            raise ResponseIndexError(
                f"response_index must have one entry per row of labels, shape ({rows},), got {tuple(row_response.shape)}"
            )
        outside = (row_response < 0) | (row_response >= rows)
        # a permutation of [0, rows) names every id once: count the ids in range, one device read for both checks
        seen = torch.zeros(rows, dtype=torch.int64, device=dev)
        seen.index_add_(0, row_response.clamp(0, rows - 1), (~outside).to(torch.int64))
        n_outside, n_repeated = host_ints(outside.sum(), (seen > 1).sum())
        if n_outside:
            raise ResponseIndexError(f"response_index values must lie in [0, {rows}) (response id = example * K + rank)")
        if n_repeated:
            raise ResponseIndexError("response_index must name every response exactly once (found a repeated id)")
    token_response = row_response[:, None].expand(rows, labels.shape[1]).reshape(-1)
    return _build(labels.reshape(-1) != ignore_index, token_response, b, k, None, what="row",
                  labels=labels, vocab=vocab, ignore_index=ignore_index)


def layout_from_tokens(
    labels: Tensor, response_index: Optional[Tensor], *, responses_per_example: int, ignore_index: int,
    num_examples: Optional[int] = None, vocab: Optional[int] = None,
) -> ResponseLayout:
    """Layout of token rows ``labels (N,)`` whose row ``i`` belongs to response ``response_index[i]``.

    ``num_examples`` states ``B``; without it ``B`` is the largest response id at a scored row over ``K``
    (rounded up), and an id beyond it at an ignored row raises (that response has no target token).
    Every one of the ``B * K`` responses needs a target token, as in the rows form.
    """
    if response_index is None:
        raise ResponseIndexError(
            "token-row inputs (hidden (N, D), labels (N,)) need response_index (N,): the response id "
            "example * K + rank of each row (or pass batch= for a PrefixBatch)"
        )
    idx = _int_tensor("response_index", response_index).to(labels.device).long()
    if idx.shape != labels.shape:
        raise ResponseIndexError(
            f"response_index must have the labels' shape {tuple(labels.shape)}, got {tuple(idx.shape)}"
        )
    k = int(responses_per_example)
    valid = labels != ignore_index
    # one device read: negative ids at scored rows, the largest id at a scored row and at an ignored row
    none = torch.full((), -1, dtype=torch.int64, device=idx.device)
    n_negative, top_valid, top_ignored = host_ints(
        (valid & (idx < 0)).sum(), torch.where(valid, idx, none).amax() if idx.numel() else none,
        torch.where(valid, none, idx).amax() if idx.numel() else none)
    if n_negative:
        raise ResponseIndexError("response_index is negative at a scored token (ignored rows may hold -1 or an id of the batch)")
    n_resp = top_valid + 1
    if num_examples is None:
        num_examples = -(-n_resp // k)
        # an id held only by rows without a target token: a response (or a whole example) with nothing to
        # score, which inferring B from the scored rows would silently drop
        if top_ignored >= num_examples * k:
            r = top_ignored
            raise ResponseIndexError(
                f"response_index names response {r} (example {r // k}, rank {r % k}) only at rows whose label is "
                f"ignore_index: it has no target token, and every response needs at least one completion token "
                f"(pass num_examples= to state the batch size; give padding rows -1)"
            )
    elif n_resp > num_examples * k:
        raise ResponseIndexError(f"response_index holds id {n_resp - 1}, beyond {num_examples} examples x {k} responses")
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    return _build(valid, safe, num_examples, k, None, what="rows", labels=labels, vocab=vocab,
                  ignore_index=ignore_index)


def layout_from_prefix_batch(batch: PrefixBatch, labels: Tensor, *, ignore_index: int,
                             vocab: Optional[int] = None) -> ResponseLayout:
    """Layout of the targets of ``batch`` (``labels`` are its target labels, possibly with ignored rows).

    ``K`` is read from the batch's layout, whose tables stay on the host (``pack`` ranks the responses of
    a document ``0..K_d - 1``), so a batch moved to the GPU is not read back for it; host tensors of the
    batch are copied to ``labels``' device without a host sync (:func:`pygpo.ops.transfer.to_device`).
    ``vocab``: range-check the labels while building (see :func:`_build`).
    """
    if labels.shape != batch.target_index.shape:
        raise ResponseIndexError(
            f"labels must have one entry per target of the PrefixBatch, shape {tuple(batch.target_index.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    dev = labels.device
    k = int(torch.bincount(batch.layout.resp_doc).max())
    slot = to_device(batch._example_slot(), dev)
    resp_id = slot * k + to_device(batch.response_rank, dev)
    present = torch.zeros(batch.num_examples * k, dtype=torch.bool, device=dev)
    present[resp_id] = True
    token_response = resp_id.index_select(0, to_device(batch.target_response, dev))
    return _build(labels != ignore_index, token_response, batch.num_examples, k,
                  present.view(batch.num_examples, k), what="targets", labels=labels, vocab=vocab,
                  ignore_index=ignore_index)
