"""Edge cases of prefix sharing: layouts with gaps and empty rows, odd head dims, float64 routing, and
validation of integer arguments.

References are independent: the float64 masked softmax over the brute-force mask of
``prefix_reference.allowed_mask`` (built from ``layout.rows()``, not from the bounds the kernels read).
"""

from __future__ import annotations

import os

import pytest
import torch

from pygpo.prefix import PrefixLayout, build_block_map, pack, prefix_attention
from pygpo.prefix.blocks import EMPTY, FULL

from prefix_reference import allowed_mask, reference_attention, single_torch_thread  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gapped_layout() -> PrefixLayout:
    """Row 0: two documents with 5 padding tokens between them, the second ending in a length-1 response
    on the row's last token. Row 1: no document at all (padding only). Row 2: a prompt with no response."""
    # row 0: doc 0 = prompt [0, 5), responses [5, 9) [9, 11); padding [11, 16); doc 1 = prompt [16, 19),
    # responses [19, 31) [31, 32). Row 2: doc 2 = a prompt [3, 9) with no response.
    doc_row, doc_start, prompt_len = [0, 0, 2], [0, 16, 3], [5, 3, 6]
    resp_doc, resp_start, resp_len = [0, 0, 1, 1], [5, 9, 19, 31], [4, 2, 12, 1]
    return PrefixLayout(3, 32, doc_row, doc_start, prompt_len, resp_doc, resp_start, resp_len)


def _inputs_bshd(seed, B, hq, hkv, S, d, dtype):
    """q, k, v as transformers hands them over: ``(B, S, H, d)`` memory viewed as ``(B, H, S, d)``."""
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, S, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_()  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def _rel_err(a, ref):
    return float((a.detach().double().cpu() - ref.detach()).abs().max() / ref.detach().abs().max())


def _check_against_reference(layout, q, k, v, tol, **kwargs):
    out = prefix_attention(q, k, v, layout, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, allowed_mask(layout), kwargs.get("scale"))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double().cpu())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel_err(out, ref) < tol
    for a, r in zip(grads, ref_grads):
        assert _rel_err(a, r) < tol


def test_gapped_layout_mask_and_block_map_against_brute_force():
    layout = _gapped_layout()
    allowed = allowed_mask(layout)
    assert torch.equal(layout.dense_mask()[:, 0], allowed)
    assert torch.equal(allowed[1], torch.eye(32, dtype=torch.bool))  # a row of padding sees only itself
    for bm, bn in ((4, 8), (8, 4), (16, 16)):
        state = build_block_map(layout, bm, bn).state
        for i in range(32 // bm):
            for j in range(32 // bn):
                tile = allowed[:, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].flatten(1)
                assert torch.equal(state[:, i, j] != EMPTY, tile.any(1))
                assert torch.equal(state[:, i, j] == FULL, tile.all(1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("hq, hkv, d", [(4, 1, 80), (8, 1, 8)], ids=["gqa4-d80", "gqa8-d8"])
def test_gapped_layout_transposed_inputs(backend, hq, hkv, d):
    """Gaps between documents, an empty row, a prompt with no response and a length-1 response on the last
    token, with non-contiguous ``(B, S, H, d)`` inputs, odd head dims and a given scale."""
    q, k, v = _inputs_bshd(3, 3, hq, hkv, 32, d, torch.float32)
    _check_against_reference(_gapped_layout(), q, k, v, 1e-5, scale=0.3, backend=backend)


def test_triton_refuses_float64():
    layout = PrefixLayout.from_lengths([[(2, [1, 1])]])
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match=r"backend='triton' takes float32, float16 or bfloat16.*float64"):
        prefix_attention(q, q, q, layout, backend="triton")


def test_triton_refuses_more_rows_x_heads_than_a_launch_grid_holds(monkeypatch):
    import pygpo.prefix.attention as attention

    monkeypatch.setattr(attention, "MAX_GRID_Y", 3)  # 2 rows x 2 heads: one past the (lowered) limit
    layout = PrefixLayout.from_lengths([[(2, [1, 1])], [(2, [1, 1])]])
    q = torch.randn(2, 2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"at most 3 rows x query heads per call, got 2 x 2"):
        prefix_attention(q, q, q, layout, backend="triton")


def test_float64_runs_in_float64_when_triton_is_the_default(monkeypatch):
    """``PYGPO_BACKEND=triton`` (what ``auto`` is on a GPU) with float64 inputs: the kernels keep their
    softmax statistics in float32, so these run on the torch backend and match float64 to 1e-12."""
    monkeypatch.setenv("PYGPO_BACKEND", "triton")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    q, k, v = _inputs_bshd(4, 3, 2, 1, 32, 16, torch.float64)
    _check_against_reference(_gapped_layout(), q, k, v, 1e-12)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((1, 6, [0], [0], [2.7], [0, 0], [2, 4], [2, 2]), TypeError, "prompt_len must hold integers"),
        ((1, 6, [0], [0.5], [2], [0, 0], [2, 4], [2, 2]), TypeError, "doc_start must hold integers"),
        ((1, 6, [False], [0], [2], [0, 0], [2, 4], [2, 2]), TypeError, "doc_row must hold integers"),
        ((1, 6.5, [0], [0], [2], [0, 0], [2, 4], [2, 2]), ValueError, "seq_len to be a positive int"),
        ((True, 6, [0], [0], [2], [0, 0], [2, 4], [2, 2]), ValueError, "batch_size to be a positive int"),
        ((1, 0, [0], [0], [2], [0, 0], [2, 4], [2, 2]), ValueError, "seq_len to be a positive int"),
    ],
)
def test_layout_rejects_non_integers(args, error, match):
    with pytest.raises(error, match=match):
        PrefixLayout(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pad_token_id": -1}, "pad_token_id must be an int >= 0, got -1"),
        ({"pad_token_id": 1.5}, "pad_token_id must be an int >= 0"),
        ({"pad_to_multiple_of": 2.5}, "pad_to_multiple_of must be a positive int"),
        ({"min_responses": 2.5}, "min_responses must be a positive int"),
        ({"min_responses": "2"}, "min_responses must be a positive int"),
        ({"max_tokens": 4.0}, "max_tokens must be a positive int or None"),
    ],
)
def test_pack_rejects_bad_integer_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack([[1]], [[[1], [2]]], **kwargs)


def test_pack_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    batch = pack([[1]], [[[1], [2]]], max_tokens=np.int64(8), pad_token_id=np.int32(9), pad_to_multiple_of=np.int64(4))
    assert batch.input_ids.tolist() == [[1, 1, 2, 9]]


def test_by_example_integer_values_need_a_fill():
    batch = pack([[1], [2]], [[[3], [4]], [[5], [6], [7]]])
    with pytest.raises(ValueError, match="cannot hold the default fill NaN"):
        batch.by_example(torch.arange(5))
    assert batch.by_example(torch.arange(5), fill=-1).tolist() == [[0, 1, -1], [2, 3, 4]]
