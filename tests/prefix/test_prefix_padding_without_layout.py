"""A model with prefix sharing enabled, run without a layout on a padded batch, equals the untouched model.

The model keeps its 2-D ``attention_mask`` (OPT numbers its positions from it) while the 4-D padding mask
reaches the attention through the layers' keyword arguments, including a gradient-checkpointed layer's
recomputation in backward. Layers that drop those keyword arguments (StableLM) take the mask from the
running forward, and are refused under gradient checkpointing, whose recomputation runs outside it.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pygpo.integrations.transformers import enable_prefix_sharing  # noqa: E402
from prefix_reference import single_torch_thread  # noqa: F401, E402

VOCAB = 53
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0)
# name -> (config class, model class, config)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_COMMON, intermediate_size=48, num_key_value_heads=2)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_COMMON, ffn_dim=48, word_embed_proj_dim=32, dropout=0.0)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_COMMON, intermediate_size=48, num_key_value_heads=2)),
}


def _model(name: str):
    cfg_name, cls_name, kwargs = MODELS[name]
    cfg_cls, cls = getattr(transformers, cfg_name, None), getattr(transformers, cls_name, None)
    if cfg_cls is None or cls is None:
        pytest.skip(f"this transformers has no {cls_name}")
    config = cfg_cls(**kwargs)
    config._attn_implementation = "sdpa"  # eager attention gives NaN on fully padded query rows
    torch.manual_seed(0)
    return cls(config).double()


def _padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return ids, mask


def _loss_and_grads(model, ids, mask):
    """A weighted sum of the real tokens' log-probs, and every parameter's gradient."""
    model.zero_grad()
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1], -1)
    real = (mask[:, 1:] * mask[:, :-1]).bool()
    token = torch.where(real, logp.gather(-1, ids[:, 1:, None])[..., 0], 0.0)
    weights = torch.linspace(-1.0, 2.0, token.numel(), dtype=token.dtype).view_as(token)
    loss = (token * weights).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# StableLM under checkpointing is refused: test_layers_dropping_the_padding_are_refused_under_checkpointing
@pytest.mark.parametrize("name, checkpointing", [
    ("llama", False), ("llama", True), ("opt", False), ("opt", True), ("stablelm", False),
], ids=["llama-plain", "llama-checkpointed", "opt-plain", "opt-checkpointed", "stablelm-plain"])
def test_padded_forward_without_layout_equals_the_untouched_model(name, checkpointing):
    ref = _model(name).train()
    shared = enable_prefix_sharing(copy.deepcopy(ref), backend="torch").train()
    if checkpointing:
        for model in (ref, shared):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = _padded_batch()
    want, want_grads = _loss_and_grads(ref, ids, mask)
    got, got_grads = _loss_and_grads(shared, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert got_grads.keys() == want_grads.keys()
    for key, grad in want_grads.items():
        torch.testing.assert_close(got_grads[key], grad, rtol=1e-8, atol=1e-10, msg=key)


def test_layers_dropping_the_padding_are_refused_under_checkpointing():
    model = enable_prefix_sharing(_model("stablelm"), backend="torch").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask = _padded_batch()
    with pytest.raises(ValueError, match="gradient-checkpointed layers would recompute attending to padding"):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    model(input_ids=ids, attention_mask=torch.ones_like(mask), use_cache=False)  # no padding: nothing to lose
