"""Bad input to the prefix-sharing API's less-travelled checks (each message names the argument and
what was expected), and prefix_attention given a PrefixBatch checked against float64 masked attention."""

from __future__ import annotations

import pytest
import torch

from prefix_reference import allowed_mask, reference_attention
from pygpo.prefix import PrefixLayout, pack, prefix_attention

GOOD = dict(batch_size=1, seq_len=8, doc_row=[0], doc_start=[0], prompt_len=[2],
            resp_doc=[0, 0], resp_start=[2, 4], resp_len=[2, 3])


def _layout(**changes) -> PrefixLayout:
    return PrefixLayout(**{**GOOD, **changes})


@pytest.fixture(scope="module")
def batch():
    return pack([[1, 2], [3, 4, 5]], [[[6, 7], [8]], [[9], [10, 11]]], max_tokens=16)


def test_layout_repr():
    assert repr(_layout()) == "PrefixLayout(batch_size=1, seq_len=8, documents=1, responses=2)"


@pytest.mark.parametrize("changes,match", [
    (dict(doc_row=[[0]]), r"doc_row must be one-dimensional, got shape \(1, 1\)"),
    (dict(doc_start=[0, 3]), r"doc_row, doc_start and prompt_len must have the same length \(one entry per document\), got 1, 2 and 1"),
    (dict(resp_len=[2]), r"resp_doc, resp_start and resp_len must have the same length \(one entry per response\), got 2, 2 and 1"),
    (dict(doc_row=[], doc_start=[], prompt_len=[], resp_doc=[], resp_start=[], resp_len=[]),
     r"needs at least one document \(doc_row is empty\)"),
    (dict(resp_doc=[0, 1]), r"resp_doc must lie in \[0, n_docs=1\)"),
    (dict(seq_len=12, doc_row=[0, 0], doc_start=[0, 5], prompt_len=[2, 2], resp_doc=[1, 0], resp_start=[7, 2], resp_len=[2, 3]),
     "responses must be grouped by document, in document order"),
])
def test_layout_tables(changes, match):
    with pytest.raises(ValueError, match=match):
        _layout(**changes)


def test_batch_methods_check_shapes(batch):
    with pytest.raises(ValueError, match=r"hidden must have the layout's batch_size=1 at dimension 0 and seq_len=11 at "
                                         r"dimension 1, got shape \(5,\) \(too few dimensions\)"):
        batch.gather(torch.zeros(5))
    with pytest.raises(ValueError, match=r"token_values must have one value per target, shape \(6,\), got \(3,\)"):
        batch.response_sums(torch.zeros(3))
    with pytest.raises(ValueError, match=r"per_response must start with the number of responses \(4\), got shape \(3,\)"):
        batch.by_example(torch.zeros(3))


def test_pack_sequences():
    with pytest.raises(TypeError, match="prompts must be a sequence of token-id sequences, got str"):
        pack("abc", [[[1], [2]]])
    with pytest.raises(TypeError, match="prompts must be a sequence of token-id sequences, got int"):
        pack(5, [[[1], [2]]])
    with pytest.raises(TypeError, match="responses must be a sequence of lists of responses, got int"):
        pack([[1]], 7)
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a sequence of token ids, got int"):
        pack([5], [[[1], [2]]])


@pytest.fixture
def qkv(batch):
    g = torch.Generator().manual_seed(0)
    s = batch.input_ids.shape[1]
    return [torch.randn(1, 2, s, 4, generator=g) for _ in range(3)]


def test_attention_argument_types(batch, qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got ndarray"):
        prefix_attention(q, k.numpy(), v, batch)
    with pytest.raises(TypeError, match="q must be a floating-point tensor, got torch.int64"):
        prefix_attention(q.long(), k.long(), v.long(), batch)


def test_attention_devices_and_shapes(batch, qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="q, k and v must be on one device, got cpu, meta, meta"):
        prefix_attention(q, k.to("meta"), v.to("meta"), batch)
    with pytest.raises(ValueError, match=r"q \(B, Hq, S, d\) and k \(B, Hkv, S, d\) disagree on B, S or d"):
        prefix_attention(q, k[..., :3], v[..., :3], batch)


def test_attention_takes_a_prefix_batch(batch, qkv):
    q, k, v = (t.double() for t in qkv)
    out = prefix_attention(q, k, v, batch, backend="torch")
    torch.testing.assert_close(out, reference_attention(q, k, v, allowed_mask(batch.layout)))
