"""pack(): token placement, position ids, targets, first-fit-decreasing packing, stats, truncation."""

from __future__ import annotations

import random

import pytest
import torch

from pygpo.prefix import PrefixLayout, pack
from prefix_reference import single_torch_thread  # noqa: F401, E402


def _examples(seed, n, k_range=(2, 2), p_range=(1, 9), r_range=(1, 9)):
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        prompts.append([rng.randint(1, 50) for _ in range(rng.randint(*p_range))])
        responses.append([[rng.randint(1, 50) for _ in range(rng.randint(*r_range))]
                          for _ in range(rng.randint(*k_range))])
    return prompts, responses


def _check_against_unshared(batch, prompts, responses):
    """Each target row must hold the token an unshared ``prompt + response`` sequence has at the same
    position, and predict the next token of that sequence."""
    ids = batch.input_ids.flatten()
    pos = batch.position_ids.flatten()
    for r in range(batch.num_responses):
        e = int(batch.response_example[r])
        k = int(batch.response_rank[r])
        seq = list(prompts[e]) + list(responses[e][k])[: int(batch.response_lengths[r])]
        p = len(prompts[e])
        sel = (batch.target_response == r).nonzero().flatten()
        rows = batch.target_index[sel]
        labels = batch.target_labels[sel]
        assert labels.tolist() == seq[p:]
        assert pos[rows].tolist() == list(range(p - 1, len(seq) - 1))
        assert ids[rows].tolist() == seq[p - 1:-1]


@pytest.mark.parametrize("k_range", [(2, 2), (2, 4)])
@pytest.mark.parametrize("max_tokens", [None, 40])
def test_targets_positions_match_unshared_sequences(k_range, max_tokens):
    prompts, responses = _examples(1, 9, k_range=k_range)
    batch = pack(prompts, responses, max_tokens=max_tokens)
    _check_against_unshared(batch, prompts, responses)
    assert batch.num_examples == 9
    assert batch.num_responses == sum(len(r) for r in responses)
    # Every response token appears exactly once in input_ids, inside the row of its example.
    assert batch.target_index.numel() == sum(len(y) for rs in responses for y in rs)
    if max_tokens is not None:
        assert batch.input_ids.shape[1] <= max_tokens
        assert batch.input_ids.shape[0] < 9  # packing put several prompts in a row


def test_explicit_layout_values():
    batch = pack([[11, 12, 13], [21, 22]], [[[31, 32], [41]], [[51], [61, 62], [71]]], max_tokens=16)
    # FFD: both examples (6 and 6 tokens) share one row; the first (longest, then lowest index) goes first.
    assert batch.input_ids.tolist() == [[11, 12, 13, 31, 32, 41, 21, 22, 51, 61, 62, 71]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3, 2]]
    assert batch.target_index.tolist() == [2, 3, 2, 7, 7, 9, 7]
    assert batch.target_labels.tolist() == [31, 32, 41, 51, 61, 62, 71]
    assert batch.target_response.tolist() == [0, 0, 1, 2, 3, 3, 4]
    assert batch.response_example.tolist() == [0, 0, 1, 1, 1]
    assert batch.response_rank.tolist() == [0, 1, 0, 1, 2]
    assert batch.layout.rows() == [[
        {"start": 0, "prompt_len": 3, "resp_starts": [3, 5], "resp_lens": [2, 1]},
        {"start": 6, "prompt_len": 2, "resp_starts": [8, 9, 11], "resp_lens": [1, 2, 1]},
    ]]


def test_first_fit_decreasing_rows():
    # Lengths 9, 7, 6, 5, 3 (prompt 1 + two responses) into rows of 12: FFD -> [9, 3], [7, 5], [6].
    lens = [9, 7, 6, 5, 3]
    prompts = [[1] for _ in lens]
    responses = [[[2] * (n - 2), [3]] for n in lens]
    batch = pack(prompts, responses, max_tokens=12)
    rows = batch.layout.rows()
    got = sorted(sorted(d["prompt_len"] + sum(d["resp_lens"]) for d in row) for row in rows)
    assert got == [[3, 9], [5, 7], [6]]
    assert batch.input_ids.shape == (3, 12)


def test_stats_ratio_is_token_ceiling():
    prompts, responses = _examples(3, 6)
    batch = pack(prompts, responses)
    st = batch.stats()
    unshared = sum(2 * len(p) + len(a) + len(b) for p, (a, b) in zip(prompts, responses))
    shared = sum(len(p) + len(a) + len(b) for p, (a, b) in zip(prompts, responses))
    assert (st.tokens_unshared, st.tokens_shared) == (unshared, shared)
    assert st.ratio == pytest.approx(unshared / shared)
    assert st.padded_tokens == batch.input_ids.numel()
    assert st.as_dict()["examples"] == 6


def test_truncation_keep_start_counts():
    prompts = [[1] * 4, [1] * 9, [1] * 2]
    responses = [[[2] * 10, [3] * 3], [[2] * 2, [3] * 2], [[2] * 2, [3] * 2]]
    batch = pack(prompts, responses, max_tokens=10, truncation="keep_start")
    # Example 1's prompt (9) + one token per response (2) > 10: dropped. Example 0: cap L with 4 + min(10, L)
    # + min(3, L) <= 10 -> L = 3: responses cut to 3 and 3 (one response shortened, 7 tokens removed).
    assert batch.dropped_examples == (1,)
    assert batch.example_index.tolist() == [0, 2]
    assert batch.response_lengths.tolist() == [3, 3, 2, 2]
    assert batch.truncated_responses == 1 and batch.truncated_tokens == 7
    st = batch.stats()
    assert (st.dropped_examples, st.truncated_responses, st.truncated_tokens) == (1, 1, 7)
    # The kept start of the truncated response is scored.
    assert batch.target_labels[batch.target_response == 0].tolist() == [2, 2, 2]


def test_by_example_and_response_sums():
    batch = pack([[1, 2], [3]], [[[4, 5], [6]], [[7], [8, 9], [10]]])
    values = torch.arange(batch.target_index.numel(), dtype=torch.float64)
    sums = batch.response_sums(values)
    expected = [sum(values[batch.target_response == r].tolist()) for r in range(5)]
    assert sums.tolist() == expected
    mat = batch.by_example(sums)
    assert mat.shape == (2, 3)
    assert mat[0, :2].tolist() == expected[:2] and torch.isnan(mat[0, 2])
    assert mat[1].tolist() == expected[2:]
    assert batch.responses_per_example.tolist() == [2, 3]


def test_tensor_inputs_and_min_responses_one():
    batch = pack([torch.tensor([5, 6])], [[torch.tensor([7])]], min_responses=1)
    assert batch.input_ids.tolist() == [[5, 6, 7]]
    assert batch.target_index.tolist() == [1]


def test_pad_to_multiple_of():
    batch = pack([[1, 2, 3]], [[[4], [5]]], pad_to_multiple_of=8, pad_token_id=0)
    assert batch.input_ids.shape == (1, 8)
    assert batch.layout.token_bounds()[0, :, 6].tolist() == [6, 6, 6]  # padding sees itself


def test_layout_from_lengths_matches_pack():
    prompts, responses = _examples(5, 4, k_range=(2, 3))
    batch = pack(prompts, responses)
    rows = [[(len(p), [len(y) for y in rs])] for p, rs in zip(prompts, responses)]
    layout = PrefixLayout.from_lengths(rows, seq_len=batch.input_ids.shape[1])
    assert torch.equal(layout.position_ids(), batch.position_ids)
    assert torch.equal(layout.token_bounds(), batch.layout.token_bounds())


def test_spans_cover_rows():
    batch = pack([[1, 2, 3], [4, 5]], [[[6], [7, 8]], [[9], [10], [11]]], max_tokens=16, pad_to_multiple_of=16)
    assert batch.layout.spans() == [[
        ("causal", 0, 4, 0, 0), ("branch", 4, 6, 0, 3),
        ("causal", 6, 9, 0, 0), ("branch", 9, 10, 6, 8), ("branch", 10, 11, 6, 8),
        ("pad", 11, 16, 0, 0),
    ]]
