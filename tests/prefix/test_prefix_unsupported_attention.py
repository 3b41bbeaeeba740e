"""Attention terms prefix sharing does not implement are refused, never ignored.

A model whose attention has learned sinks (GPT-OSS) cannot run on SDPA, so enabling prefix sharing on
it would change its logits even without a layout (by about 0.2 on the tiny model below); the attention
function itself refuses sinks and an additive position bias on any path, and attention weights with a
layout.
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


def test_model_with_attention_sinks_is_refused_and_left_unchanged():
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip("this transformers has no GPT-OSS")
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, attn_implementation="eager")
    model = transformers.GptOssForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"GptOssForCausalLM does not support SDPA attention.*sinks"):
        enable_prefix_sharing(model)
    assert model.config._attn_implementation == "eager"
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("with_layout", [False, True], ids=["no_layout", "layout"])
@pytest.mark.parametrize("term", ["s_aux", "sinks", "position_bias"])
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
