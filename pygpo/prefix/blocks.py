"""Block maps: which key blocks each query block must visit, and which of them need a mask.

The Triton kernels tile the ``S x S`` score matrix of a row into ``BLOCK_M x BLOCK_N`` tiles. Each tile
``(i, j)`` (query block ``i``, key block ``j``) is in one of three states:

* **empty**: no query of block ``i`` sees any key of block ``j`` -> never loaded;
* **full**: every query of block ``i`` sees every key of block ``j`` -> computed without a mask;
* **partial**: anything in between (a document, response or causal boundary crosses the tile) ->
  computed with the mask of :mod:`pygpo.prefix.layout`, rebuilt in registers from ``O(S)`` bounds.

A sliding window narrows the bounds (:meth:`PrefixLayout.token_bounds`), so tiles wholly out of the
window become empty and only the window's lower edge adds partial tiles.

This is the block-sparse scheme of FlashAttention-2 (Dao, 2023, causal masking applied only to the
diagonal blocks) generalised to the prefix-sharing mask of "Accelerating Direct Preference
Optimization with Prefix Sharing" (Wang & Hegde, 2024), in the spirit of FlexAttention's block masks.

The states are computed from the per-token intervals ``[lo1, hi1) U [lo2, q]`` with difference
arrays: every query adds ``+1`` at the first key block of each interval it touches and ``-1`` after
the last; a cumulative sum over key blocks counts, per tile, the queries that see at least one key
("any") and the queries that see every key ("all"). Cost ``O(S + B * nQB * nKB)`` time and memory;
no ``S x S`` tensor is formed.

Tiles that touch the ragged end of the sequence (``S`` not a multiple of the block) are never full,
so the unmasked loop of the kernels never reads out of bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .layout import PrefixLayout

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockMap:
    """Sparse tile lists of one layout for one ``(block_m, block_n)`` tiling, on one device.

    Every list is of *runs*: maximal ranges ``[start, stop)`` of consecutive blocks in one state, in
    ascending order, padded at the end (entries past the count are never read).

    Query-major (forward and ``dQ``), one row per ``(batch row b, query block i)``:
        q_full_count, q_part_count: ``(B, nQB)`` int32, number of runs of full / partial key blocks.
        q_full_runs, q_part_runs: ``(B, nQB, nKB, 2)`` int32, the runs.
    Key-major (``dK``/``dV``), the transpose:
        k_full_count, k_part_count: ``(B, nKB)`` int32; k_full_runs, k_part_runs: ``(B, nKB, nQB, 2)`` int32.
    state: ``(B, nQB, nKB)`` int8 tile states (EMPTY/PARTIAL/FULL), for tests and statistics.

    Why runs: a loop over a contiguous range of blocks gives the Triton compiler affine addresses, and it
    software-pipelines the tile loads (the next tiles' copies in flight while one is computed); a loop
    over an index list it compiled, for sm_90, into load-then-wait-for-all with no overlap. Full tiles
    come in few runs (a query block sees its prompt's blocks and its own response's), partial tiles sit
    on the boundaries.
    """

    block_m: int
    block_n: int
    num_q_blocks: int
    num_k_blocks: int
    state: Tensor
    q_full_count: Tensor
    q_full_runs: Tensor
    q_part_count: Tensor
    q_part_runs: Tensor
    k_full_count: Tensor
    k_full_runs: Tensor
    k_part_count: Tensor
    k_part_runs: Tensor

    def query_major(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(full count, full runs, partial count, partial runs)`` for the forward and ``dQ`` kernels."""
        return self.q_full_count, self.q_full_runs, self.q_part_count, self.q_part_runs

    def key_major(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(full count, full runs, partial count, partial runs)`` for the ``dK/dV`` kernel."""
        return self.k_full_count, self.k_full_runs, self.k_part_count, self.k_part_runs

    def density(self) -> float:
        """Fraction of tiles visited (full or partial) among all ``B * nQB * nKB`` tiles."""
        return float((self.state != EMPTY).float().mean())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _interval_counts(q_block: Tensor, first: Tensor, last: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Per tile ``(b, i, j)``, how many queries have ``first <= j <= last`` (empty where ``first > last``).

    ``q_block``, ``first``, ``last``: ``(B, S)`` int64. Returns ``(B, nQB, nKB)`` int32.
    """
    B, n_q, n_k = shape
    diff = torch.zeros(B, n_q, n_k + 1, dtype=torch.int32, device=q_block.device)
    valid = first <= last
    one = valid.to(torch.int32)
    start = torch.where(valid, first, 0).clamp(0, n_k)
    stop = torch.where(valid, last + 1, 0).clamp(0, n_k)
    base = torch.arange(B, device=q_block.device)[:, None] * n_q * (n_k + 1) + q_block * (n_k + 1)
    flat = diff.view(-1)
    flat.index_add_(0, (base + start).flatten(), one.flatten())
    flat.index_add_(0, (base + stop).flatten(), -one.flatten())
    return torch.cumsum(diff, dim=-1, dtype=torch.int32)[..., :n_k]


def tile_states(layout: PrefixLayout, block_m: int, block_n: int, device: torch.device | str = "cpu", *,
                sliding_window: Optional[int] = None) -> Tensor:
    """``(B, nQB, nKB)`` int8 tile states of ``layout`` for ``block_m x block_n`` tiles (see module docstring),
    under a sliding window of that many positions when one is given."""
    device = torch.device(device)
    B, S = layout.batch_size, layout.seq_len
    n_q, n_k = _cdiv(S, block_m), _cdiv(S, block_n)
    bounds = layout.token_bounds(device, sliding_window=sliding_window).long()
    lo1, hi1, lo2 = bounds[:, 0], bounds[:, 1], bounds[:, 2]
    q = torch.arange(S, device=device).expand(B, S)
    q_block = q // block_m
    shape = (B, n_q, n_k)

    # Key blocks touched by [lo1, hi1) and by [lo2, q].
    last1 = torch.where(hi1 > lo1, (hi1 - 1) // block_n, -1)
    any_count = _interval_counts(q_block, lo1 // block_n, last1, shape)
    any_count += _interval_counts(q_block, lo2 // block_n, q // block_n, shape)
    # Key blocks lying entirely inside one interval (the two intervals of a query never touch: a later
    # response starts after the first response, which has at least one token).
    full_count = _interval_counts(q_block, _ceil_div(lo1, block_n), hi1 // block_n - 1, shape)
    full_count += _interval_counts(q_block, _ceil_div(lo2, block_n), (q + 1) // block_n - 1, shape)

    complete_q = (torch.arange(n_q, device=device) + 1) * block_m <= S
    complete_k = (torch.arange(n_k, device=device) + 1) * block_n <= S
    full = (full_count == block_m) & complete_q[None, :, None] & complete_k[None, None, :]
    state = torch.full(shape, EMPTY, dtype=torch.int8, device=device)
    state.masked_fill_(any_count > 0, PARTIAL)  # masked_fill: boolean indexing would read back its size
    state.masked_fill_(full, FULL)
    return state


def _ceil_div(x: Tensor, d: int) -> Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


def _lists(select: Tensor) -> tuple[Tensor, Tensor]:
    """For a bool ``(..., n)`` tensor: counts ``(...)`` and ascending indices ``(..., n)`` (padding at the end)."""
    n = select.shape[-1]
    j = torch.arange(n, device=select.device, dtype=torch.int32)
    keys = torch.where(select, j, n + j)
    index = torch.sort(keys, dim=-1).values
    index = torch.where(index >= n, index - n, index)
    return select.sum(-1, dtype=torch.int32).contiguous(), index.to(torch.int32).contiguous()


def _runs(select: Tensor) -> tuple[Tensor, Tensor]:
    """For a bool ``(..., n)`` tensor: counts ``(...)`` of its maximal runs of ``True`` and the runs
    ``(..., n, 2)`` as ``[start, stop)`` in ascending order (padding at the end)."""
    none = torch.zeros_like(select[..., :1])
    starts = select & ~torch.cat((none, select[..., :-1]), -1)
    lasts = select & ~torch.cat((select[..., 1:], none), -1)
    count, first = _lists(starts)
    _, last = _lists(lasts)
    return count, torch.stack((first, last + 1), -1).contiguous()


def build_block_map(layout: PrefixLayout, block_m: int, block_n: int, device: torch.device | str = "cpu", *,
                    sliding_window: Optional[int] = None) -> BlockMap:
    """The :class:`BlockMap` of ``layout`` for ``block_m x block_n`` tiles (under ``sliding_window``, when
    given), cached on the layout."""
    device = torch.device(device)
    sliding_window = layout.effective_window(sliding_window)  # one map for every window that hides no key

    def build() -> BlockMap:
        state = tile_states(layout, block_m, block_n, device, sliding_window=sliding_window)
        t = state.transpose(1, 2)
        return BlockMap(
            block_m, block_n, state.shape[1], state.shape[2], state,
            *_runs(state == FULL), *_runs(state == PARTIAL), *_runs(t == FULL), *_runs(t == PARTIAL),
        )

    return layout.cached(("blocks", block_m, block_n, device, sliding_window), build)
