"""``PrefixBatch``: the tensors of a prefix-shared batch, its target index set and its statistics.

The *targets* of a response ``y = (y_0, ..., y_{R-1})`` that follows a prompt ending at row offset
``e = start + P - 1`` and starts at offset ``r`` are the hidden-state rows whose next token is one of its
tokens:

    row(y_0) = e          (the last prompt row: no duplicated prompt token is inserted)
    row(y_t) = r + t - 1  (t >= 1)

so the log-probability of the response is ``sum_t log softmax(h[row(y_t)] W^T)[y_t]``, the same sum as in
an unshared ``prompt + response`` sequence. ``target_index`` holds flat rows ``b * S + offset`` of the
``(B * S, D)`` hidden states, ``target_labels`` the tokens and ``target_response`` the response each
target belongs to, so that per-response sums are one ``index_add``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .layout import PrefixLayout


@dataclass(frozen=True)
class PrefixStats:
    """Token accounting of a :class:`PrefixBatch` (all counts after truncation).

    ``tokens_unshared = sum over responses of (P + R)``, what ``K`` separate ``prompt + response`` sequences
    hold; ``tokens_shared = sum over examples of (P + sum_k R_k)``; ``ratio = tokens_unshared /
    tokens_shared`` is the ceiling of the speed-up from sharing (for K=2: ``(2P + Rc + Rr) / (P + Rc + Rr)``).
    ``padded_tokens = rows * seq_len`` counts the padding too.
    """

    examples: int
    responses: int
    rows: int
    seq_len: int
    tokens_unshared: int
    tokens_shared: int
    padded_tokens: int
    ratio: float
    padding_fraction: float
    dropped_examples: int
    truncated_responses: int
    truncated_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, eq=False)
class PrefixBatch:
    """A packed, prefix-shared batch (build it with :func:`pygpo.prefix.pack`).

    Attributes:
        input_ids: ``(B, S)`` int64 token ids, ``pad_token_id`` on padding.
        position_ids: ``(B, S)`` int64; every response continues from its prompt length ``P``.
        layout: the :class:`PrefixLayout` (pass it to the attention / the model).
        target_index: ``(N,)`` int64 flat rows ``b * S + offset`` of the hidden states to score.
        target_labels: ``(N,)`` int64 the next token read at each target row.
        target_response: ``(N,)`` int64 response of each target, in ``[0, num_responses)``.
        response_example: ``(n_resp,)`` int64 index of the response's example in the caller's input.
        response_rank: ``(n_resp,)`` int64 position ``k`` of the response among its example's responses.
        response_lengths: ``(n_resp,)`` int64 response lengths after truncation.
        prompt_lengths: ``(E,)`` int64 prompt length of each kept example.
        example_index: ``(E,)`` int64 caller indices of the kept examples, ascending; responses are ordered
            by example, then by rank.
        dropped_examples: caller indices of examples dropped because the prompt alone did not fit.
        truncated_responses: number of responses shortened by the ``keep_start`` policy.
        truncated_tokens: number of response tokens removed by it.
    """

    input_ids: Tensor
    position_ids: Tensor
    layout: PrefixLayout
    target_index: Tensor
    target_labels: Tensor
    target_response: Tensor
    response_example: Tensor
    response_rank: Tensor
    response_lengths: Tensor
    prompt_lengths: Tensor
    example_index: Tensor
    dropped_examples: tuple[int, ...] = ()
    truncated_responses: int = 0
    truncated_tokens: int = 0

    @property
    def num_examples(self) -> int:
        return int(self.example_index.numel())

    @property
    def num_responses(self) -> int:
        return int(self.response_example.numel())

    @property
    def responses_per_example(self) -> Tensor:
        """``(E,)`` int64 number of responses ``K`` of each kept example."""
        return torch.bincount(self._example_slot(), minlength=self.num_examples)

    def _example_slot(self) -> Tensor:
        """``(n_resp,)`` position of each response's example among the kept examples (0..E-1)."""
        return torch.searchsorted(self.example_index.to(self.response_example.device), self.response_example)

    def stats(self) -> PrefixStats:
        """Tokens before and after sharing, their ratio, padding and truncation counts."""
        slot = self._example_slot().cpu()
        prompts = self.prompt_lengths.cpu()
        lens = self.response_lengths.cpu()
        unshared = int((prompts[slot] + lens).sum())
        shared = int(prompts.sum() + lens.sum())
        padded = int(self.input_ids.numel())
        return PrefixStats(
            examples=self.num_examples,
            responses=self.num_responses,
            rows=int(self.input_ids.shape[0]),
            seq_len=int(self.input_ids.shape[1]),
            tokens_unshared=unshared,
            tokens_shared=shared,
            padded_tokens=padded,
            ratio=unshared / shared,
            padding_fraction=1.0 - shared / padded,
            dropped_examples=len(self.dropped_examples),
            truncated_responses=self.truncated_responses,
            truncated_tokens=self.truncated_tokens,
        )

    def gather(self, hidden: Tensor, *, name: str = "hidden") -> Tensor:
        """``(N, D)`` rows of ``hidden`` ``(B, S, D)`` at the targets (the rows to feed the lm_head); ``name``
        names ``hidden`` in errors."""
        if not isinstance(hidden, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(hidden).__name__}")
        self.layout.check_shape(name, hidden.shape, 0, 1)
        if hidden.dim() != 3:
            raise ValueError(f"{name} must have shape (B, S, D) = ({self.layout.batch_size}, {self.layout.seq_len}, D), "
                             f"one row per token of the packed batch, got {tuple(hidden.shape)}")
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.target_index.to(hidden.device))

    def response_sums(self, token_values: Tensor) -> Tensor:
        """``(n_resp,)``: ``sum`` of ``token_values`` ``(N,)`` over each response's targets (differentiable)."""
        if token_values.shape != self.target_index.shape:
            raise ValueError(
                f"token_values must have one value per target, shape {tuple(self.target_index.shape)}, "
                f"got {tuple(token_values.shape)}"
            )
        out = token_values.new_zeros(self.num_responses)
        return out.index_add(0, self.target_response.to(token_values.device), token_values)

    def by_example(self, per_response: Tensor, fill: float = math.nan) -> Tensor:
        """``(E, K_max)``: per-response values laid out by example and rank, ``fill`` where ``K < K_max``.

        For K=2 with chosen first, column 0 is the chosen and column 1 the rejected response.
        """
        if per_response.shape[:1] != (self.num_responses,):
            raise ValueError(
                f"per_response must start with the number of responses ({self.num_responses}), "
                f"got shape {tuple(per_response.shape)}"
            )
        if math.isnan(fill) and not (per_response.dtype.is_floating_point or per_response.dtype.is_complex):
            raise ValueError(f"per_response is {per_response.dtype}, which cannot hold the default fill NaN; pass fill=")
        k_max = int(self.response_rank.max()) + 1
        out = per_response.new_full((self.num_examples, k_max) + tuple(per_response.shape[1:]), fill)
        slot = self._example_slot().to(per_response.device)
        out[slot, self.response_rank.to(per_response.device)] = per_response
        return out

    def to(self, device: torch.device | str) -> "PrefixBatch":
        """A copy with every tensor on ``device`` (the layout's compact tables stay on the CPU)."""
        from ..ops.transfer import to_device

        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = to_device(value, device)  # queued from pinned memory: no host sync
        return PrefixBatch(**moved)
