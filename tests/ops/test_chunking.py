"""Tile shapes chosen from a memory budget."""

import pytest

from pygpo.ops.chunking import MIN_VOCAB_CHUNK, TILE_BYTES_PER_ELEMENT, choose_chunks


@pytest.mark.parametrize("n,v", [(4096, 32000), (37, 1001), (1, 5), (8192, 128256)])
@pytest.mark.parametrize("budget", [2**20, 2**24, 2**28, 2**31])
def test_tile_fits_budget_and_covers_input(n, v, budget):
    c = choose_chunks(n, v, memory_budget=budget)
    assert 1 <= c.rows <= n and 1 <= c.vocab <= v
    if c.rows * c.vocab > min(v, MIN_VOCAB_CHUNK):  # beyond the minimum tile the budget is respected
        assert c.rows * c.vocab * TILE_BYTES_PER_ELEMENT <= budget


def test_whole_vocabulary_preferred_when_it_fits():
    assert choose_chunks(4096, 32000, memory_budget=2**28).vocab == 32000
    assert choose_chunks(4096, 128256, memory_budget=2**20).vocab < 128256


def test_bigger_budget_never_gives_smaller_tiles():
    sizes = [choose_chunks(4096, 32000, memory_budget=2**k) for k in range(12, 34)]
    areas = [c.rows * c.vocab for c in sizes]
    assert areas == sorted(areas)


def test_tiny_budget_still_works_and_bad_budget_raises():
    assert choose_chunks(10, 1000, memory_budget=1) == (1, MIN_VOCAB_CHUNK)
    with pytest.raises(ValueError, match="memory_budget"):
        choose_chunks(10, 1000, memory_budget=0)
