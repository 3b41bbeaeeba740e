"""Bad input -> clear errors naming the argument (acceptance item 5)."""

from __future__ import annotations

import pytest
import torch

from pygpo.prefix import PrefixLayout, pack, prefix_attention
from prefix_reference import allowed_mask, reference_attention, single_torch_thread  # noqa: F401, E402


@pytest.mark.parametrize(
    "prompts, responses, kwargs, match",
    [
        ([[]], [[[1], [2]]], {}, r"prompts\[0\] is empty"),
        ([[1]], [[[1], []]], {}, r"responses\[0\]\[1\] is empty"),
        ([[1]], [[[1]]], {}, r"responses\[0\] has 1 response.*at least 2"),
        ([[1], [2]], [[[1], [2]]], {}, "same length"),
        ([], [], {}, "prompts is empty"),
        ([[1, 2, 3]], [[[1, 2], [3, 4]]], {"max_tokens": 5}, r"max_tokens=5 is smaller than example 0"),
        ([[1, 2, 3]], [[[1], [2]]], {"max_tokens": 4, "truncation": "keep_start"}, "every example was dropped"),
        ([[1]], [[[1], [2]]], {"max_tokens": 0}, "max_tokens must be a positive"),
        ([[1]], [[[1], [2]]], {"truncation": "keep_end"}, "truncation must be one of"),
        ([[-3]], [[[1], [2]]], {}, "negative token id"),
    ],
)
def test_pack_value_errors(prompts, responses, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack(prompts, responses, **kwargs)


def test_pack_type_errors():
    with pytest.raises(TypeError, match=r"prompts\[0\] must hold integer"):
        pack([[1.5]], [[[1], [2]]])
    with pytest.raises(TypeError, match=r"responses\[0\] must be a list"):
        pack([[1]], ["ab"])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a 1-D integer tensor"):
        pack([torch.ones(2)], [[[1], [2]]])


def _qkv(B=1, H=2, S=6, d=16):
    return torch.randn(B, H, S, d), torch.randn(B, H, S, d), torch.randn(B, H, S, d)


def test_layout_shape_mismatch():
    layout = PrefixLayout.from_lengths([[(2, [2, 2])]])  # B=1, S=6
    q, k, v = _qkv(S=7)
    with pytest.raises(ValueError, match=r"layout does not match q.*seq_len=6"):
        prefix_attention(q, k, v, layout)
    q, k, v = _qkv(B=2)
    with pytest.raises(ValueError, match=r"layout does not match q.*batch_size=1"):
        prefix_attention(q, k, v, layout)


def test_attention_tensor_errors():
    layout = PrefixLayout.from_lengths([[(2, [2, 2])]])
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        prefix_attention(torch.randn(1, 3, 6, 16), k, v, layout)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        prefix_attention(q, k, v[..., :8], layout)
    with pytest.raises(TypeError, match="share a dtype"):
        prefix_attention(q.double(), k, v, layout)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, S, d\)"):
        prefix_attention(q[0], k, v, layout)
    with pytest.raises(TypeError, match="layout must be a PrefixLayout"):
        prefix_attention(q, k, v, [[(2, [2, 2])]])
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_attention(q, k, v, layout, backend="cuda-graph")


@pytest.mark.parametrize(
    "args, match",
    [
        ((1, 6, [0], [0], [2], [0, 0], [2, 5], [2, 2]), r"response 1 starts at 5.*continues at 4"),
        ((1, 5, [0], [0], [2], [0, 0], [2, 4], [2, 2]), "outside"),
        ((1, 6, [0], [0], [0], [0, 0], [0, 2], [2, 2]), "prompt_len >= 1"),
        ((1, 6, [0], [0], [2], [0, 0], [2, 4], [2, 0]), "resp_len >= 1"),
        ((1, 12, [0, 0], [0, 3], [2, 2], [0, 0, 1, 1], [2, 4, 5, 7], [2, 2, 2, 2]), "overlap"),
        ((1, 6, [1], [0], [2], [0, 0], [2, 4], [2, 2]), "doc_row must lie"),
    ],
)
def test_layout_validation(args, match):
    with pytest.raises(ValueError, match=match):
        PrefixLayout(*args)


@pytest.mark.parametrize("scale,exc,match", [
    (float("nan"), ValueError, "scale must be a positive finite number, got nan"),
    (float("inf"), ValueError, "scale must be a positive finite number, got inf"),
    (0.0, ValueError, "scale must be a positive finite number, got 0.0"),
    (-1.0, ValueError, "scale must be a positive finite number, got -1.0"),
    ("0.5", TypeError, r"scale must be a real number \(int or float\), got str '0.5'"),
    (True, TypeError, "scale must be a real number"),
    (torch.tensor(0.5), TypeError, "scale must be a real number"),
])
def test_attention_scale_must_be_a_positive_finite_real(scale, exc, match):
    layout = PrefixLayout.from_lengths([[(2, [2, 2])]])
    with pytest.raises(exc, match=match):
        prefix_attention(*_qkv(), layout, scale=scale)


def test_attention_int_scale_matches_float64_reference():
    """An int scale is a real number too: checked against float64 masked softmax attention."""
    layout = PrefixLayout.from_lengths([[(2, [2, 2])]])
    q, k, v = _qkv(d=4)
    out = prefix_attention(q, k, v, layout, scale=1, backend="torch")
    want = reference_attention(q, k, v, allowed_mask(layout), scale=1.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_attention_head_dim_zero():
    layout = PrefixLayout.from_lengths([[(2, [2, 2])]])
    q, k, v = _qkv(d=0)
    with pytest.raises(ValueError, match=r"q, k and v must have a head dimension d >= 1, got q \(1, 2, 6, 0\)"):
        prefix_attention(q, k, v, layout)


def test_gather_checks_the_packed_rows():
    batch = pack([[1, 2, 3], [4]], [[[5, 6], [7]], [[8], [9, 10]]])  # B=2, S=6
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, S, D\) = \(2, 6, D\), one row per token of the "
                                         r"packed batch, got \(2, 6\)"):
        batch.gather(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"ref_hidden must have shape \(B, S, D\) = \(2, 6, D\).*got \(2, 6, 8, 1\)"):
        batch.gather(torch.randn(2, 6, 8, 1), name="ref_hidden")
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor, got list"):
        batch.gather([[0.0]])
    with pytest.raises(ValueError, match=r"layout does not match hidden: .*seq_len=6"):
        batch.gather(torch.randn(2, 7, 8))
    hidden = torch.randn(2, 6, 8)
    rows = batch.gather(hidden)
    assert torch.equal(rows, hidden.reshape(12, 8)[batch.target_index])
