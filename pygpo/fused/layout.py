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

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch
from torch import Tensor

from ..prefix.batch import PrefixBatch


class ResponseIndexError(ValueError):
    """The response index does not describe the batch (shape, range, or a response without tokens)."""


def _int_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
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
    """

    token_index: Tensor
    token_response: Tensor
    token_position: Tensor
    lengths: Tensor
    present: Tensor
    num_labels: int

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def responses_per_example(self) -> int:
        return int(self.lengths.shape[1])

    @property
    def max_length(self) -> int:
        return max(int(self.lengths.max()), 1) if self.lengths.numel() else 1

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

    def valid(self, per_label: Tensor) -> Tensor:
        """``(M,)``: the valid tokens' entries of a tensor of the labels' shape."""
        return per_label.reshape(-1).index_select(0, self.token_index.to(per_label.device))

    def to(self, device: torch.device) -> "ResponseLayout":
        return ResponseLayout(
            self.token_index.to(device), self.token_response.to(device), self.token_position.to(device),
            self.lengths.to(device), self.present.to(device), self.num_labels,
        )


def _positions(response: Tensor, num_responses: int) -> tuple[Tensor, Tensor]:
    """Rank of each token among its response's tokens (stable order), and the token count per response."""
    counts = torch.bincount(response, minlength=num_responses)
    order = torch.sort(response, stable=True).indices
    starts = counts.cumsum(0) - counts
    pos_sorted = torch.arange(response.numel(), device=response.device) - starts[response[order]]
    pos = torch.empty_like(response)
    pos[order] = pos_sorted
    return pos, counts


def _build(
    valid_labels: Tensor, token_response: Tensor, batch_size: int, k: int, present: Optional[Tensor], *, what: str
) -> ResponseLayout:
    """Layout from the flattened labels' validity and each label position's response id."""
    token_index = valid_labels.nonzero()[:, 0]
    response = token_response.index_select(0, token_index)
    pos, counts = _positions(response, batch_size * k)
    lengths = counts.view(batch_size, k)
    if present is None:
        present = torch.ones(batch_size, k, dtype=torch.bool, device=lengths.device)
    empty = present & (lengths == 0)
    if bool(empty.any()):
        b, r = (int(x) for x in empty.nonzero()[0])
        raise ResponseIndexError(
            f"response {r} of example {b} has no target token (every label of its {what} is ignore_index); "
            "every response needs at least one completion token"
        )
    return ResponseLayout(token_index, response, pos, lengths, present, int(valid_labels.numel()))


def layout_from_rows(
    labels: Tensor, response_index: Optional[Tensor], *, responses_per_example: int, ignore_index: int
) -> ResponseLayout:
    """Layout of ``labels (R, T)`` whose row ``r`` is response ``response_index[r]`` (``b * K + k``).

    ``response_index=None`` means rank-major rows: ``row = k * B + b``.
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
        if bool(((row_response < 0) | (row_response >= rows)).any()):
            raise ResponseIndexError(f"response_index values must lie in [0, {rows}) (response id = example * K + rank)")
        if torch.unique(row_response).numel() != rows:
            raise ResponseIndexError("response_index must name every response exactly once (found a repeated id)")
    token_response = row_response[:, None].expand(rows, labels.shape[1]).reshape(-1)
    return _build(labels.reshape(-1) != ignore_index, token_response, b, k, None, what="row")


def layout_from_tokens(
    labels: Tensor, response_index: Optional[Tensor], *, responses_per_example: int, ignore_index: int,
    num_examples: Optional[int] = None,
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
    if bool((idx[valid] < 0).any()):
        raise ResponseIndexError("response_index is negative at a scored token (ignored rows may hold -1 or an id of the batch)")
    n_resp = int(idx[valid].max()) + 1 if bool(valid.any()) else 0
    if num_examples is None:
        num_examples = -(-n_resp // k)
        # an id held only by rows without a target token: a response (or a whole example) with nothing to
        # score, which inferring B from the scored rows would silently drop
        beyond = (idx >= num_examples * k) & ~valid
        if bool(beyond.any()):
            r = int(idx[beyond].max())
            raise ResponseIndexError(
                f"response_index names response {r} (example {r // k}, rank {r % k}) only at rows whose label is "
                f"ignore_index: it has no target token, and every response needs at least one completion token "
                f"(pass num_examples= to state the batch size; give padding rows -1)"
            )
    elif n_resp > num_examples * k:
        raise ResponseIndexError(f"response_index holds id {n_resp - 1}, beyond {num_examples} examples x {k} responses")
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    return _build(valid, safe, num_examples, k, None, what="rows")


def layout_from_prefix_batch(batch: PrefixBatch, labels: Tensor, *, ignore_index: int) -> ResponseLayout:
    """Layout of the targets of ``batch`` (``labels`` are its target labels, possibly with ignored rows)."""
    if labels.shape != batch.target_index.shape:
        raise ResponseIndexError(
            f"labels must have one entry per target of the PrefixBatch, shape {tuple(batch.target_index.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    dev = labels.device
    k = int(batch.response_rank.max()) + 1
    slot = batch._example_slot().to(dev)
    resp_id = slot * k + batch.response_rank.to(dev)
    present = torch.zeros(batch.num_examples * k, dtype=torch.bool, device=dev)
    present[resp_id] = True
    token_response = resp_id.index_select(0, batch.target_response.to(dev))
    return _build(labels != ignore_index, token_response, batch.num_examples, k,
                  present.view(batch.num_examples, k), what="targets")
