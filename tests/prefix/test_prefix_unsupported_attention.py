"""Attention terms prefix sharing does not implement are refused, never ignored.

A model that cannot run SDPA for a reason not handled here would change its logits even without a
layout (GPT-OSS's sinks did, by about 0.2, before they were applied); the attention function refuses
sinks under another name than ``s_aux`` and an additive position bias on any path, and attention weights
with a layout.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.transformers import enable_prefix_sharing, prefix_sharing_attention  # noqa: E402
from pygpo.prefix import pack  # noqa: E402


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_model_without_sdpa_for_unknown_reasons_is_refused_and_left_unchanged():
    """A model that lacks SDPA support for a reason prefix sharing does not handle is refused; GPT-OSS, whose
    only reason is its sinks, runs (tests/prefix/test_prefix_window_models.py)."""
    model = _llama()
    model._supports_sdpa = False  # as a model whose attention SDPA cannot express declares itself
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"LlamaForCausalLM does not support SDPA attention"):
        enable_prefix_sharing(model)
    assert model.config._attn_implementation == attn
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("with_layout", [False, True], ids=["no_layout", "layout"])
@pytest.mark.parametrize("term", ["sinks", "position_bias"])
def test_attention_function_refuses_terms_it_would_ignore(term, with_layout):
    module = _llama().model.layers[0].self_attn
    batch = pack([[1, 2, 3]], [[[4, 5], [6]]])
    q = torch.randn(1, 4, batch.input_ids.shape[1], 8)
    kv = torch.randn(1, 2, batch.input_ids.shape[1], 8)
    extra = {"prefix_layout": batch.layout} if with_layout else {}
    value = torch.zeros(4) if term != "position_bias" else torch.zeros(1, 4, q.shape[2], q.shape[2])
    with pytest.raises(ValueError, match=rf"passes {term} .*does not implement"):
        prefix_sharing_attention(module, q, kv, kv, None, **{term: value}, **extra)
    # the same call without the term runs
    out, weights = prefix_sharing_attention(module, q, kv, kv, None, **extra)
    assert out.shape == (1, q.shape[2], 4, 8) and weights is None


def test_attention_weights_are_refused_with_a_layout_only():
    model = enable_prefix_sharing(_llama(), backend="torch")
    batch = pack([[1, 2, 3]], [[[4, 5], [6]]])
    with pytest.raises(ValueError, match="computes no attention weights: pass output_attentions=False"):
        model(input_ids=batch.input_ids, prefix_layout=batch.layout, output_attentions=True)
    # without a layout the model behaves like its SDPA self: it warns and returns no weights
    out = model(input_ids=batch.input_ids, output_attentions=True)
    assert not out.attentions
