"""Tiny random-weight transformers causal LMs for the integration tests (real architectures, small configs)."""

from __future__ import annotations

import torch

VOCAB = 128

# Shared by every architecture; each builder adds what its config needs.
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
)


def _config(arch: str, tied: bool):
    import transformers as tf

    extra = {"tie_word_embeddings": tied}
    if arch == "llama":
        return tf.LlamaConfig(**_COMMON, **extra)
    if arch == "qwen2":
        return tf.Qwen2Config(**_COMMON, **extra)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=None, **extra)
    if arch == "gemma":
        return tf.GemmaConfig(**_COMMON, head_dim=8, **extra)
    if arch == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                               sliding_window=64, **extra)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**_COMMON, head_dim=8, final_logit_softcapping=2.5, query_pre_attn_scalar=8,
                                   sliding_window=64, **extra)
    if arch == "cohere":
        return tf.CohereConfig(**_COMMON, logit_scale=0.5, **extra)
    if arch == "granite":
        return tf.GraniteConfig(**_COMMON, logits_scaling=4.0, **extra)
    if arch == "phi":  # lm_head with a bias
        return tf.PhiConfig(**{k: v for k, v in _COMMON.items() if k != "attention_dropout"}, **extra)
    raise ValueError(arch)


def tiny_causal_lm(arch: str = "llama", *, tied: bool = False, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A ``*ForCausalLM`` of ``arch`` with random weights, in eval mode, eager attention."""
    import transformers as tf

    config = _config(arch, tied)
    config._attn_implementation = "eager"
    cls = {
        "llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
        "gemma": tf.GemmaForCausalLM, "gemma2": tf.Gemma2ForCausalLM, "gemma3": tf.Gemma3ForCausalLM,
        "cohere": tf.CohereForCausalLM, "granite": tf.GraniteForCausalLM, "phi": tf.PhiForCausalLM,
    }[arch]
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():  # random (not zero) biases and norm weights, so every term is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_ids(batch: int, length: int, *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def reference_token_logps(model, input_ids, attention_mask=None, *, temperature: float = 1.0) -> torch.Tensor:
    """``(B, T-1)`` log p(x_{t+1} | x_<=t) from plain ``model(...).logits`` (float64 model: float64 values)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None])[..., 0]
