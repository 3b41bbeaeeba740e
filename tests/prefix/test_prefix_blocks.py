"""Block maps: visited tiles are exactly the tiles with a visible key; unmasked tiles are truly full."""

from __future__ import annotations

import pytest
import torch

from pygpo.prefix import PrefixLayout, build_block_map
from pygpo.prefix.blocks import EMPTY, FULL, PARTIAL

from prefix_reference import allowed_mask, random_layout, single_torch_thread  # noqa: F401


def _tiles(allowed, bm, bn):
    """Brute-force per-tile (any visible, all visible with the tile inside the sequence)."""
    B, S, _ = allowed.shape
    nq, nk = -(-S // bm), -(-S // bn)
    any_ = torch.zeros(B, nq, nk, dtype=torch.bool)
    all_ = torch.zeros(B, nq, nk, dtype=torch.bool)
    for i in range(nq):
        for j in range(nk):
            t = allowed[:, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            any_[:, i, j] = t.flatten(1).any(1)
            all_[:, i, j] = t.flatten(1).all(1) & (t.shape[1] == bm) & (t.shape[2] == bn)
    return any_, all_


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bm, bn", [(4, 4), (8, 4), (4, 8), (16, 16)])
def test_tile_states_against_brute_force(seed, bm, bn):
    layout = random_layout(seed, batch_size=2, seq_len=37)
    any_, all_ = _tiles(allowed_mask(layout), bm, bn)
    bmap = build_block_map(layout, bm, bn)
    state = bmap.state
    assert torch.equal(state != EMPTY, any_)  # exactly the tiles with a visible key
    # Exactly the fully visible tiles run unmasked: a query's two intervals are separated by at least
    # the first response, so a tile inside their union lies inside one of them.
    assert torch.equal(state == FULL, all_)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bm, bn", [(8, 4), (8, 8)])
def test_runs_cover_exactly_their_tiles(seed, bm, bn):
    """Runs are ascending, maximal (never touching) and their union is the full / partial tile set, in
    the query-major and the key-major maps."""
    layout = random_layout(seed, batch_size=3, seq_len=61)
    m = build_block_map(layout, bm, bn)
    t = m.state.transpose(1, 2)
    for count, runs, select in ((m.q_full_count, m.q_full_runs, m.state == FULL),
                                (m.q_part_count, m.q_part_runs, m.state == PARTIAL),
                                (m.k_full_count, m.k_full_runs, t == FULL),
                                (m.k_part_count, m.k_part_runs, t == PARTIAL)):
        assert runs.dtype == torch.int32 and runs.is_contiguous() and runs.shape == (*select.shape, 2)
        for b in range(select.shape[0]):
            for i in range(select.shape[1]):
                pairs = runs[b, i, : int(count[b, i])].tolist()
                covered = [j for start, stop in pairs for j in range(start, stop)]
                assert covered == select[b, i].nonzero().flatten().tolist()
                assert all(start < stop for start, stop in pairs)
                assert all(prev[1] < nxt[0] for prev, nxt in zip(pairs, pairs[1:]))  # maximal: a gap between


def test_causal_full_tiles_are_one_run():
    layout = PrefixLayout.from_lengths([[(64, [64])]])  # one prompt, one response: plain causal
    m = build_block_map(layout, 16, 16)
    assert m.q_full_count[0].tolist() == [0] + [1] * 7
    assert m.q_full_runs[0, 5, 0].tolist() == [0, 5]


def test_sparsity_of_long_responses():
    # One prompt of 64 and two responses of 64: response 2 never visits response 1's key blocks.
    layout = PrefixLayout.from_lengths([[(64, [64, 64])]])
    m = build_block_map(layout, 16, 16)
    resp2_q, resp1_k = slice(8, 12), slice(4, 8)
    assert (m.state[0, resp2_q, resp1_k] == EMPTY).all()
    assert (m.state[0, resp2_q, 0:4] == FULL).all()  # the prompt is seen without a mask
    assert (m.state[0, 5, 0:5] == FULL).all() and m.state[0, 5, 5] == PARTIAL  # causal diagonal
    assert m.density() < 0.5
    assert build_block_map(layout, 16, 16) is m  # cached on the layout
