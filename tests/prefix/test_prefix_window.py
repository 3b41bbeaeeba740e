"""Sliding-window prefix attention: a query at position ``p`` sees only keys at positions ``> p - W``,
positions counted in its own unshared ``prompt + response`` sequence (Mistral, Gemma 2/3 local layers).

Every check is against the brute-force mask of ``prefix_reference.allowed_mask`` (built from the
layout's rows, not from the bounds under test) and float64 masked-softmax attention, forward and
backward with random upstream gradients, on random layouts whose prompts and responses are longer and
shorter than the window.
"""

from __future__ import annotations

import pytest
import torch

from pygpo.prefix import PrefixLayout, build_block_map, prefix_attention
from pygpo.prefix.blocks import EMPTY, FULL
from pygpo.prefix.torch_attention import dense_prefix_attention

from prefix_reference import allowed_mask, random_layout, single_torch_thread  # noqa: F401
from test_prefix_attention import DEVICE, _inputs, _reference, _run
from test_prefix_blocks import _tiles

WINDOWS = [1, 2, 3, 5, 8, 1000]


def _err(a, ref):
    """Largest error relative to the reference's largest magnitude, or absolute where that is below one:
    with a window of 1 every query sees only itself, so dQ is exactly zero."""
    ref = ref.detach()
    return float((a.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("seed", range(3))
def test_dense_mask_and_tile_states_follow_positions(seed, window):
    layout = random_layout(seed, batch_size=2, seq_len=41)
    allowed = allowed_mask(layout, window)
    assert torch.equal(layout.dense_mask(sliding_window=window)[:, 0], allowed)
    any_, all_ = _tiles(allowed, 8, 4)
    state = build_block_map(layout, 8, 4, sliding_window=window).state
    assert torch.equal(state != EMPTY, any_) and torch.equal(state == FULL, all_)


def test_window_reaches_back_into_the_prompt_by_position():
    """A later response restarts at position P: with W=3 its first token sees the prompt's last two
    keys, though they lie more than 3 row offsets back (past the first response)."""
    layout = PrefixLayout.from_lengths([[(4, [3, 2])]])  # prompt 0..3, responses at 4..6 and 7..8
    mask = layout.dense_mask(sliding_window=3)[0, 0]
    assert mask[7].nonzero().flatten().tolist() == [2, 3, 7]
    assert mask[8].nonzero().flatten().tolist() == [3, 7, 8]
    assert mask[6].nonzero().flatten().tolist() == [4, 5, 6]
    # no window: the whole prompt and the response itself
    assert layout.dense_mask()[0, 0, 8].nonzero().flatten().tolist() == [0, 1, 2, 3, 7, 8]


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 1)])
@pytest.mark.parametrize("impl", ["span", "dense"])
def test_torch_backends_match_reference(impl, hq, hkv, window):
    layout = random_layout(window * 7 + hq, batch_size=2, seq_len=33)
    fn = {"span": lambda *t: prefix_attention(*t, layout, sliding_window=window, backend="torch"),
          "dense": lambda *t: dense_prefix_attention(*t, layout, 16 ** -0.5, sliding_window=window)}[impl]
    q, k, v = _inputs(window, 2, hq, hkv, 33, 16, torch.float64)
    out, grads, do = _run(fn, q, k, v, seed=window)
    ref, ref_grads = _reference(q, k, v, allowed_mask(layout, window), do)
    assert _err(out, ref) < 1e-12
    for a, r in zip(grads, ref_grads):
        assert _err(a, r) < 1e-12


@pytest.mark.parametrize("seed, B, hq, hkv, S, d, window", [
    (0, 2, 2, 2, 37, 16, 5),
    (1, 2, 4, 2, 45, 24, 17),    # GQA, head dim not a power of two, window across tiles of 16
    (2, 1, 2, 1, 64, 16, 1),     # every query sees only itself
])
def test_triton_matches_reference(seed, B, hq, hkv, S, d, window):
    layout = random_layout(seed + 50, B, S)
    q, k, v = _inputs(seed, B, hq, hkv, S, d, torch.float32, DEVICE)
    out, grads, do = _run(lambda *t: prefix_attention(*t, layout, sliding_window=window, backend="triton"),
                          q, k, v, seed)
    ref, ref_grads = _reference(q, k, v, allowed_mask(layout, window), do)
    assert _err(out, ref) < 1e-5
    for a, r in zip(grads, ref_grads):
        assert _err(a, r) < 1e-5


def test_window_longer_than_every_sequence_changes_nothing():
    layout = random_layout(3, 2, 30)
    q, k, v = _inputs(3, 2, 2, 2, 30, 16, torch.float64)
    torch.testing.assert_close(prefix_attention(q, k, v, layout, sliding_window=30, backend="torch"),
                               prefix_attention(q, k, v, layout, backend="torch"), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_window_is_refused(bad):
    layout = random_layout(0, 1, 20)
    q, k, v = _inputs(0, 1, 2, 2, 20, 16, torch.float32)
    with pytest.raises(ValueError, match="sliding_window must be None or a positive int"):
        prefix_attention(q, k, v, layout, sliding_window=bad)
